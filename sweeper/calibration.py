"""The memory and speed models' constants, their defaults, and their fit to measured trials.

Defaults are for megatron-core on one H100 SXM in bf16, set from the baselines in
`shared/anchors/` (1.36B Llama, stock local spec, SDPA attention, torch Adam);
`cpu_calibration()` holds the CPU (gloo, fp32) trial path's. A sweep refits them
from its own trials and writes `calibration.json` next to its results, so the next
sweep on that cluster starts from the fit:

    cal = fit_calibration(records, model, cluster)   # records: see fit_calibration
    save_calibration(cal, sweep_dir / "calibration.json")
    cal = load_calibration(sweep_dir / "calibration.json")

The fit is robust, not least squares: speed constants are scaled by the median over
trials of measured / predicted for the part of the prediction they govern, memory is
a Theil-Sen line (medians of pairwise slopes). A handful of trials, some of them odd
(a slow node, a leaky process), cannot drag a median far, and every constant keeps
a physical meaning.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from core.choices import ATTENTION_KERNELS
from core.config import ClusterConfig, ConfigError, Layout, ModelConfig
from core.records import write_text_atomic

# A ratio outside these bounds means the model is wrong, not that a constant is off.
SCALE_BOUNDS = (0.2, 5.0)
MIN_LINE_POINTS = 5  # activation-bound trials before the memory fit takes an offset too
MAX_FRAGMENTATION = 0.5


def _per_kernel(value: float) -> dict:
    return {k: value for k in ATTENTION_KERNELS}


@dataclass(kw_only=True)
class Calibration:
    """Constants of the memory and speed models. Units are in the names."""

    # --- memory ---
    # Multiplies predicted activations (saved tensors, workspaces, logits).
    activation_scale: float = 1.0
    # Added to the allocator peak; the fit's median residual.
    memory_offset_gb: float = 0.0
    # Allocator peak -> reserved: caching-allocator fragmentation, as a fraction.
    fragmentation: float = 0.03
    # Device memory outside the allocator: CUDA context, cuBLAS/cuDNN handles. The H100
    # sweep's trials (2026-11-23) measure 2.83 GiB (mem_get_info used - max reserved).
    framework_gb: float = 2.8
    # NCCL buffers per communicator in use (tp, cp, dp, pp each open one).
    comm_buffer_gb: float = 0.25
    # Added to the device peak when deciding `fits` only (not to the predicted peak):
    # grown by the fit until every trial that ran out of memory is predicted not to fit.
    oom_margin_gb: float = 0.0
    # Optimizer-step temporaries per parameter of the optimizer shard: torch's
    # foreach Adam holds a sqrt(v) copy (4, fp32). 0 for a fused Adam: the GPU trial
    # path's (torch fused), apex's and TE's.
    optimizer_temp_bytes: float = 0.0

    # --- speed ---  (defaults: one H100 SXM; see PRESETS for the other GPUs)
    # Large bf16 GEMM efficiency (fraction of peak); it falls off for small GEMMs:
    # eff = gemm_efficiency * T/(T + gemm_half_tokens) * W/(W + gemm_half_width)
    # for T tokens per micro-batch and a hidden size per TP rank of W. The H200 profile
    # (anchors, 2026-12-01) runs llama_1b3's GEMMs at 707 TFLOP/s (0.715 of 989.4) at
    # 16384 tokens and 655 at 2048: gemm_half_tokens 190.
    gemm_efficiency: float = 0.77
    gemm_half_tokens: float = 190.0
    gemm_half_width: float = 128.0
    # Fused attention, model FLOPs (causal halved, fwd+bwd = 3x fwd) per second as a
    # fraction of peak, when (batch x heads per rank) is large; it falls as
    # B/(B + attention_half_heads): the H200 profile has cuDNN at 358 TFLOP/s at mbs 8
    # (16 heads) and 253 at mbs 1. Kernel ratios from the H100 sweep and the anchors'
    # attention table (ours 0.73x cuDNN, flash-attn-4 1.11x). For "megatron" (unfused):
    # the efficiency of its batched matmuls over the whole s x s; its softmax costs bytes.
    attention_efficiency: dict = field(
        default_factory=lambda: {"triton": 0.28, "flash_attn": 0.43, "sdpa": 0.22,
                                 "sdpa_flash": 0.22, "sdpa_cudnn": 0.385, "megatron": 0.50}
    )
    attention_half_heads: float = 8.0
    # RMSNorm's achieved fraction of memory_bandwidth_tbps (fwd+bwd counted as 10 bytes
    # per element): the H200 profile's Triton norm 16.5 ms for 32 GB.
    norm_efficiency: dict = field(
        default_factory=lambda: {"triton": 0.46, "torch": 0.42, "megatron": 0.30}
    )
    # Device memory bandwidth for elementwise ops and the optimizer, TB/s: the anchors'
    # measured device copy (read + written).
    memory_bandwidth_tbps: float = 3.0
    # Bytes moved per parameter of the optimizer shard per step: torch's fused Adam, grad
    # clipping and the bf16 copy back (the H200 profile: 21 ms for 1.36B parameters).
    optimizer_bytes_per_param: float = 65.0
    # layout.optimizer_step="flat" (kernels/adamw.py): AdamW and the bf16 copy in one pass
    # (reads fp32 weight, grad, two moments; writes three and the bf16 weight: 30 B), and
    # one foreach norm (4): 34 B, at 0.9 of copy.
    flat_optimizer_bytes_per_param: float = 38.0
    # Eager host-side time per layer per micro-batch (fwd+bwd) and per micro-batch: a
    # micro-batch takes max(GPU time, host time). The H100 sweep's eager stock-kernel
    # trials run at about 104 ms per micro-batch of 24 layers; CUDA graphs remove it.
    launch_per_layer_s: float = 3.5e-3
    launch_per_microbatch_s: float = 8.0e-3
    # Extra host time per layer of some kernels ("part:kernel"): Triton's Python launch
    # path (our norm, two per layer, and attention), megatron's stock attention (unfused
    # RoPE and softmax: more, smaller kernels). From the H100 sweep's eager trials.
    kernel_launch_per_layer_s: dict = field(default_factory=lambda: {
        "norm:triton": 0.6e-3, "attention:triton": 0.7e-3, "attention:megatron": 1.1e-3})
    # Host time per step a host-bound eager step waits for (optimizer and grad-norm
    # launches): eager gbs 4 and gbs 16 trials of one layout differ by it (H100 sweep).
    eager_step_host_s: float = 0.045
    # GPU idle per micro-batch and per step (optimizer launch, grad-norm sync): the H200
    # profile's idle 10 ms at 2 micro-batches, 26 ms at 16.
    microbatch_idle_s: float = 1.1e-3
    step_overhead_s: float = 8.0e-3
    # Achieved fraction of the preset's bus bandwidth, and a fixed cost per collective.
    comm_efficiency: float = 0.75
    comm_latency_s: float = 2.0e-5
    # Fraction of the DP gradient reduction hidden behind backward. The trial path (and
    # Megatron-LM's --overlap-grad-reduce) overlaps it bucket by bucket when eager; a CUDA
    # graph step reduces after the graph (none hidden). 0.7: the last buckets and the
    # slowdown of the overlapped GEMMs stay exposed; not yet measured on multi-GPU trials.
    dp_overlap: float = 0.7
    # Per attention kernel: measured / predicted micro-batch time, from the fit.
    compute_scale: dict = field(default_factory=lambda: _per_kernel(1.0))

    # What the constants were fitted from (cluster, trial counts); empty for defaults.
    source: dict = field(default_factory=dict)

    @property
    def memory_bytes_per_s(self) -> float:
        return self.memory_bandwidth_tbps * 1e12


def cpu_calibration() -> Calibration:
    """Defaults for the CPU trial path: fp32, torch AdamW, gloo, a process's RSS."""
    return Calibration(
        fragmentation=0.10,  # glibc malloc keeps freed arenas in the RSS
        framework_gb=0.45,  # RSS of a process that imported torch and megatron-core
        comm_buffer_gb=0.0,
        optimizer_temp_bytes=0.0,  # single-tensor AdamW: one tensor's temporaries
        gemm_efficiency=0.5,
        gemm_half_tokens=64.0,
        gemm_half_width=32.0,
        attention_efficiency=_per_kernel(0.2),
        norm_efficiency={"triton": 0.2, "torch": 0.5, "megatron": 0.5},
        memory_bandwidth_tbps=0.01,
        optimizer_bytes_per_param=60.0,
        launch_per_layer_s=1.0e-3,
        launch_per_microbatch_s=2.0e-3,
        microbatch_idle_s=0.0,
        step_overhead_s=0.0,
        comm_efficiency=0.5,
        comm_latency_s=1.0e-4,
    )


