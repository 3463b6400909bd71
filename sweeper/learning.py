"""A sweep that learns: every finished trial refits the models before the next launch.

    returns = launch_learning(run_batch, launch, sweep_dir, commit, calibration=cal)

`run_batch(points)` runs those trials to the end (their result.json written), e.g.
sweeper.launching.launch_blocking. Between batches (one trial each unless told
otherwise) the trials finished so far, ok and OOM alike, refit the constants
(`fit_calibration`, from the sweep's starting calibration); a measured OOM raises the
memory boundary (`oom_margin_gb`), so a layout still to run that the refit predicts
out of memory is recorded `skipped` with "predicted OOM after refit" instead of
launched. The refit is written to calibration.json after every trial, and the
predictions in each launched trial's spec.json are the refit's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional

from core.records import read_json, result_path, write_json_atomic
from launch.record import base_record
from sweeper.calibration import fit_calibration
from sweeper.constants import Calibration, save_calibration
from sweeper.memory import predict_memory
from sweeper.plan import Point, prediction_for

LEARNED_FROM = ("ok", "oom")
SKIP_REASON = "predicted OOM after refit"


class Learner:
    """The refitted constants of one (model, cluster), and what they skipped."""

    def __init__(self, point: Point, base: Optional[Calibration]):
        self.model, self.cluster, self.base = point.model, point.cluster, base
        self.calibration = base
        self.records: list[dict] = []

    def observe(self, record: Optional[dict]) -> None:
        if not record or record.get("status") not in LEARNED_FROM:
            return
        self.records.append(record)
        self.calibration = fit_calibration(self.records, self.model, self.cluster, self.base)

    def skip_reason(self, point: Point) -> Optional[str]:
        """Why the refit would not launch this layout; None to launch it."""
        if not self.records:
            return None
        est = predict_memory(self.model, self.cluster, point.layout, self.calibration)
        if est.fits:
            return None
        limit = self.cluster.gpu_memory_gb - self.calibration.oom_margin_gb
        return f"{SKIP_REASON}: {est.peak_gb:.1f} GiB > {limit:.1f} GiB"


def _key(point: Point) -> str:
    return json.dumps([dataclasses.asdict(point.model), dataclasses.asdict(point.cluster)], sort_keys=True)


def launch_learning(run_batch: Callable[[list[Point]], object], launch: list[Point], sweep_dir: Path,
                    commit, *, calibration: Optional[Calibration] = None, size: int = 1,
                    echo=print) -> list:
    """Launch `launch` in order, `size` trials at a time, refitting after each batch."""
    from sweeper.launching import spec_of  # launching imports the launchers' modules

    learners: dict[str, Learner] = {}
    pending = list(launch)
    returns, skipped = [], []
    while pending:
        batch = []
        while pending and len(batch) < size:
            point = pending.pop(0)
            if _key(point) not in learners:
                learners[_key(point)] = Learner(point, calibration)
            learner = learners[_key(point)]
            reason = learner.skip_reason(point)
            if reason:
                point.status, point.reason = "skipped", reason
                record = base_record(spec_of(point, sweep_dir, commit), "skipped", reason)
                write_json_atomic(result_path(sweep_dir / point.name), record)
                skipped.append(point.name)
                echo(f"skip {point.name}: {reason}")
                continue
            if learner.records:
                point.prediction = prediction_for(point.model, point.cluster, point.layout, learner.calibration)
            batch.append(point)
        if not batch:
            break
        returns.append(run_batch(batch))
        for point in batch:
            learners[_key(point)].observe(read_json(result_path(sweep_dir / point.name)))
        fitted = [lr.calibration for lr in learners.values() if lr.records]
        if len(learners) == 1 and fitted:  # one model and cluster: the file the next sweep starts from
            save_calibration(fitted[0], sweep_dir / "calibration.json")
    echo(f"refit after every trial: {len(skipped)} trial(s) saved "
         f"(skipped as {SKIP_REASON}), {len(launch) - len(skipped)} launched")
    return returns
