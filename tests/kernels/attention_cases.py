"""Shared by the attention tests: inputs, float64 references, tolerances."""

import torch

from kernels.attention import attention_reference, flash_attention

# Relative-norm tolerances ||x - ref|| / ||ref||. bf16 keeps 8 mantissa bits
# (unit roundoff 2^-9 = 2e-3): P is rounded to bf16 before P V and dS before
# dS K, then the result once more, so errors land at 4e-3 to 8e-3; 2e-2 leaves
# margin without hiding indexing bugs (those give errors of order 1). fp16 has
# 11 bits (4.9e-4): errors land near 3e-4 to 5e-4. fp32 on the interpreter is
# exact-ish (1e-7); on a GPU its dots run as tf32 (10 bits, like fp16).
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 3e-3}


def relerr(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def inputs(b, s, hq, hkv, d, dtype, device="cpu", seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (
        torch.randn(b, s, h, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        for h in (hq, hkv, hkv)
    )
    return q, k, v


def check_against_reference(q, k, v, *, causal, scale, tol, deterministic=True, impl="auto"):
    out = flash_attention(q, k, v, causal=causal, softmax_scale=scale,
                          deterministic=deterministic, impl=impl)
    dout = torch.randn_like(out)
    out.backward(dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=causal, softmax_scale=scale)
    ref.backward(dout.double())
    assert out.shape == q.shape and out.is_contiguous()
    for name, got, want in [("out", out, ref), ("dq", q.grad, q64.grad),
                            ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)]:
        assert torch.isfinite(got).all(), name
        err = relerr(got, want)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"


def fused_qkv_views(s, b, hkv, group, d, dtype, seed):
    """megatron's layout: one [s, b, hkv, (group + 2) * d] buffer, q/k/v strided views."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(s, b, hkv, (group + 2) * d, generator=gen).to(dtype)
    q = qkv[..., : group * d].reshape(s, b, hkv * group, d)  # a view when group == 1
    k = qkv[..., group * d: (group + 1) * d]
    v = qkv[..., (group + 1) * d:]
    return [t.permute(1, 0, 2, 3) for t in (q, k, v)]


def lse_reference(q, k, *, causal, scale):
    group = q.shape[2] // k.shape[2]
    scores = scale * q.double().transpose(1, 2) @ k.double().transpose(1, 2).repeat_interleave(
        group, dim=1).transpose(-1, -2)
    if causal:
        s = q.shape[1]
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores.logsumexp(-1)


def reference_grads(q, k, v, dout, *, causal, scale=0.3):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    attention_reference(*leaves, causal=causal, softmax_scale=scale).backward(dout.double())
    return [t.grad for t in leaves]


def one_kv_heads_ds(q, k):
    """Bytes of one KV head's dS in the stash's scratch: its smallest chunk."""
    from core.choices import ds_bytes_per_kv_head

    return ds_bytes_per_kv_head(q.shape[2] // k.shape[2], q.shape[1], q.element_size())