# Per GPU: what differs from the H100 defaults. H200: same compute, the anchors'
# measured copy 4.25 TB/s. A100 80GB SXM (published figures, not measured here): dense
# bf16 312 TFLOP/s, cuBLAS near 0.88 of it at 8192^3 and less at training shapes (0.84
# before the small-GEMM fall-off), flash attention fwd+bwd about 0.5, copy about 1.7 TB/s.
PRESETS = {
    "h100": {},
    "h200": {"memory_bandwidth_tbps": 4.25},
    "a100": {"gemm_efficiency": 0.84, "memory_bandwidth_tbps": 1.7,
             "attention_efficiency": {"triton": 0.40, "flash_attn": 0.55, "sdpa": 0.50,
                                      "sdpa_flash": 0.50, "sdpa_cudnn": 0.50, "megatron": 0.60}},
}


def gpu_kind(cluster: ClusterConfig) -> str:
    """Which preset's constants: read from the explicit peak and memory, never a GPU name.

    A dense bf16 peak under 500 TFLOP/s is an A100-class part; over 100 GiB of memory at
    H100-class compute is an H200; else an H100.
    """
    if cluster.device == "cpu":
        return "cpu"
    if cluster.peak_tflops < 500.0:
        return "a100"
    return "h200" if cluster.gpu_memory_gb > 100.0 else "h100"


