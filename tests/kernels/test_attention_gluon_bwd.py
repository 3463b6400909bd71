"""kernels.attention_gluon_bwd against the float64 reference (GPU), and its refusals (CPU).

Tolerances are attention_cases.py's (relative norm ||x - ref|| / ||ref||; bf16 2e-2, fp16
3e-3: P and dS are rounded to the input dtype before their matmuls, the result once more).
The forward (out, lse) comes from our Triton-language forward, as in training.
"""

import math

import pytest
import torch

from kernels.attention import attention_forward, attention_reference
from kernels.attention_gluon_bwd import gluon_backward, gluon_backward_unsupported, shape_unsupported
from tests.kernels.attention_cases import TOLERANCE, relerr


def _inputs(b, s, hq, hkv, d, dtype, *, seq_first=False, seed=0):
    """q, k, v, do [b, s, h, d]; seq_first: views of [s, b, h, d] memory (megatron's)."""
    gen = torch.Generator().manual_seed(seed)

    def make(h):
        shape = (s, b, h, d) if seq_first else (b, s, h, d)
        t = torch.randn(*shape, generator=gen).to(device="cuda", dtype=dtype)
        return t.permute(1, 0, 2, 3) if seq_first else t

    return make(hq), make(hkv), make(hkv), make(hq)


def _grads(q, k, v, do, *, causal, deterministic=True, lse_shift=0.0, bwd_causal=None):
    """(dq, dk, dv) of gluon_backward; lse_shift and bwd_causal plant errors (controls)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = attention_forward(q, k, v, causal=causal, softmax_scale=scale)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    gluon_backward(do, q, k, v, out, lse + lse_shift, dq, dk, dv,
                   causal=causal if bwd_causal is None else bwd_causal, softmax_scale=scale,
                   deterministic=deterministic)
    return dq, dk, dv


def _errors(q, k, v, do, grads, *, causal):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    attention_reference(q64, k64, v64, causal=causal).backward(do.double())
    return {name: relerr(got, ref.grad)
            for name, got, ref in zip(("dq", "dk", "dv"), grads, (q64, k64, v64))}


@pytest.mark.cuda
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("b, s, hq, hkv, dtype, causal, seq_first", [
    (2, 1024, 4, 4, torch.bfloat16, True, False),
    (1, 2048, 8, 2, torch.bfloat16, True, False),   # GQA: dK/dV summed over 4 query heads
    (2, 512, 4, 1, torch.float16, True, False),     # MQA, fp16
    (2, 768, 4, 2, torch.bfloat16, True, True),     # megatron's [s, b, h, d] views
    (1, 384, 2, 2, torch.bfloat16, False, False),   # non-causal
])
def test_gradients_match_float64(d, b, s, hq, hkv, dtype, causal, seq_first):
    q, k, v, do = _inputs(b, s, hq, hkv, d, dtype, seq_first=seq_first, seed=s + d)
    assert gluon_backward_unsupported(q, k, v, do, causal=causal, deterministic=True) is None
    grads = _grads(q, k, v, do, causal=causal)
    for g, t in zip(grads, (q, k, v)):
        assert g.stride() == t.stride()
    for name, err in _errors(q, k, v, do, grads, causal=causal).items():
        assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"


@pytest.mark.cuda
def test_atomic_dq_matches_float64():
    q, k, v, do = _inputs(2, 1024, 8, 2, 128, torch.bfloat16, seed=3)
    grads = _grads(q, k, v, do, causal=True, deterministic=False)
    for name, err in _errors(q, k, v, do, grads, causal=True).items():
        assert err < TOLERANCE[torch.bfloat16], f"{name}: relative error {err:.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("d", [64, 128])
def test_two_runs_are_bitwise_equal(d):
    q, k, v, do = _inputs(2, 2048, 8, 2, d, torch.bfloat16, seed=7)
    first, second = _grads(q, k, v, do, causal=True), _grads(q, k, v, do, causal=True)
    for name, a, b in zip(("dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), name


@pytest.mark.cuda
@pytest.mark.parametrize("plant", ["lse", "mask"])
def test_planted_errors_fail_the_check(plant):
    # A wrong lse (off by 0.5: P scaled by e^-0.5) or the backward's causal mask dropped
    # must push some gradient past the tolerance that the real kernel passes.
    q, k, v, do = _inputs(1, 1024, 4, 4, 128, torch.bfloat16, seed=11)
    kw = dict(lse_shift=0.5) if plant == "lse" else dict(bwd_causal=False)
    errors = _errors(q, k, v, do, _grads(q, k, v, do, causal=True, **kw), causal=True)
    assert max(errors.values()) > 10 * TOLERANCE[torch.bfloat16], errors


def test_cpu_tensors_are_refused_with_a_reason():
    q = torch.randn(1, 256, 2, 128, dtype=torch.bfloat16)
    reason = gluon_backward_unsupported(q, q, q, q, causal=True, deterministic=True)
    assert isinstance(reason, str) and reason
    with pytest.raises(ValueError, match="gluon attention backward"):
        gluon_backward(q, q, q, q, q, torch.zeros(1, 2, 256), q, q, q, causal=True,
                       softmax_scale=0.1)


@pytest.mark.parametrize("shape, dtype, reason", [
    ((1, 256, 2, 96), torch.bfloat16, "head dim 96"),
    ((1, 1000, 2, 128), torch.bfloat16, "seq 1000 not a multiple of 128"),
    ((1, 256, 2, 64), torch.float32, "dtype torch.float32"),
])
def test_shapes_outside_the_kernel_are_named(shape, dtype, reason):
    q = torch.empty(shape, dtype=dtype, device="meta")
    assert shape_unsupported(q, q) == reason
    assert shape_unsupported(q.to(torch.bfloat16)[:, :256, :, :64], q[:, :256, :1, :64]) is None
