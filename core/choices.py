"""The kernel and recompute choices of a layout, as `Literal` types and their tuples.

The `Literal` is the one definition; each tuple is `typing.get_args` of it, in the order
the sweeper and the docs list them. Also here, because the sweeper must know them without
importing torch or the kernels: the head dims the Triton attention kernel is compiled for
(kernels/attention.py checks its inputs against this tuple) and whether flash-attn-4 is
installed (found on the path, never imported).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal, Optional, get_args

AttentionKernel = Literal["triton", "flash_attn", "sdpa", "sdpa_flash", "sdpa_cudnn", "megatron"]
NormKernel = Literal["triton", "torch", "megatron"]
Recompute = Literal["none", "selective", "full"]
RecomputeMethod = Literal["uniform", "block"]
# Errors a trial can plant on purpose, so a check can be seen to fail (launch/divergence.py).
Plant = Literal["nan_weights", "non_causal", "perturb_weight"]
# The fusion axes of a layout (issue 17): the first choice is megatron-core's own path.
SwigluKernel = Literal["megatron", "triton"]
LossKernel = Literal["megatron", "fused"]
OptimizerStep = Literal["megatron", "flat"]
AddNorm = Literal["megatron", "fused"]
# fused: our RoPE's backward writes dq, dk, dv into one gradient of the fused QKV projection
# (kernels/rope.py RoPEQKVFunction) instead of megatron's split concatenating them.
QkvGrad = Literal["megatron", "fused"]
# overwrite: with one micro-batch per step, our linears' weight-gradient GEMMs write their fp32
# gradient (beta 0) instead of adding to a zeroed one (kernels/wgrad.py).
GradBuffer = Literal["megatron", "overwrite"]
# fused: the word embedding's backward adds its gradient rows straight into the fp32 main_grad
# (kernels/embedding.py) instead of a dense bf16 [vocab, hidden] gradient DDP then adds.
EmbeddingGrad = Literal["megatron", "fused"]
# step: the decoder linears keep each micro-batch's input and output gradient in per-weight
# arenas and compute their weight gradients once per step, K = all the step's tokens
# (kernels/wgrad_defer.py); off: one accumulating GEMM per micro-batch (kernels/wgrad.py).
WgradDefer = Literal["off", "step"]
Device = Literal["cpu", "cuda"]  # a cluster's trial path: gloo on CPU, nccl on CUDA

ATTENTION_KERNELS = get_args(AttentionKernel)
NORM_KERNELS = get_args(NormKernel)
RECOMPUTE = get_args(Recompute)
RECOMPUTE_METHODS = get_args(RecomputeMethod)
PLANTS = get_args(Plant)
FUSION_TYPES = {"swiglu": SwigluKernel, "loss": LossKernel, "optimizer_step": OptimizerStep,
                "add_norm": AddNorm, "qkv_grad": QkvGrad, "grad_buffer": GradBuffer,
                "embedding_grad": EmbeddingGrad, "wgrad_defer": WgradDefer}
FUSION_CHOICES = {axis: get_args(kind) for axis, kind in FUSION_TYPES.items()}
FUSION_DEFAULTS = {axis: choices[0] for axis, choices in FUSION_CHOICES.items()}
# How a fusion that is not the default appears in a trial's name (core.config.Layout.name).
FUSION_TAGS = {"swiglu": "swiglu", "loss": "loss", "optimizer_step": "opt", "add_norm": "addnorm",
               "qkv_grad": "qkv", "grad_buffer": "gradbuf", "embedding_grad": "embgrad",
               "wgrad_defer": "defer"}


def spec_name(attention: str, norm: str, swiglu: str = "megatron", add_norm: str = "megatron",
              qkv_grad: str = "megatron", wgrad_fusion: bool = False) -> str:
    """The name of a layout's spec object in kernels/megatron_lm_spec.py (`--spec MODULE NAME`):
    `<attention>_attention_<norm>_norm[_triton_swiglu][_fused_add_norm][_fused_qkv_grad][_wgrad_fusion]`."""
    return (f"{attention}_attention_{norm}_norm" + ("" if swiglu == "megatron" else f"_{swiglu}_swiglu")
            + ("" if add_norm == "megatron" else f"_{add_norm}_add_norm")
            + ("" if qkv_grad == "megatron" else f"_{qkv_grad}_qkv_grad")
            + ("_wgrad_fusion" if wgrad_fusion else ""))


# Head dims kernels/attention.py's Triton kernel is compiled for (its _check_inputs).
TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)
# On a GPU, at these head dims its backward stores dS in a scratch of at most this many
# bytes (whole KV heads; beyond it they run in chunks): kernels/attention.py's
# DKDV_STASH_CONFIGS and DS_SCRATCH_BYTES, and the memory model's attention transient.
TRITON_DS_STASH_HEAD_DIMS = (128,)
TRITON_DS_SCRATCH_BYTES = 1 << 30


def ds_stash_stride(seqlen: int) -> int:
    """Row stride of the dS scratch, in elements: 16-byte rows for tensor descriptors."""
    return -(-seqlen // 8) * 8


def ds_bytes_per_kv_head(group: int, seqlen: int, elem_size: float) -> float:
    """dS of one KV head's `group` query heads: the scratch's smallest chunk."""
    return group * seqlen * ds_stash_stride(seqlen) * elem_size


def ds_stash_heads(kv_heads: int, group: int, seqlen: int, elem_size: float,
                   cap: float = TRITON_DS_SCRATCH_BYTES) -> int:
    """KV heads per chunk of the dS scratch: as many as fit `cap`, at most `kv_heads`;
    0 where one alone does not fit (the backward then runs without the scratch)."""
    return int(min(kv_heads, cap // ds_bytes_per_kv_head(group, seqlen, elem_size)))

# flash-attn-4 (optional extra `gpu`): SM90 limits of 4.0.0b36 (`_validate_head_dims`):
# 16-byte multiples of bf16/fp16 elements, at most 256.
FA4_NOT_INSTALLED = "flash-attn-4 not installed"
FA4_HEAD_DIM_MIN, FA4_HEAD_DIM_MAX, FA4_HEAD_DIM_MULTIPLE = 8, 256, 8


def fa4_installed() -> bool:
    """Whether `flash_attn.cute` is on the path, found without importing it (its import
    loads torch and the CuTe DSL). flash-attn-4 ships `flash_attn` as a namespace package."""
    try:
        spec = importlib.util.find_spec("flash_attn")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(os.path.isfile(os.path.join(loc, "cute", "interface.py"))
               for loc in spec.submodule_search_locations)


def fa4_head_dim_reason(head_dim: int) -> Optional[str]:
    """Why flash-attn-4 cannot take this head dim on Hopper, or None."""
    if FA4_HEAD_DIM_MIN <= head_dim <= FA4_HEAD_DIM_MAX and head_dim % FA4_HEAD_DIM_MULTIPLE == 0:
        return None
    return (f"flash_attn attention supports head_dim {FA4_HEAD_DIM_MIN}..{FA4_HEAD_DIM_MAX} in steps "
            f"of {FA4_HEAD_DIM_MULTIPLE} (flash-attn-4 on SM90), got {head_dim}")
