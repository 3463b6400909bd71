"""This package's kernels in Megatron-LM's own trainer: `pretrain_gpt.py --spec kernels.megatron_lm_spec NAME`.

Megatron-LM (core_v0.16.1, `gpt_builders.py`) imports the object NAME from this module and
hands it to GPTModel as its `transformer_layer_spec`, once per model chunk, with no config.
NAME is `<attention>_attention_<norm>_norm[_triton_swiglu][_fused_add_norm][_fused_qkv_grad][_wgrad_fusion]`
(`core.choices.spec_name`), one per kernel choice of `core.choices`, e.g.
`sdpa_cudnn_attention_triton_norm_wgrad_fusion`; `layout-recommend --format megatron-lm` prints
the whole command.

Each NAME is a decoder block (TransformerBlockSubmodules), not a bare layer spec: given a layer
spec, megatron-core 0.16.1 builds the final norm from its own LNImpl, which without Apex is
torch's and refuses sequence parallelism. A block lists its chunk's layers, and Megatron-LM
passes no config along, so the count is read from Megatron-LM's parsed arguments
(`megatron.training.get_args()`) when the block is built: num_layers / (pp * vpp), the
uniform split, the only one the printed command asks for (uneven splits are refused).

The layers and norms are `kernels.layer_spec`'s, the ones our trials build (launch/model.py);
with add_norm=fused the trials also link the layers after the build (cross-layer add + norm),
which Megatron-LM, building the model itself, does not: only the in-layer fusion applies.
RoPE goes with the attention: our attention kernels rotate q and k themselves, so the command
sets `--position-embedding-type none`; with `attention=megatron` Megatron-LM's RoPE runs.
`_fused_qkv_grad` (layout.qkv_grad=fused, our attention only): that RoPE's backward writes the
q, k, v gradients into one buffer of the QKV projection (kernels.rope; only where q, k, v are
plain views of it, one query head per group, and the Triton kernel runs).

`_wgrad_fusion` (every GPU trial's, kernels.wgrad): the layers' four linears are kernels.wgrad's
and the Triton norms are tagged, so their weight gradients go straight into `main_grad` and
mark `grad_added_to_main_grad`. Megatron-LM's DDP is megatron-core's: it gives every parameter
its `main_grad` and `grad_added_to_main_grad = False`, its hook adds `param.grad` only while
that is False, and Megatron-LM's train_step calls `zero_grad_buffer()` (which resets it) before
every iteration's forward_backward_func (megatron/training/training.py), as our trials do.
GPTModel builds the output layer and the word embedding from megatron's own classes, outside
the spec (our trials swap them after the build): here they keep megatron's gradient, which
DDP's hook adds (correct, not fused). Megatron-LM's --gradient-accumulation-fusion stays off
(it means Apex's extension). On CUDA the bf16 -> fp32 GEMM is torch's addmm with out_dtype;
a torch without it (kernels.wgrad.check fails on the GPU) gets the NAME's layers without the
fusion, as our trials do (kernels.wgrad.available), with one line on stderr, instead of an
error at the first backward.
"""

from __future__ import annotations

import functools
import sys

import torch
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from core.choices import ATTENTION_KERNELS, FUSION_CHOICES, NORM_KERNELS, spec_name
from kernels.layer_spec import applies_rope, layer_spec, norm_module
from kernels import wgrad
from kernels.rope import DEFAULT_BASE as ROPE_BASE  # launch/model.py's, and the printed --rotary-base

# Megatron-LM arguments that split layers unevenly over pipeline stages.
UNEVEN_SPLIT_ARGS = ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                     "pipeline_model_parallel_layout", "account_for_embedding_in_pipeline_split",
                     "account_for_loss_in_pipeline_split")


def layers_per_chunk(args) -> int:
    """Transformer layers in each model chunk of a Megatron-LM run, from its arguments."""
    uneven = [name for name in UNEVEN_SPLIT_ARGS if getattr(args, name, None)]
    if uneven:
        raise ValueError(f"kernels.megatron_lm_spec builds uniform pipeline splits only; "
                         f"drop --{uneven[0].replace('_', '-')}")
    pp = args.pipeline_model_parallel_size
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None) or 1
    if args.num_layers % (pp * vpp):
        raise ValueError(f"--num-layers {args.num_layers} is not divisible by pp*vpp = {pp}*{vpp}")
    return args.num_layers // (pp * vpp)