RETIRED = {"norm_bandwidth_tbps"}  # constants of earlier models, ignored in old files


def default_calibration(cluster: ClusterConfig) -> Calibration:
    kind = gpu_kind(cluster)
    if kind == "cpu":
        return cpu_calibration()
    cal = Calibration(**PRESETS[kind])
    cal.source = {"preset": kind}
    return cal


def save_calibration(cal: Calibration, path) -> None:
    write_text_atomic(path, json.dumps(dataclasses.asdict(cal), indent=2, sort_keys=True) + "\n")


def load_calibration(path) -> Calibration:
    """A calibration from JSON; missing constants keep their defaults."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a calibration must be a JSON object")
    cal = Calibration()
    known = {f.name for f in dataclasses.fields(Calibration)}
    for key, value in data.items():
        if key in RETIRED:
            continue
        if key not in known:
            raise ConfigError(f"{path}: unknown calibration constant {key!r}")
        default = getattr(cal, key)
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {key} must be an object")
            value = {**default, **value}
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: {key} must be a number, got {value!r}")
        setattr(cal, key, value)
    return cal


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


def measured_memory(record: dict) -> tuple[Optional[float], Optional[float], Optional[float]]:
    """(max_memory_allocated, max_memory_reserved, device memory used) in GiB, max over ranks.

    GPU records carry `peak_memory_allocated_gb` and `mem_get_info_used_gb` per rank and
    the reserved peak as `peak_memory_gb_max`; a record with only a number in
    `peak_memory_gb` (CPU: the RSS; or a hand-made one) gives that as the allocated peak.
    """
    def largest(key):
        values = [r.get(key) for r in record.get("ranks") or [] if isinstance(r, dict)]
        values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return max(values) if values else None

    def number(value):
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None

    allocated = largest("peak_memory_allocated_gb")
    reserved = number(record.get("peak_memory_gb_max"))
    if allocated is None:
        allocated = number(record.get("peak_memory_gb"))
    return allocated, reserved, largest("mem_get_info_used_gb")


def _usable(records: Iterable[dict], status: str, key: str) -> list[tuple]:
    """(layout, dp or None, value, record) of the records with this status and a usable layout.

    key "memory": the allocated peak (measured_memory); else the record's field.
    """
    out = []
    for r in records:
        parsed = _layout(r.get("layout"))
        if parsed is None or r.get("status") != status:
            continue
        value = measured_memory(r)[0] if key == "memory" else r.get(key)
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
    from sweeper.memory import predict_memory  # memory imports this module

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
            _, reserved, used = measured_memory(record)
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
    from sweeper.speed import predict_speed

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

    Each record: a trial record (launch.record) or {"layout": {Layout fields}, "status":
    "ok" | "oom" | ..., "step_time_s": s, "peak_memory_gb": GiB}; memory is read by
    `measured_memory`: on CUDA the allocator's peak (max_memory_allocated), compared with
    `MemoryEstimate.allocated_gb`; on CPU the RSS, compared with `peak_gb`. Records with
    another status, or without a number, are skipped.

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
    ok_memory = _usable(records, "ok", "memory")
    ok_speed = _usable(records, "ok", "step_time_s")
    oom = _usable(records, "oom", "memory")
    counts = {"cluster": cluster.name, "model": model.name, "ok": len(ok_memory), "oom": len(oom)}
    counts.update(_fit_memory(cal, ok_memory, oom, model, cluster))
    counts.update(_fit_speed(cal, ok_speed, model, cluster))
    cal.source = counts
    return cal
