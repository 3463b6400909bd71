"""The fit of the memory and speed models' constants (sweeper/constants.py) to measured trials.

A sweep refits them from its own trials and writes `calibration.json` next to its
results (sweeper.constants.save_calibration), so the next sweep on that cluster
starts from the fit:

    cal = fit_calibration(records, model, cluster)   # records: see fit_calibration

The fit is robust, not least squares: speed constants are scaled by the median over
trials of measured / predicted for the part of the prediction they govern, memory is
a Theil-Sen line (medians of pairwise slopes). A handful of trials, some of them odd
(a slow node, a leaky process), cannot drag a median far, and every constant keeps
a physical meaning.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Iterable, Optional

from core.choices import ATTENTION_KERNELS
from core.config import ClusterConfig, Layout, ModelConfig
from core.records import PEAK_MEMORY_MAX, PeakMemory
from sweeper.constants import Calibration, default_calibration
from sweeper.memory import predict_memory
from sweeper.speed import predict_speed

# A ratio outside these bounds means the model is wrong, not that a constant is off.
SCALE_BOUNDS = (0.2, 5.0)
MIN_LINE_POINTS = 5  # activation-bound trials before the memory fit takes an offset too
MAX_FRAGMENTATION = 0.5


def _layout(data) -> Optional[tuple[Layout, Optional[int]]]:
    """The record's layout and its dp if it names one; None if it is not a layout."""
    if not isinstance(data, dict):
        return None
    data = dict(data)
    dp = data.pop("dp", None)
    known = {f.name for f in dataclasses.fields(Layout)}
    if set(data) - known or not (dp is None or isinstance(dp, int) and dp > 0):
        return None
    return Layout(**data), dp


def _clamp(x: float, low: float, high: float) -> float:
    return min(max(x, low), high)


def measured_memory(record: dict, device: Optional[str] = None) -> tuple[Optional[float], Optional[float], Optional[float]]:
    """(allocated, reserved, device used) GiB, max over ranks, from a trial record's own fields.

    The trial's one memory peak is `peak_memory_gb_max` (core.records.PEAK_MEMORY_MAX): on
    CUDA torch.cuda.max_memory_reserved, the reserved figure here; the allocated and
    device-used parts come from each rank's PeakMemory fields (PeakMemory.from_rank). On
    CPU (`device`, default the record's cluster's) that peak is the RSS, returned as the
    allocated figure (the fit compares it with MemoryEstimate.peak_gb). A CUDA record
    without the allocated part gives no allocated figure: its reserved peak is never
    taken for the allocated one.
    """
    device = device or (record.get("cluster") or {}).get("device")
    peak = record.get(PEAK_MEMORY_MAX)
    peak = peak if isinstance(peak, (int, float)) and not isinstance(peak, bool) and peak > 0 else None
    if device == "cpu":
        return peak, None, None
    parts = [PeakMemory.from_rank(r) for r in record.get("ranks") or [] if isinstance(r, dict)]
    parts = [p for p in parts if p is not None]
    used = [p.device_used_gb for p in parts if p.device_used_gb is not None]
    return (max(p.allocated_gb for p in parts) if parts else None), peak, (max(used) if used else None)


def _usable(records: Iterable[dict], status: str, key: str, device: str) -> list[tuple]:
    """(layout, dp or None, value, record) of the records with this status and a usable layout.

    key "memory": the allocated peak (measured_memory); else the record's field.
    """
    out = []
    for r in records:
        parsed = _layout(r.get("layout"))
        if parsed is None or r.get("status") != status:
            continue
        value = measured_memory(r, device)[0] if key == "memory" else r.get(key)
        if status == "ok" and not (isinstance(value, (int, float)) and value > 0):
            continue
        out.append((*parsed, value, r))
    return out


