"""The memory and speed models' constants, their per-GPU presets, and `calibration.json`.

Defaults are for megatron-core on one H100 SXM in bf16, set from the baselines in
`shared/anchors/` (1.36B Llama, stock local spec, SDPA attention, torch Adam);
`cpu_calibration()` holds the CPU (gloo, fp32) trial path's. sweeper/memory.py and
sweeper/speed.py read them; sweeper/calibration.py refits them from a sweep's trials
and writes `calibration.json` next to its results, so the next sweep on that cluster
starts from the fit:

    save_calibration(cal, sweep_dir / "calibration.json")
    cal = load_calibration(sweep_dir / "calibration.json")
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from core.choices import ATTENTION_KERNELS
from core.config import ClusterConfig, ConfigError
from core.records import write_text_atomic


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
    # attention table (flash-attn-4 1.11x cuDNN); ours from bench_attention on the H200
    # (attention_h200_2026-12-02_v2.json: fwd+bwd 0.86-1.02x cuDNN over the four shapes,
    # 0.92x their geometric mean; it was 0.73x before the Gluon forward and the dS-stash
    # backward). For "megatron" (unfused): the efficiency of its batched matmuls over the
    # whole s x s; its softmax costs bytes.
    attention_efficiency: dict = field(
        default_factory=lambda: {"triton": 0.355, "flash_attn": 0.43, "sdpa": 0.22,
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
