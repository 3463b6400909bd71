"""kernels.attention's backward variants against a float64 reference: dQ added inside the
dK/dV kernel (atomics, bulk reduce-adds), dS stashed for a dQ = dS K kernel (the d=128
default on a GPU), DEFER. On CPU under TRITON_INTERPRET=1; the `cuda` tests at GPU blocks.
"""

import pytest
import torch

from kernels.attention import (
    INTERPRETER_CONFIG,
    attention_backward,
    attention_forward,
    flash_attention,
)
from tests.kernels.attention_cases import (
    TOLERANCE,
    check_against_reference,
    inputs,
    one_kv_heads_ds,
    reference_grads,
    relerr,
)


@pytest.mark.parametrize("causal, s, hq, hkv, d", [(True, 37, 4, 2, 64), (False, 33, 2, 1, 32)])
def test_atomic_dq_backward_matches_float64(causal, s, hq, hkv, d):
    # deterministic=False: dQ summed by fp32 atomics inside the dK/dV kernel (one program per
    # key block, several adding into each query row), odd lengths and GQA included.
    q, k, v = inputs(2, s, hq, hkv, d, torch.bfloat16, seed=s)
    check_against_reference(q, k, v, causal=causal, scale=None, tol=TOLERANCE[torch.bfloat16],
                             deterministic=False)


def test_atomic_dq_equals_the_deterministic_dq_up_to_summation_order():
    q, k, v = inputs(1, 40, 2, 2, 64, torch.float32, seed=19)
    dout = torch.randn(1, 40, 2, 64)
    grads = {}
    for deterministic in (True, False):
        for t in (q, k, v):
            t.grad = None
        flash_attention(q, k, v, deterministic=deterministic).backward(dout)
        grads[deterministic] = [t.grad.clone() for t in (q, k, v)]
    # fp32 throughout: dK and dV come from the same kernel code (bitwise equal); dQ's blocks
    # are summed in another order, so it agrees to fp32 rounding (~1e-7), not bitwise.
    assert torch.equal(grads[True][1], grads[False][1])
    assert torch.equal(grads[True][2], grads[False][2])
    torch.testing.assert_close(grads[False][0], grads[True][0], rtol=1e-5, atol=1e-6)
    # negative control: the tolerance rejects a dQ 10% off
    assert not torch.allclose(grads[False][0] * 0.9, grads[True][0], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("causal, s", [(True, 37), (True, 64), (False, 37), (False, 64)])
def test_deferred_backward_matches_float64(causal, s):
    # DEFER (kernels/attention_bwd.py) in both backward kernels: each block's dK += dS^T Q and
    # dQ += dS K issued one iteration late. Small blocks give several unmasked blocks per
    # program, key blocks with no unmasked query block (the deferred segment empty), s = 37 a
    # partial last block; GQA 4/2 sums two query heads into each dK/dV.
    q, k, v = (t.detach() for t in inputs(1, s, 4, 2, 32, torch.float32, seed=s + 1))
    dkdv = dict(INTERPRETER_CONFIG, BLOCK_M=8, BLOCK_N=16, DEFER=True)
    dq_config = dict(INTERPRETER_CONFIG, BLOCK_M=16, BLOCK_N=8, DEFER=True)
    out, lse = attention_forward(q, k, v, causal=causal, softmax_scale=0.3)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(s))
    grads = attention_backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=0.3,
                               dkdv_config=dkdv, dq_config=dq_config)
    for name, got, want in zip("qkv", grads, reference_grads(q, k, v, dout, causal=causal)):
        # fp32 throughout: only the summation order differs from float64
        assert relerr(got, want) < 1e-5, f"d{name}"
    # negative control: the tolerance rejects the other masking's gradients
    wrong = reference_grads(q, k, v, dout, causal=not causal)
    assert max(relerr(g, w) for g, w in zip(grads, wrong)) > 1e-2


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("causal, s, hq, hkv", [(True, 64, 4, 2), (True, 37, 2, 1),
                                                (False, 64, 2, 2), (False, 37, 4, 2)])