def _theil_sen(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Slope and intercept of y = a*x + b: medians of pairwise slopes, then of residuals."""
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points)
              for x2, y2 in points[i + 1:] if abs(x2 - x1) > 1e-9 * max(abs(x1), abs(x2))]
    if not slopes:  # one point, or all at the same x: a ratio through the origin
        return statistics.median(y / x for x, y in points), 0.0
    slope = statistics.median(slopes)
    return slope, statistics.median(y - slope * x for x, y in points)


def _fit_memory(cal: Calibration, ok, oom, model, cluster) -> dict:
    # Each trial: measured allocator peak = static + offset + scale * x, where x is the
    # predicted activations at scale 1. (On CPU the RSS includes the overhead: undo it.)
    points, optimizer_bound = [], []
    for layout, dp, measured, _ in ok:
        est = predict_memory(model, cluster, layout, cal, dp=dp)
        if cluster.device == "cpu":
            fixed = est.peak_gb - est.allocated_gb * (1 + cal.fragmentation)
            measured = (measured - fixed) / (1 + cal.fragmentation)
        x = est.dynamic_gb / cal.activation_scale
        static = est.allocated_gb - cal.memory_offset_gb - est.dynamic_gb
        if est.phase == "activations" and x > 0:
            points.append((x, measured - static))
        else:
            optimizer_bound.append(measured - static)
    if len(points) >= MIN_LINE_POINTS:
        slope, intercept = _theil_sen(points)
        cal.activation_scale = _clamp(slope, *SCALE_BOUNDS)
        residuals = [y - cal.activation_scale * x for x, y in points] + optimizer_bound
        cal.memory_offset_gb = statistics.median(residuals)
    elif points:
        # Too few trials to tell a slope from an offset (on the H200 check's 3 trials a
        # fitted offset of 0.6 GiB came from one trial's 0.4 GiB residual): the scale
        # alone, through the base's offset.
        offset = cal.memory_offset_gb
        cal.activation_scale = _clamp(statistics.median((y - offset) / x for x, y in points), *SCALE_BOUNDS)
    elif optimizer_bound:
        cal.memory_offset_gb = statistics.median(optimizer_bound)
    # The allocator's overhead and the memory outside it are measured, not guessed:
    # reserved / allocated, and the device's used memory minus reserved (CUDA only).
    if cluster.device == "cuda":
        ratios, outside = [], []
        for _, _, allocated, record in ok:
            _, reserved, used = measured_memory(record, cluster.device)
            if reserved and reserved >= allocated:
                ratios.append(reserved / allocated - 1)
                if used and used > reserved:
                    outside.append(used - reserved)
        if ratios:
            cal.fragmentation = _clamp(statistics.median(ratios), 0.0, MAX_FRAGMENTATION)
        if outside:
            cal.framework_gb = statistics.median(outside)
    # A trial that ran out of memory where a fit was predicted: raise the margin until
    # it is predicted not to fit, so every layout predicted to need as much is skipped.
    # Never narrow it: a false OOM costs a skipped trial, a false fit a crashed one.
    for layout, dp, _, _ in oom:
        est = predict_memory(model, cluster, layout, cal, dp=dp)
        if est.fits:
            cal.oom_margin_gb += cluster.gpu_memory_gb - est.peak_gb - cal.oom_margin_gb + 0.005
    return {"memory_activation_bound": len(points), "memory_optimizer_bound": len(optimizer_bound)}


def _fit_speed(cal: Calibration, ok, model, cluster) -> dict:
    by_kernel: dict[str, list[float]] = {}
    launch = []
    for layout, dp, measured, _ in ok:
        est = predict_speed(model, cluster, layout, cal, dp=dp)
        t = est.terms
        fixed = est.step_time_s - t["compute"] - t["launch"] - t["bubble"]
        scalable = t["compute"] + t["launch"] + t["bubble"]
        ratio = (measured - fixed) / scalable
        if t["launch"] > 0:
            launch.append(ratio)  # host bound: the host's time per layer is off
        else:
            by_kernel.setdefault(layout.attention, []).append(ratio)
    everything = [r for rs in by_kernel.values() for r in rs]
    overall = statistics.median(everything) if everything else 1.0
    for kernel in ATTENTION_KERNELS:
        ratio = statistics.median(by_kernel[kernel]) if kernel in by_kernel else overall
        cal.compute_scale[kernel] = _clamp(cal.compute_scale.get(kernel, 1.0) * ratio, *SCALE_BOUNDS)
    if launch:
        ratio = _clamp(statistics.median(launch), *SCALE_BOUNDS)
        cal.launch_per_layer_s *= ratio
        cal.launch_per_microbatch_s *= ratio
        cal.kernel_launch_per_layer_s = {k: v * ratio for k, v in cal.kernel_launch_per_layer_s.items()}
        cal.eager_step_host_s *= ratio
    return {"speed_compute_bound": len(everything), "speed_launch_bound": len(launch)}


def fit_calibration(records: list[dict], model: ModelConfig, cluster: ClusterConfig,
                    base: Optional[Calibration] = None) -> Calibration:
    """Refit the constants to measured trials.

    Each record: a trial record (core.records.TrialRecord's keys; at least "layout",
    "status", "step_time_s" and the memory fields). Memory is read by `measured_memory`
    from the fields the trial wrote: on CUDA the ranks' allocated part of the peak
    (PeakMemory.allocated_gb, torch.cuda.max_memory_allocated), compared with
    `MemoryEstimate.allocated_gb`, and the trial's peak `peak_memory_gb_max` (reserved)
    for the fragmentation; on CPU the peak RSS `peak_memory_gb_max`, compared with
    `peak_gb`. Records with another status, or without a number, are skipped.

    Memory: measured = static + memory_offset_gb + activation_scale * activations,
    fitted by Theil-Sen (the median of pairwise slopes, then the median residual;
    one trial gives a plain ratio) over the trials whose peak is in the activations;
    `fragmentation` and `framework_gb` are the medians of reserved/allocated - 1 and of
    used - reserved where the records carry them; then `oom_margin_gb` grows until
    every OOM trial is predicted not to fit.
    Speed: per attention kernel, `compute_scale` *= median of (measured - comm -
    optimizer) / (compute + bubble) over GPU-bound trials (kernels without trials
    take the median of all); host-bound trials scale the launch constants alike.
    A layout dict may carry "dp" (else it is derived from the cluster).
    """
    cal = dataclasses.replace(base or default_calibration(cluster))
    cal.attention_efficiency = dict(cal.attention_efficiency)
    cal.norm_efficiency = dict(cal.norm_efficiency)
    cal.compute_scale = dict(cal.compute_scale)
    cal.kernel_launch_per_layer_s = dict(cal.kernel_launch_per_layer_s)
    records = list(records)
    ok_memory = _usable(records, "ok", "memory", cluster.device)
    ok_speed = _usable(records, "ok", "step_time_s", cluster.device)
    oom = _usable(records, "oom", "memory", cluster.device)
    counts = {"cluster": cluster.name, "model": model.name, "ok": len(ok_memory), "oom": len(oom)}
    counts.update(_fit_memory(cal, ok_memory, oom, model, cluster))
    counts.update(_fit_speed(cal, ok_speed, model, cluster))
    cal.source = counts
    return cal
