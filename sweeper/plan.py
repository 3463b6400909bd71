"""From sweep points to a launch plan: what to launch, in which order, and why the rest is not.

Each point is classified once, before anything starts:
- invalid: megatron-core would reject it at start-up (`validity.invalid_reason`);
- skipped: valid, but the cluster's trial path can't run it, or it is predicted
  not to fit in memory (unless pruning is off);
- done: a record from an earlier run of this sweep exists (resume);
- launch: everything else, ordered by predicted MFU, best first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from core.config import ClusterConfig, Layout, ModelConfig, SweepConfig, TrialConfig
from core.record_check import load_record
from core.records import FAILED, NOT_RESULTS, result_path
from core.spec import Prediction
from sweeper.validity import invalid_reason, unsupported_reason


@dataclass(kw_only=True)
class Point:
    model: ModelConfig
    cluster: ClusterConfig
    layout: Layout
    trial: TrialConfig
    overrides: list[str] = field(default_factory=list)
    status: str = "launch"  # launch | invalid | skipped | done
    reason: Optional[str] = None
    damaged: Optional[str] = None  # what is wrong with an earlier record that must be set aside
    previous: Optional[str] = None  # the status of an earlier record this launch replaces
    prediction: Optional[Prediction] = None  # made for every valid point

    @property
    def name(self) -> str:
        return self.layout.name


def prediction_for(model: ModelConfig, cluster: ClusterConfig, layout: Layout, calibration=None) -> Prediction:
    """Predicted peak memory (GiB), fit, step time and MFU (PaLM) for one layout: the one
    place a Prediction is made (the sweep's classify and refit, layout-recommend)."""
    from sweeper.memory import predict_memory
    from sweeper.speed import predict_speed

    memory = predict_memory(model, cluster, layout, calibration)
    speed = predict_speed(model, cluster, layout, calibration)
    return Prediction(
        peak_memory_gb=round(memory.peak_gb, 3),
        reserved_gb=round(memory.reserved_gb, 3),
        allocated_gb=round(memory.allocated_gb, 3),
        fits=memory.fits,
        step_time_s=speed.step_time_s,
        mfu=speed.mfu,
        memory_terms_gb={k: round(v, 3) for k, v in memory.terms.items()},
    )


def classify(point: Point, *, sweep: SweepConfig, sweep_dir: Path, calibration=None) -> None:
    world = point.cluster.world_size
    reason = invalid_reason(point.model, point.layout, world)
    if reason:
        point.status, point.reason = "invalid", reason
        return
    point.prediction = prediction_for(point.model, point.cluster, point.layout, calibration)
    reason = unsupported_reason(point.cluster, point.layout)
    if reason:
        point.status, point.reason = "skipped", reason
        return
    if sweep.prune_predicted_oom and not point.prediction.fits:
        point.status = "skipped"
        point.reason = (
            f"predicted OOM: {point.prediction.peak_memory_gb:.1f} GiB > "
            f"{point.cluster.gpu_memory_gb:.1f} GiB"
        )
        return
    previous, point.damaged = load_record(result_path(sweep_dir / point.name))
    if previous is None:
        return
    status = previous["status"]
    point.previous = status
    if status in ("invalid", "skipped") or status in NOT_RESULTS:
        return  # re-checked above, or not a result of the layout (interrupted, lost): run it
    if not (sweep.rerun_failed and status in FAILED):
        point.status, point.reason = "done", f"recorded earlier as {status}"


def order(points: list[Point], max_trials: Optional[int] = None) -> list[Point]:
    """Launchable points, highest predicted MFU first (ties keep sweep order).

    With `max_trials`, the rest are skipped with their predicted rank as the reason:
    GPU hours go to the layouts most likely to win.
    """
    launch = [p for p in points if p.status == "launch"]
    launch.sort(key=lambda p: -(p.prediction.mfu if p.prediction else 0.0))
    if max_trials is not None:
        for rank, point in enumerate(launch[max_trials:], max_trials + 1):
            point.status = "skipped"
            point.reason = (f"outside the top {max_trials} by predicted MFU "
                            f"(rank {rank}, {100 * point.prediction.mfu:.1f}%)")
        launch = launch[:max_trials]
    return launch


def summary_lines(points: list[Point]) -> list[str]:
    counts = {}
    for p in points:
        counts[p.status] = counts.get(p.status, 0) + 1
    lines = [
        f"{len(points)} layouts: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    ]
    reasons = {}
    for p in points:
        if p.status in ("invalid", "skipped"):
            prefixes = ("needs CUDA", "predicted OOM", "outside the top")
            key = p.reason.split(":")[0].split(" (rank")[0] if p.reason.startswith(prefixes) else p.reason
            reasons[key] = reasons.get(key, 0) + 1
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {n:4d} x {reason}")
    return lines


def launch_lines(launch: list[Point]) -> list[str]:
    """The trials a sweep would launch, in launch order, with their predictions."""
    lines = []
    for i, p in enumerate(launch, 1):
        pred = p.prediction
        mfu = f"{100 * pred.mfu:.1f}%" if pred else "?"
        mem = f"{pred.peak_memory_gb:.1f} GiB" if pred else "?"
        lines.append(f"  {i:3d}. {p.name}  predicted MFU {mfu}, peak {mem}")
    return lines