def test_stashed_ds_backward_matches_float64(monkeypatch, causal, s, hq, hkv, tma):
    # DQ_STASH (kernels/attention_bwd.py): the dK/dV kernel stores dS^T and
    # kernels/attention_dq_ds.py forms dQ = scale * dS K from it. 16-row key blocks in the
    # dK/dV kernel, 32-row query blocks in the dQ one: each diagonal dQ block then covers
    # scores above the diagonal that no dK/dV program wrote. The scratch starts as NaN, so
    # reading one as a number would poison dq (it does with the dQ kernel's mask removed).
    # A partial last block at s = 37, GQA; a scratch cap of one KV head's dS runs each
    # (batch, KV head) as its own chunk. fp32 throughout: only the summation order differs
    # from float64.
    import kernels.attention as A

    monkeypatch.setattr(A, "_ds_scratch",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype))
    q, k, v = (t.detach() for t in inputs(2, s, hq, hkv, 32, torch.float32, seed=s + hq))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(s))
    stash = dict(INTERPRETER_CONFIG, DS_STASH=True, tma=tma)
    dq_ds = dict(INTERPRETER_CONFIG, BLOCK_M=32, tma=tma)
    out, lse = attention_forward(q, k, v, causal=causal, softmax_scale=0.3)
    runs = [attention_backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=0.3,
                               dkdv_config=stash, dq_config=dq_ds, ds_scratch_bytes=cap)
            for cap in (None, one_kv_heads_ds(q, k))]
    for grads in runs:
        for name, got, want in zip("qkv", grads, reference_grads(q, k, v, dout, causal=causal)):
            assert relerr(got, want) < 1e-5, f"d{name}"
    for one, chunked in zip(*runs):  # the same sums in the same order, chunked or not
        assert torch.equal(one, chunked)
    # negative control: the tolerance rejects the other masking's dq
    wrong = reference_grads(q, k, v, dout, causal=not causal)[0]
    assert relerr(runs[0][0], wrong) > 1e-2


def test_stash_falls_back_to_the_pair_where_one_kv_head_does_not_fit(monkeypatch):
    # Long sequences: one KV head's dS over the cap. The dK/dV + dQ pair runs instead (the
    # same numbers as asked for directly), and no scratch is allocated.
    import kernels.attention as A

    def no_scratch(*args):
        raise AssertionError("the scratch was allocated")

    q, k, v = (t.detach() for t in inputs(1, 40, 4, 2, 32, torch.float32, seed=29))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(29))
    out, lse = attention_forward(q, k, v, causal=True, softmax_scale=0.3)
    stash = dict(INTERPRETER_CONFIG, DS_STASH=True)
    cap = one_kv_heads_ds(q, k) - 1
    monkeypatch.setattr(A, "_ds_scratch", no_scratch)
    got = attention_backward(dout, q, k, v, out, lse, causal=True, softmax_scale=0.3,
                             dkdv_config=stash, dq_config=INTERPRETER_CONFIG, ds_scratch_bytes=cap)
    pair = attention_backward(dout, q, k, v, out, lse, causal=True, softmax_scale=0.3,
                              dkdv_config=INTERPRETER_CONFIG, dq_config=INTERPRETER_CONFIG)
    for one, other in zip(got, pair):
        assert torch.equal(one, other)
    with pytest.raises(AssertionError, match="allocated"):  # one byte more: the stash runs
        attention_backward(dout, q, k, v, out, lse, causal=True, softmax_scale=0.3,
                           dkdv_config=stash, dq_config=INTERPRETER_CONFIG,
                           ds_scratch_bytes=cap + 1)


def test_stash_head_dims_are_the_memory_models():
    # sweeper/memory.py counts the dS scratch at core.choices' head dims: the same as here
    import kernels.attention as A
    from core.choices import TRITON_DS_SCRATCH_BYTES, TRITON_DS_STASH_HEAD_DIMS

    assert set(A.DKDV_STASH_CONFIGS) == set(A.DQ_DS_CONFIGS) == set(TRITON_DS_STASH_HEAD_DIMS)
    assert all(c.get("DS_STASH") for c in A.DKDV_STASH_CONFIGS.values())
    assert A.DS_SCRATCH_BYTES == TRITON_DS_SCRATCH_BYTES


def test_stash_configs_take_over_both_deterministic_settings(monkeypatch):
    # Where DKDV_STASH_CONFIGS lists a head dim (on a GPU), kernel_configs hands its dK/dV
    # config and the dQ = dS K kernel's to both settings; elsewhere the old pairs stay.
    import kernels.attention as A

    stash = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3, tma=False, DS_STASH=True)
    dq_ds = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, tma=True)
    monkeypatch.setitem(A.DKDV_STASH_CONFIGS, 128, stash)
    monkeypatch.setitem(A.DQ_DS_CONFIGS, 128, dq_ds)
    monkeypatch.delitem(A.DKDV_STASH_CONFIGS, 64, raising=False)
    for deterministic in (True, False):
        assert A.kernel_configs(128, torch.device("cuda"), deterministic=deterministic)[1:] == (
            stash, dq_ds)
    assert A.kernel_configs(64, torch.device("cuda"))[1:] == (A.DKDV_CONFIGS[64],
                                                             A.DQ_CONFIGS[64])
    assert A.kernel_configs(64, torch.device("cuda"), deterministic=False)[1] is (
        A.DKDV_ATOMIC_CONFIGS[64])