def _megatron_lm_args():
    try:
        from megatron.training import get_args

        return get_args()
    except (ImportError, AssertionError) as exc:  # not inside Megatron-LM, or before its arguments
        raise RuntimeError("kernels.megatron_lm_spec's specs are for Megatron-LM's pretrain_gpt.py "
                           "--spec (its arguments give the layer count); in megatron-core use "
                           "kernels.layer_spec.block_spec") from exc


@functools.cache
def wgrad_fusion_usable() -> bool:
    """Can this process run kernels.wgrad's fused GEMM where Megatron-LM will train? On a GPU
    only when torch's fp32-output addmm checks out there; without a GPU the linears take the
    plain in-place addmm of an fp32 model (kernels.wgrad.accumulate), which needs nothing."""
    if not torch.cuda.is_available():
        return True
    if wgrad.check("cuda"):
        return True
    print("kernels.megatron_lm_spec: this torch has no fp32-output addmm on the GPU; "
          "_wgrad_fusion builds the layers without it (weight gradients added by DDP's hook)",
          file=sys.stderr)
    return False


class MegatronLMBlock(TransformerBlockSubmodules):
    """A decoder block spec whose layer count comes from Megatron-LM's arguments when built.

    TransformerBlockSubmodules' dataclass __init__ is not called: both of its fields are
    properties here, resolved when megatron-core's TransformerBlock reads them.
    """

    def __init__(self, *, attention: str, norm: str, swiglu: str = "megatron", add_norm: str = "megatron",
                 qkv_grad: str = "megatron", wgrad_fusion: bool = False, rope_base: float = ROPE_BASE):
        self.attention, self.norm, self.rope_base = attention, norm, rope_base
        self.swiglu, self.add_norm, self.qkv_grad, self.wgrad_fusion = swiglu, add_norm, qkv_grad, wgrad_fusion

    @property
    def fused(self) -> bool:
        """The weight-gradient fusion this block builds: the NAME's, where this torch can run it."""
        return self.wgrad_fusion and wgrad_fusion_usable()

    @property
    def layer_specs(self):
        layer = layer_spec(attention=self.attention, norm=self.norm, rope_base=self.rope_base,
                           swiglu=self.swiglu, add_norm=self.add_norm, qkv_grad=self.qkv_grad,
                           wgrad_fusion=self.fused)
        return [layer] * layers_per_chunk(_megatron_lm_args())

    @property
    def layer_norm(self):
        return norm_module(self.norm, wgrad_fusion=self.fused)

    def __repr__(self) -> str:
        return (f"MegatronLMBlock(attention={self.attention!r}, norm={self.norm!r}, swiglu={self.swiglu!r}, "
                f"add_norm={self.add_norm!r}, qkv_grad={self.qkv_grad!r}, wgrad_fusion={self.wgrad_fusion!r})")

    __eq__ = object.__eq__  # the dataclass __eq__ would read both properties
    __hash__ = object.__hash__


# qkv_grad=fused is our RoPE's backward: no NAME pairs it with megatron's attention (sweeper.validity).
SPECS = {spec_name(attention, norm, swiglu, add_norm, qkv_grad, wgrad_fusion):
         MegatronLMBlock(attention=attention, norm=norm, swiglu=swiglu, add_norm=add_norm,
                         qkv_grad=qkv_grad, wgrad_fusion=wgrad_fusion)
         for attention in ATTENTION_KERNELS for norm in NORM_KERNELS
         for swiglu in FUSION_CHOICES["swiglu"] for add_norm in FUSION_CHOICES["add_norm"]
         for qkv_grad in FUSION_CHOICES["qkv_grad"] for wgrad_fusion in (False, True)
         if qkv_grad == "megatron" or applies_rope(attention)}
globals().update(SPECS)  # Megatron-LM looks NAME up in this module's namespace (vars(module)[NAME])
