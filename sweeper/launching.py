"""Hand a sweep's planned trials to a launcher, and make sure each one ends with a record.

The sweeper (`sweeper.hydra_sweeper`) plans; this module launches:
- every trial's `spec.json` (its prediction inside) is written here before its job
  starts, so the job runs the layout planned here and composes nothing again;
- local launchers (Hydra's, submitit's local executor) block until their batch ends;
- SLURM: one job per trial, its id written at once, waited on with deadlines and
  adopted by a resumed sweep (`launch.slurm_jobs`).
A trial that ends without a record of its own gets one here: from its rank records
if it started, else `lost`, `interrupted` or `error` with the cause.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from core.record_check import load_record, set_aside
from core.records import result_path, write_json_atomic
from core.spec import TrialSpec
from launch.record import base_record, trial_record
from launch.supervise import collect_ranks, started
from launch.trial import prepare
from sweeper.plan import Point


def spec_of(point: Point, sweep_dir: Path, commit) -> TrialSpec:
    # Absolute: ranks run with the repository as their working directory, the driver maybe not.
    return TrialSpec(model=point.model, cluster=point.cluster, layout=point.layout, trial=point.trial,
                     trial_dir=str((sweep_dir / point.name).absolute()), git_commit=commit,
                     prediction=point.prediction)


def write_missing(point: Point, sweep_dir: Path, commit, status: str, reason: str) -> None:
    """The record of a trial that has none. status "ran": it started, so its rank records tell."""
    path = result_path(sweep_dir / point.name)
    if load_record(path)[0] is not None:
        return
    spec = spec_of(point, sweep_dir, commit)
    if status == "ran":
        record = trial_record(spec, collect_ranks(spec, wait_until=time.time()), wall_s=0.0)
        record["reason"] = "; ".join(r for r in (reason, record.get("reason")) if r) or None
    else:
        record = base_record(spec, status, reason)
    write_json_atomic(path, record)


def record_unfinished(batch: list[Point], sweep_dir: Path, commit) -> None:
    """After a blocking launcher returns: a trial whose job died before task 0 wrote its record."""
    for point in batch:
        if started(sweep_dir / point.name):
            write_missing(point, sweep_dir, commit, "ran", "")
        else:
            write_missing(point, sweep_dir, commit, "error", "job never started (see the launcher's logs)")


def set_aside_previous(points: list[Point], sweep_dir: Path) -> None:
    """Damaged records, and earlier records of trials that run again, move out of the way.

    Renamed beside the new one, never deleted: progress and the leaderboard then show
    only what this run measures (an old `error` is not the re-run's result).
    """
    for point in points:
        path = result_path(sweep_dir / point.name)
        if point.damaged:
            moved = set_aside(path, "damaged")
            print(f"damaged record {path}: {point.damaged}; set aside as {moved.name}, the trial runs again")
        elif point.status == "launch" and point.previous and path.exists():
            set_aside(path, f"previous-{point.previous}")


def launch_blocking(launcher, launch: list[Point], sweep_dir: Path, commit, batch_size: int) -> list:
    returns = []
    for start in range(0, len(launch), batch_size):
        batch = launch[start:start + batch_size]
        for point in batch:
            prepare(spec_of(point, sweep_dir, commit))
        jobs = [p.overrides + [f"hydra.sweep.subdir={p.name}"] for p in batch]
        try:
            returns.append(launcher.launch(jobs, initial_job_idx=start))
        except Exception as exc:  # noqa: BLE001 - one dead job must not lose the others
            print(f"warning: launcher raised {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
        record_unfinished(batch, sweep_dir, commit)
    return returns


def launch_slurm(launcher, launch: list[Point], sweep_cfg, sweep_dir: Path, commit, batch_size: int) -> None:
    """One SLURM job per trial, adopted from an earlier run where one is still queued or running."""
    from hydra.core.singleton import Singleton

    from launch.slurm_jobs import JobWatch, make_executor, scancel

    by_name = {p.name: p for p in launch}
    watch = JobWatch(sweep_dir, queue_allowance_s=sweep_cfg.queue_allowance_s,
                     time_limit_min=launch[0].cluster.time_limit_min,
                     record_lost=lambda name, status, reason: write_missing(
                         by_name[name], sweep_dir, commit, status, reason))
    orphans = watch.orphans(list(by_name))
    if orphans and sweep_cfg.cancel_orphans:
        scancel(list(orphans.values()))
        print(f"cancelled {len(orphans)} SLURM job(s) an earlier run left queued or running "
              f"({', '.join(orphans.values())}); their trials are submitted again")
        orphans = {}
    elif orphans:
        print(f"adopting {len(orphans)} SLURM job(s) an earlier run left queued or running "
              f"({', '.join(orphans.values())}); those trials are not submitted again")
    executor = make_executor(launcher) if len(orphans) < len(launch) else None
    try:
        for start in range(0, len(launch), batch_size):
            batch = launch[start:start + batch_size]
            for idx, point in enumerate(batch, start):
                if point.name in orphans:
                    watch.adopt(point.name)
                    continue
                prepare(spec_of(point, sweep_dir, commit))
                overrides = point.overrides + [f"hydra.sweep.subdir={point.name}"]
                try:
                    watch.submit(executor, point.name, launcher, overrides, "hydra.sweep.dir", idx,
                                 f"job_id_for_{idx}", Singleton.get_state())
                except Exception as exc:  # noqa: BLE001 - sbatch refused this one; the others go on
                    last = (str(exc).strip().splitlines() or [""])[-1][:300]
                    write_missing(point, sweep_dir, commit, "error", f"sbatch failed: {type(exc).__name__}: {last}")
            watch.wait([p.name for p in batch])
    except KeyboardInterrupt:
        for name in watch.cancel_open():
            write_missing(by_name[name], sweep_dir, commit, "interrupted",
                          "the sweep was interrupted; its SLURM job was cancelled")
        raise
