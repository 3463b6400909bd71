"""Which layouts can start at all, and which this cluster can run.

`invalid_reason` is a pure function: the reason megatron-core (or arithmetic)
would reject the layout at start-up, or None. `unsupported_reason` says what a
valid layout needs that the cluster lacks (CPU trials cannot run megatron's
CUDA-only parts). Neither imports torch.
"""

from __future__ import annotations

from typing import Optional

from core import choices  # the module, so a test can stand in for fa4_installed
from core.choices import (
    ATTENTION_KERNELS,
    FUSION_CHOICES,
    FUSION_DEFAULTS,
    NORM_KERNELS,
    RECOMPUTE,
    RECOMPUTE_METHODS,
    TRITON_HEAD_DIMS,
)
from core.config import ClusterConfig, Layout, ModelConfig

CPU_FUSIONS = ("wgrad_defer",)  # fusion axes the CPU trial path runs (the rest need CUDA)


def _check_axes(layout: Layout) -> Optional[str]:
    for name in ("tp", "pp", "vpp", "cp", "mbs", "gbs", "recompute_num_layers"):
        value = getattr(layout, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            return f"{name} must be a positive integer, got {value!r}"
    if layout.recompute not in RECOMPUTE:
        return f"recompute must be one of {', '.join(RECOMPUTE)}, got {layout.recompute!r}"
    if layout.recompute_method not in RECOMPUTE_METHODS:
        return f"recompute_method must be uniform or block, got {layout.recompute_method!r}"
    if layout.attention not in ATTENTION_KERNELS:
        return f"attention must be one of {', '.join(ATTENTION_KERNELS)}, got {layout.attention!r}"
    if layout.norm not in NORM_KERNELS:
        return f"norm must be one of {', '.join(NORM_KERNELS)}, got {layout.norm!r}"
    for axis, choices in FUSION_CHOICES.items():
        if getattr(layout, axis) not in choices:
            return f"{axis} must be one of {', '.join(choices)}, got {getattr(layout, axis)!r}"
    return None


def _check_world(layout: Layout, world_size: int) -> Optional[str]:
    model_parallel = layout.tp * layout.pp * layout.cp
    if world_size % model_parallel:
        return (
            f"world size {world_size} is not divisible by tp*pp*cp = "
            f"{layout.tp}*{layout.pp}*{layout.cp} = {model_parallel}"
        )
    return None


def _check_model_split(model: ModelConfig, layout: Layout) -> Optional[str]:
    tp = layout.tp
    if model.num_attention_heads % tp:
        return f"num_attention_heads {model.num_attention_heads} is not divisible by tp {tp}"
    if model.num_query_groups % tp:
        return f"num_query_groups {model.num_query_groups} is not divisible by tp {tp}"
    if model.ffn_hidden_size % tp:
        return f"ffn_hidden_size {model.ffn_hidden_size} is not divisible by tp {tp}"
    if model.num_layers % layout.pp:
        return f"num_layers {model.num_layers} is not divisible by pp {layout.pp}"
    if layout.vpp > 1:
        if layout.pp == 1:
            return "virtual pipeline (vpp > 1) needs pp > 1"
        if model.num_layers % (layout.pp * layout.vpp):
            return (
                f"num_layers {model.num_layers} is not divisible by pp*vpp = "
                f"{layout.pp * layout.vpp}"
            )
    if layout.sequence_parallel:
        if tp == 1:
            return "sequence parallel needs tp > 1"
        if model.seq_length % tp:
            return f"seq_length {model.seq_length} is not divisible by tp {tp} (sequence parallel)"
    if layout.cp > 1:
        # megatron-core's context parallelism runs only inside Transformer Engine's attention.
        return "context parallel (cp > 1) needs Transformer Engine attention, which no kernel here provides"
    return None


def _check_batch(layout: Layout, world_size: int) -> Optional[str]:
    dp = layout.dp(world_size)
    if layout.gbs % (layout.mbs * dp):
        return f"gbs {layout.gbs} is not divisible by mbs*dp = {layout.mbs}*{dp} = {layout.mbs * dp}"
    microbatches = layout.gbs // (layout.mbs * dp)
    if layout.vpp > 1 and microbatches % layout.pp:
        return (
            f"interleaved pipeline needs the number of micro-batches ({microbatches}) "
            f"to be divisible by pp {layout.pp}"
        )
    return None


def _check_recompute(model: ModelConfig, layout: Layout) -> Optional[str]:
    if layout.recompute != "full":
        return None
    layers_per_stage = model.num_layers // layout.pp
    layers_per_chunk = layers_per_stage // layout.vpp
    if layout.recompute_num_layers > layers_per_stage:
        return (
            f"recompute_num_layers {layout.recompute_num_layers} exceeds the "
            f"{layers_per_stage} layers per pipeline stage"
        )
    if layout.recompute_method == "uniform" and layers_per_chunk % layout.recompute_num_layers:
        # Uniform recompute checkpoints groups of recompute_num_layers; a ragged last
        # group is legal in megatron but makes the layout ambiguous to compare.
        return (
            f"uniform recompute groups of {layout.recompute_num_layers} do not divide the "
            f"{layers_per_chunk} layers per model chunk"
        )
    return None


def _check_kernels(model: ModelConfig, layout: Layout) -> Optional[str]:
    if layout.attention == "triton" and model.head_dim not in TRITON_HEAD_DIMS:
        return f"triton attention supports head_dim in {TRITON_HEAD_DIMS}, got {model.head_dim}"
    if layout.attention == "flash_attn":
        return choices.fa4_head_dim_reason(model.head_dim)
    if layout.loss == "fused" and layout.tp > 1:
        return "loss=fused does not split the vocabulary: it needs tp = 1"
    if layout.add_norm == "fused" and layout.norm not in ("triton", "torch"):
        return f"add_norm=fused replaces this project's RMSNorm (norm=triton or torch), got norm={layout.norm}"
    if layout.qkv_grad == "fused" and layout.attention == "megatron":
        return "qkv_grad=fused is our RoPE's backward: it needs an attention of ours (not megatron)"
    return None


def _check_grad_buffer(layout: Layout, world_size: int) -> Optional[str]:
    """grad_buffer=overwrite: a weight gradient written, not added, is right only when one
    micro-batch makes the step (a CUDA graph replays the captured overwrite every time), or
    with wgrad_defer=step, whose flush writes the decoder's gradients once per step (beta 0)
    and whose per-slot graphs bake the overwrite into slot 0's only."""
    if layout.grad_buffer != "overwrite":
        return None
    if layout.pp > 1:
        return "grad_buffer=overwrite needs pp = 1 (one micro-batch per step)"
    if layout.num_microbatches(world_size) != 1 and layout.wgrad_defer != "step":
        return (f"grad_buffer=overwrite needs one micro-batch per step (gbs = mbs * dp), got "
                f"{layout.num_microbatches(world_size)}")
    return None


def _check_wgrad_defer(layout: Layout) -> Optional[str]:
    """wgrad_defer=step keeps slot i for micro-batch i from its forward to the step's flush:
    the no-pipelining schedule only (forward i, backward i, then the next). The DP reduction
    is never overlapped with it (launch.steps.overlap_grad_reduce: the buckets would reduce
    before the flush wrote them), so that is no reason to refuse."""
    if layout.wgrad_defer == "step" and layout.pp > 1:
        return "wgrad_defer=step needs pp = 1 (one chunk, each backward right after its forward)"
    return None


def invalid_reason(model: ModelConfig, layout: Layout, world_size: int) -> Optional[str]:
    """The reason this layout cannot start on `world_size` ranks, or None if it can."""
    reason = _check_axes(layout) or _check_world(layout, world_size)
    if reason:
        return reason
    return (
        _check_model_split(model, layout)
        or _check_batch(layout, world_size)
        or _check_recompute(model, layout)
        or _check_kernels(model, layout)
        or _check_grad_buffer(layout, world_size)
        or _check_wgrad_defer(layout)
    )


def unsupported_reason(cluster: ClusterConfig, layout: Layout) -> Optional[str]:
    """What a valid layout needs that this cluster's trial path cannot give, or None.

    The CPU path (launch/cpu_trial.py) runs megatron-core's own schedules (pp, vpp),
    sequence parallelism, selective and full recompute and DDP over gloo in fp32. What
    still needs CUDA: megatron's optimizer (so the distributed optimizer), CUDA graphs,
    and the attention kernels built on CUDA-only libraries (cuDNN, flash) or, for
    megatron's stock attention, a causal mask and RoPE built on "cuda". Such layouts
    are reported, not faked.
    """
    if layout.cuda_graph and layout.pp > 1:
        return "cuda_graph captures the non-pipelined schedule only (pp = 1)"
    if layout.attention == "flash_attn" and not choices.fa4_installed():
        return choices.FA4_NOT_INSTALLED  # an optional dependency (extra `gpu`), never faked
    if cluster.device == "cuda":
        return None
    needs = []
    if layout.distributed_optimizer:
        needs.append("distributed optimizer")
    if layout.cuda_graph:
        needs.append("CUDA graphs")
    if layout.attention in ("flash_attn", "sdpa_flash", "sdpa_cudnn", "megatron"):
        needs.append(f"attention={layout.attention}")
    # The fusions of issue 17: Triton kernels on GPU tensors, and megatron's optimizer.
    # wgrad_defer runs on CPU too: its GEMMs are kernels.wgrad's fp32 addmm (launch/cpu_trial.py).
    needs += [f"{axis}={getattr(layout, axis)}" for axis, default in FUSION_DEFAULTS.items()
              if getattr(layout, axis) != default and axis not in CPU_FUSIONS]
    if needs:
        return "needs CUDA: " + ", ".join(needs)
    return None