# ----------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize("d, s, hq, hkv", [(128, 1000, 8, 2), (64, 1024, 8, 8)])
def test_gpu_atomic_dq_matches_float64(d, s, hq, hkv):
    q, k, v = inputs(2, s, hq, hkv, d, torch.bfloat16, device="cuda", seed=s + d)
    check_against_reference(q, k, v, causal=True, scale=None, tol=TOLERANCE[torch.bfloat16],
                             deterministic=False)


STASH = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3, tma=False, DS_STASH=True)
DQ_DS = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, tma=True)
BULK = dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3, tma=True, DQ_TMA=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dkdv, dq_config, deterministic", [
    (STASH, DQ_DS, True), (dict(STASH, tma=True), dict(DQ_DS, tma=False), True),
    (BULK, None, False)], ids=["stash", "stash-tma-store", "bulk-reduce"])
@pytest.mark.parametrize("d, s, hq, hkv, causal", [(128, 1000, 8, 2, True),
                                                    (128, 1024, 4, 4, False),
                                                    (64, 777, 4, 1, True)])
def test_gpu_dq_through_the_dkdv_kernel_matches_float64(monkeypatch, dkdv, dq_config,
                                                        deterministic, d, s, hq, hkv, causal):
    import kernels.attention as A

    monkeypatch.setattr(A, "_ds_scratch", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    q, k, v = (t.detach() for t in inputs(2, s, hq, hkv, d, torch.bfloat16, device="cuda",
                                            seed=s + d))
    dout = torch.randn_like(q)
    out, lse = attention_forward(q, k, v, causal=causal, softmax_scale=d ** -0.5)
    grads = attention_backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=d ** -0.5,
                               dkdv_config=dkdv, dq_config=dq_config,
                               deterministic=deterministic, ds_scratch_bytes=64 << 20)
    want = reference_grads(q, k, v, dout, causal=causal, scale=d ** -0.5)
    for name, got, ref in zip("qkv", grads, want):
        assert relerr(got, ref) < TOLERANCE[torch.bfloat16], f"d{name}"
    wrong = reference_grads(q, k, v, dout, causal=not causal, scale=d ** -0.5)[0]
    assert relerr(grads[0], wrong) > 10 * TOLERANCE[torch.bfloat16]


@pytest.mark.cuda
def test_gpu_stashed_backward_is_bitwise_repeatable_and_chunking_free():
    import kernels.attention as A

    q, k, v = (t.detach() for t in inputs(2, 2048, 8, 2, 128, torch.bfloat16, device="cuda",
                                            seed=2))
    dout = torch.randn_like(q)
    out, lse = attention_forward(q, k, v, causal=True, softmax_scale=0.088)
    runs = [attention_backward(dout, q, k, v, out, lse, causal=True, softmax_scale=0.088,
                               dkdv_config=STASH, dq_config=DQ_DS, ds_scratch_bytes=cap)
            for cap in (None, None, one_kv_heads_ds(q, k))]
    for run in runs[1:]:
        for first, other in zip(runs[0], run):
            assert torch.equal(first, other)


@pytest.mark.cuda
@pytest.mark.parametrize("d, s, hq, hkv, causal", [(128, 1000, 8, 2, True),
                                                    (128, 1024, 4, 4, False),
                                                    (64, 777, 4, 1, True)])
def test_gpu_deferred_backward_matches_float64(d, s, hq, hkv, causal):
    from kernels.attention import DKDV_CONFIGS, DQ_CONFIGS

    q, k, v = inputs(2, s, hq, hkv, d, torch.bfloat16, device="cuda", seed=s + d)
    out, lse = attention_forward(q.detach(), k.detach(), v.detach(), causal=causal,
                                 softmax_scale=d ** -0.5)
    dout = torch.randn_like(out)
    grads = attention_backward(dout, q.detach(), k.detach(), v.detach(), out, lse,
                               causal=causal, softmax_scale=d ** -0.5,
                               dkdv_config=dict(DKDV_CONFIGS[d], DEFER=True, WARP_SPEC=False),
                               dq_config=dict(DQ_CONFIGS[d], DEFER=True, WARP_SPEC=False))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    attention_reference(q64, k64, v64, causal=causal, softmax_scale=d ** -0.5).backward(
        dout.double())
    for got, want in zip(grads, (q64.grad, k64.grad, v64.grad)):
        assert relerr(got, want) < TOLERANCE[torch.bfloat16]
