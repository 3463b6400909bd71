"""The project's megatron-core layer spec, with the kernel choice of a layout.

Kernels enter through `ModuleSpec`, never by patching megatron: a layout's
`attention` picks the core-attention module and its `norm` picks the module
for every norm, the final one included. `attention="megatron", norm="megatron"`
is megatron-core's stock local spec, the baseline. `wgrad_fusion=True` (a GPU trial's
choice, launch.gpu_trial) swaps the layer's four linears for kernels.wgrad's, whose
weight gradients accumulate straight into DDP's fp32 buffers, and so do the Triton norms'.

RoPE goes with the attention: our core-attention modules apply it themselves (one
fused kernel, kernels.rope), megatron's applies its own. `applies_rope` says which,
so the model builder can switch megatron's off (position_embedding_type="none").
"""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

SDPA_BACKENDS = {"sdpa": "auto", "sdpa_flash": "flash", "sdpa_cudnn": "cudnn"}
OUR_ATTENTION = ("triton", "flash_attn", *SDPA_BACKENDS)


def applies_rope(attention: str) -> bool:
    """Whether this attention's core-attention module applies RoPE itself (ours do);
    when False, megatron's GPTModel must apply it (position_embedding_type="rope")."""
    if attention in OUR_ATTENTION:
        return True
    if attention == "megatron":
        return False
    raise ValueError(f"unknown attention kernel {attention!r}")


def norm_module(norm: str, *, wgrad_fusion: bool = False):
    """The norm's module; with wgrad_fusion our Triton RMSNorm's weight gradient goes straight
    into DDP's fp32 main_grad (kernels.megatron_norm tags it), as the linears' do."""
    if norm == "triton":
        from kernels.megatron_norm import TritonRMSNorm

        return ModuleSpec(module=TritonRMSNorm, params={"wgrad_fusion": True}) if wgrad_fusion else TritonRMSNorm
    if norm == "torch":
        from kernels.megatron_norm import TorchRMSNorm

        return TorchRMSNorm
    if norm == "megatron":
        from megatron.core.models.backends import LocalSpecProvider

        return LocalSpecProvider().layer_norm(rms_norm=True, for_qk=False)
    raise ValueError(f"unknown norm kernel {norm!r}")


def core_attention_spec(attention: str, *, rope_base: float, qkv_grad: str = "megatron"):
    """The core-attention module; ours rotate q and k themselves (see `applies_rope`);
    qkv_grad="fused": and write the q, k, v gradients into one buffer (kernels.rope)."""
    if attention == "megatron":
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        return ModuleSpec(module=DotProductAttention)  # megatron's RoPE runs before it
    rope = {"rope": applies_rope(attention), "rope_base": rope_base}  # raises if unknown
    if qkv_grad == "fused":
        rope["fused_qkv_grad"] = True
    elif qkv_grad != "megatron":
        raise ValueError(f"unknown qkv_grad {qkv_grad!r}")
    if attention == "triton":
        from kernels.megatron_attention import TritonCoreAttention

        return ModuleSpec(module=TritonCoreAttention, params=rope)
    if attention == "flash_attn":  # flash-attn-4, imported only when the module is built
        from kernels.megatron_attention import FlashAttn4CoreAttention

        return ModuleSpec(module=FlashAttn4CoreAttention, params=rope)
    from kernels.megatron_attention import SDPACoreAttention

    return ModuleSpec(module=SDPACoreAttention,
                      params={"backend": SDPA_BACKENDS[attention], **rope})


def layer_spec(*, attention: str, norm: str, rope_base: float, swiglu: str = "megatron",
               add_norm: str = "megatron", qkv_grad: str = "megatron",
               wgrad_fusion: bool = False) -> ModuleSpec:
    """A TransformerLayer spec: megatron's local linears and MLP, our norm and attention;
    swiglu="triton" makes kernels.swiglu the MLP's activation (the config must set
    use_te_activation_func, as launch.model does, or megatron never calls it);
    add_norm="fused": the layer is kernels.megatron_layer's (residual add + pre-MLP norm fused);
    wgrad_fusion: kernels.wgrad's linears (and the fused layer's norm weights) put their
    weight gradients straight into DDP's `main_grad`."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    subs = spec.submodules
    if wgrad_fusion:
        from kernels import wgrad

        attention_subs, mlp_subs = subs.self_attention.submodules, subs.mlp.submodules
        attention_subs.linear_qkv = mlp_subs.linear_fc1 = wgrad.ColumnParallelLinear
        attention_subs.linear_proj = mlp_subs.linear_fc2 = wgrad.RowParallelLinear
    if add_norm == "fused":
        from kernels.megatron_layer import FusedAddNormLayer

        spec.module = FusedAddNormLayer
        spec.params = {**spec.params, "wgrad_fusion": wgrad_fusion}
    elif add_norm != "megatron":
        raise ValueError(f"unknown add_norm {add_norm!r}")
    if swiglu == "triton":
        from kernels.swiglu import TritonSwiGLU

        subs.mlp.submodules.activation_func = ModuleSpec(module=TritonSwiGLU)
    elif swiglu != "megatron":
        raise ValueError(f"unknown swiglu kernel {swiglu!r}")
    subs.self_attention.submodules.core_attention = core_attention_spec(
        attention, rope_base=rope_base, qkv_grad=qkv_grad)
    subs.input_layernorm = norm_module(norm, wgrad_fusion=wgrad_fusion)
    subs.pre_mlp_layernorm = norm_module(norm, wgrad_fusion=wgrad_fusion)
    return spec


def block_spec(config, *, attention: str, norm: str, rope_base: float,
               vp_stage=None, swiglu: str = "megatron", add_norm: str = "megatron",
               qkv_grad: str = "megatron", wgrad_fusion: bool = False) -> TransformerBlockSubmodules:
    """The decoder block of one model chunk: its layers plus the final norm. rope_base
    reaches our core attention; with attention="megatron" it is unused here (megatron's
    RotaryEmbedding takes GPTModel's rotary_base)."""
    layer = layer_spec(attention=attention, norm=norm, rope_base=rope_base, swiglu=swiglu,
                       add_norm=add_norm, qkv_grad=qkv_grad, wgrad_fusion=wgrad_fusion)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers,
                                      layer_norm=norm_module(norm, wgrad_fusion=wgrad_fusion))
