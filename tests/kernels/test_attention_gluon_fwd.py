"""kernels.attention_gluon_fwd against the float64 reference (GPU), and its refusals (CPU).

Tolerances are attention_cases.py's (relative norm; bf16 2e-2, fp16 3e-3: P is rounded to the
input dtype before P V, then O once more). The LSE is checked to 1e-3 absolute: it is
computed in fp32 from bf16/fp16 inputs whose scores are exact in fp32 up to ~1e-6 relative.
"""

import pytest
import torch

from kernels.attention import attention_reference
from kernels.attention_gluon_fwd import CONFIGS, gluon_forward, gluon_forward_unsupported
from tests.kernels.attention_cases import TOLERANCE, fused_qkv_views, lse_reference, relerr


def _run(q, k, v, *, seq_first=False, scale=None, config=None):
    b, s, hq, d = q.shape
    order = (1, 0, 2, 3) if seq_first else (0, 1, 2, 3)  # memory order of O's dimensions
    out = q.new_empty([q.shape[i] for i in order]).permute(order)
    lse = q.new_empty((b, hq, s), dtype=torch.float32)
    assert gluon_forward_unsupported(q, k, v, out, causal=True) is None
    gluon_forward(q, k, v, out, lse, causal=True, softmax_scale=scale, config=config)
    return out, lse


def _randn(*shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device="cuda", dtype=dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("b, s, hq, hkv", [(2, 1024, 4, 4), (1, 2048, 8, 2), (2, 384, 4, 1)])
@pytest.mark.parametrize("persistent", [False, True])
def test_matches_float64(b, s, hq, hkv, d, dtype, persistent):
    q, k, v = (_randn(b, s, h, d, dtype=dtype, seed=s + d + i) for i, h in enumerate((hq, hkv, hkv)))
    # persistent: 2 stages (two Q buffers leave room for no more at d=128), 5 CTAs, so each
    # walks several tiles of different lengths and the rings wrap across tiles
    config = dict(CONFIGS[d], persistent=True, stages=2, max_ctas=5) if persistent else None
    out, lse = _run(q, k, v, scale=0.3 if hkv == 1 else None, config=config)
    scale = 0.3 if hkv == 1 else d ** -0.5
    ref = attention_reference(q, k, v, causal=True, softmax_scale=scale)
    assert relerr(out, ref) < TOLERANCE[dtype]
    lse_ref = lse_reference(q, k, causal=True, scale=scale)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=0, atol=1e-3)
    # negative control: the same output is far from the non-causal attention
    assert relerr(out, attention_reference(q, k, v, causal=False, softmax_scale=scale)) > 0.1


def _cuda_keeping_strides(t):
    """t on the GPU as the same view of a copy of its base (.cuda() would compact a view
    with gaps, such as megatron's k and v)."""
    base = t if t._base is None else t._base
    return torch.as_strided(base.cuda(), t.shape, t.stride(), t.storage_offset())


@pytest.mark.cuda
@pytest.mark.parametrize("group", [1, 2])
def test_megatron_seq_first_views(group):
    # q/k/v strided views of one [s, b, hkv, (group + 2) * d] buffer; O written seq-first
    q, k, v = (_cuda_keeping_strides(t) for t in fused_qkv_views(
        s=512, b=2, hkv=2, group=group, d=128, dtype=torch.bfloat16, seed=3))
    assert not k.is_contiguous() and k.stride(1) > k.stride(0)  # seq-first, with gaps
    out, lse = _run(q, k, v, seq_first=True)
    assert out.permute(1, 0, 2, 3).is_contiguous()
    ref = attention_reference(q, k, v, causal=True)
    assert relerr(out, ref) < TOLERANCE[torch.bfloat16]
    lse_ref = lse_reference(q, k, causal=True, scale=128 ** -0.5)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=0, atol=1e-3)


@pytest.mark.cuda
def test_refuses_what_it_cannot_run():
    q = torch.zeros(1, 1000, 2, 128, dtype=torch.bfloat16, device="cuda")
    assert "multiple of 128" in gluon_forward_unsupported(q, q, q, q, causal=True)
    q = torch.zeros(1, 1024, 2, 96, dtype=torch.bfloat16, device="cuda")
    assert gluon_forward_unsupported(q, q, q, q, causal=True) == "head dim 96"
    q = torch.zeros(1, 1024, 2, 128, dtype=torch.bfloat16, device="cuda")
    assert "non-causal" in gluon_forward_unsupported(q, q, q, q, causal=False)


def test_cpu_tensors_are_refused_with_a_reason():
    q = torch.zeros(1, 128, 2, 64, dtype=torch.bfloat16)
    assert gluon_forward_unsupported(q, q, q, q, causal=True) == "tensors on cpu"
