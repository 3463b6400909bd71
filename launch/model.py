"""Build megatron-core's GPTModel for a model preset and a layout.

One place turns (ModelConfig, Layout, device) into a TransformerConfig, so the
CPU and GPU trial paths train exactly the same network.

RoPE is applied once, by whichever side owns it: our core-attention modules rotate q
and k themselves (kernels.rope, fused), so for them the GPTModel is built with
position_embedding_type="none"; with megatron's stock attention it keeps its own
("rope"). Both use ROPE_BASE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from core.config import Layout, ModelConfig
from kernels import embedding, wgrad
from kernels.layer_spec import applies_rope, block_spec
from kernels.rope import DEFAULT_BASE
from launch.steps import p2p_settings

ROPE_BASE = DEFAULT_BASE  # rotary base for megatron's RoPE and ours alike


def position_embedding_type(layout: Layout) -> str:
    """GPTModel's position embedding: "none" when the layout's core attention applies RoPE
    itself, else megatron's "rope"."""
    return "none" if applies_rope(layout.attention) else "rope"


def transformer_config(model: ModelConfig, layout: Layout, *, device: str) -> TransformerConfig:
    on_gpu = device == "cuda"
    recompute = {}
    if layout.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif layout.recompute == "full":
        recompute = dict(
            recompute_granularity="full",
            recompute_method=layout.recompute_method,
            recompute_num_layers=layout.recompute_num_layers,
        )
    dtype = torch.bfloat16 if on_gpu else torch.float32
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        context_parallel_size=layout.cp,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=on_gpu,
        use_cpu_initialization=not on_gpu,
        # Megatron's fused CUDA paths; on GPU they are megatron-core's own (no apex/TE needed).
        # swiglu=triton: megatron's MLP calls our activation module on the whole fc1 output
        # (kernels/swiglu.py; the flag's name is megatron's, no Transformer Engine involved).
        bias_activation_fusion=on_gpu and layout.swiglu == "megatron",
        use_te_activation_func=layout.swiglu == "triton",
        bias_dropout_fusion=on_gpu,
        # megatron-core's native fused cross-entropy (torch.compile'd, no TE): fewer passes
        # over the [s, b, vocab] logits than the unfused vocab-parallel one.
        cross_entropy_loss_fusion=on_gpu,
        cross_entropy_fusion_impl="native",
        masked_softmax_fusion=False,
        # Off: megatron's flag means Apex's extension (not installed; with the flag on and no
        # extension its linears refuse to build). Our linears fuse instead: build_model's
        # wgrad_fusion (kernels/wgrad.py).
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        **p2p_settings(layout, device=device),  # batch/overlap p2p, deallocation: why there
        **recompute,
    )


def build_model(model: ModelConfig, layout: Layout, config: TransformerConfig, *, vp_stage=None,
                pre_process=True, post_process=True, wgrad_fusion: bool = False) -> GPTModel:
    """One model chunk (the whole model when pp == vpp == 1); loss=fused: the output layer
    and its loss in one chunked pass (kernels/megatron_loss.py). wgrad_fusion: every weight
    gradient of a linear (the output layer's too) and of a fused norm or loss accumulates
    straight into DDP's fp32 `main_grad` (kernels/wgrad.py; a GPU trial's choice).
    embedding_grad=fused: the word embedding's too (kernels/embedding.py; the layout's choice)."""
    extra = {}
    if layout.loss == "fused":
        from kernels.megatron_loss import FusedLossGPTModel as model_class

        extra["wgrad_fusion"] = wgrad_fusion
    else:
        model_class = GPTModel
    gpt = model_class(
        config=config,
        transformer_layer_spec=block_spec(
            config, attention=layout.attention, norm=layout.norm, rope_base=ROPE_BASE,
            vp_stage=vp_stage, swiglu=layout.swiglu, add_norm=layout.add_norm,
            qkv_grad=layout.qkv_grad, wgrad_fusion=wgrad_fusion,
        ),
        vocab_size=model.vocab_size,
        max_sequence_length=model.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type=position_embedding_type(layout),
        rotary_base=ROPE_BASE,
        vp_stage=vp_stage,
        **extra,
    )
    if wgrad_fusion and post_process:  # GPTModel builds its output layer itself, not from the spec
        wgrad.fuse_output_layer(gpt.output_layer)
    if layout.embedding_grad == "fused" and pre_process:  # likewise its word embedding
        embedding.fuse_word_embeddings(gpt.embedding.word_embeddings)
    if layout.add_norm == "fused":  # each layer fuses its MLP residual add with the next one's norm
        from kernels.megatron_layer import link_layers

        link_layers(gpt.decoder.layers)
    return gpt
