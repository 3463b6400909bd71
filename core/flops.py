"""Model FLOPs per token for a dense Llama-style model, under two conventions.

Both count one training step's forward and backward (3x forward) matmul FLOPs,
at 2 FLOPs per multiply-add, and exclude activation recompute.

- ``palm``: PaLM's (and Hagemann et al.'s) 6N + 12*L*H*T, where N excludes the
  input embedding (a lookup, no FLOPs) but includes the output layer, and the
  attention term counts the full s x s score matrix (causal masking not halved).
- ``megatron``: Megatron-LM's ``num_floating_point_operations``: the same
  matmuls written out per layer (GQA-aware), with causal attention halved.

MFU = tokens/s * flops_per_token / (peak FLOP/s per device * devices).
"""

from __future__ import annotations

from core.config import ModelConfig

CONVENTIONS = ("palm", "megatron")

FORMULAS = {
    "palm": "tokens/s * (6*N + 12*L*H*T) / (peak * devices); N excludes input embedding; causal not halved; recompute excluded",
    "megatron": "tokens/s * 12*L*h^2*[(1+g/a+s/(2h))*(q/h) + 1.5*f/h + V/(2*L*h)] / (peak * devices); causal halved; recompute excluded",
}


def palm_flops_per_token(model: ModelConfig) -> float:
    n = model.num_params() - model.vocab_size * model.hidden_size
    return 6.0 * n + 12.0 * model.num_layers * model.hidden_size * model.seq_length


def megatron_flops_per_token(model: ModelConfig) -> float:
    h, L, s = model.hidden_size, model.num_layers, model.seq_length
    q_ratio = model.head_dim * model.num_attention_heads / h
    gqa = model.num_query_groups / model.num_attention_heads
    attention = (1 + gqa + s / h / 2) * q_ratio
    mlp = 1.5 * model.ffn_hidden_size / h  # SwiGLU: three h x f matrices
    logits = model.vocab_size / (2 * L * h)
    return 12.0 * L * h * h * (attention + mlp + logits)


def flops_per_token(model: ModelConfig, convention: str) -> float:
    if convention == "palm":
        return palm_flops_per_token(model)
    if convention == "megatron":
        return megatron_flops_per_token(model)
    raise ValueError(f"unknown FLOPs convention {convention!r}; known: {', '.join(CONVENTIONS)}")


def mfu(model: ModelConfig, tokens_per_s: float, peak_tflops: float, devices: int) -> dict:
    """MFU under both conventions, as fractions of the explicit peak."""
    peak = peak_tflops * 1e12 * devices
    return {c: tokens_per_s * flops_per_token(model, c) / peak for c in CONVENTIONS}
