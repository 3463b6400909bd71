"""kernels.attention against a float64 reference: output, log-sum-exp, dq/dk/dv.

On CPU these run under TRITON_INTERPRET=1 with small shapes; the `cuda` tests
repeat them at tuned block sizes on a GPU.
"""

import math

import pytest
import torch

from kernels.attention import (
    INTERPRETER_CONFIG,
    attention_backward,
    attention_forward,
    attention_impls,
    attention_reference,
    flash_attention,
)

# Relative-norm tolerances ||x - ref|| / ||ref||. bf16 keeps 8 mantissa bits
# (unit roundoff 2^-9 = 2e-3): P is rounded to bf16 before P V and dS before
# dS K, then the result once more, so errors land at 4e-3 to 8e-3; 2e-2 leaves
# margin without hiding indexing bugs (those give errors of order 1). fp16 has
# 11 bits (4.9e-4): errors land near 3e-4 to 5e-4. fp32 on the interpreter is
# exact-ish (1e-7); on a GPU its dots run as tf32 (10 bits, like fp16).
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 3e-3}


def _relerr(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def _random_case(seed):
    """A random shape: odd sequence lengths, GQA/MQA, both half dtypes, d 64 or 128."""
    gen = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[torch.randint(len(options), (1,), generator=gen).item()]

    hkv = pick([1, 2])
    return dict(
        b=pick([1, 2]),
        s=torch.randint(17, 50, (1,), generator=gen).item(),
        hkv=hkv,
        hq=hkv * pick([1, 2]),
        d=pick([64, 128]),
        dtype=pick([torch.bfloat16, torch.float16]),
        causal=pick([True, True, False]),
        scale=pick([None, 0.3]),
    )


def _inputs(b, s, hq, hkv, d, dtype, device="cpu", seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (
        torch.randn(b, s, h, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        for h in (hq, hkv, hkv)
    )
    return q, k, v


def _check_against_reference(q, k, v, *, causal, scale, tol, deterministic=True, impl="auto"):
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
        err = _relerr(got, want)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"


@pytest.mark.parametrize("seed", range(8))
def test_random_shapes_match_float64(seed):
    case = _random_case(seed)
    q, k, v = _inputs(case["b"], case["s"], case["hq"], case["hkv"], case["d"], case["dtype"],
                      seed=seed)
    _check_against_reference(q, k, v, causal=case["causal"], scale=case["scale"],
                             tol=TOLERANCE[case["dtype"]])


@pytest.mark.parametrize("causal", [True, False])
def test_fp32_is_near_exact(causal):
    # fp32 operands and accumulation on the interpreter: only summation order differs.
    q, k, v = _inputs(2, 33, 4, 2, 64, torch.float32, seed=3)
    _check_against_reference(q, k, v, causal=causal, scale=None, tol=1e-5)


def test_log_sum_exp_matches_reference():
    q, k, v = _inputs(1, 29, 2, 1, 64, torch.float32, seed=5)
    scale = 0.2
    _, lse = attention_forward(q, k, v, causal=True, softmax_scale=scale)
    scores = scale * q.double().transpose(1, 2) @ k.double().transpose(1, 2).repeat_interleave(
        2, dim=1).transpose(-1, -2)
    scores = scores.masked_fill(torch.ones(29, 29, dtype=torch.bool).triu(1), float("-inf"))
    assert lse.shape == (1, 2, 29)
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), rtol=0, atol=1e-5)


def _fused_qkv_views(s, b, hkv, group, d, dtype, seed):
    """megatron's layout: one [s, b, hkv, (group + 2) * d] buffer, q/k/v strided views."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(s, b, hkv, (group + 2) * d, generator=gen).to(dtype)
    q = qkv[..., : group * d].reshape(s, b, hkv * group, d)  # a view when group == 1
    k = qkv[..., group * d: (group + 1) * d]
    v = qkv[..., (group + 1) * d:]
    return [t.permute(1, 0, 2, 3) for t in (q, k, v)]


@pytest.mark.parametrize("tma", [False, True])
def test_strided_views_and_seq_first_output(tma):
    # Both load paths: pointer arithmetic, and tensor descriptors (emulated on CPU).
    q, k, v = _fused_qkv_views(s=37, b=2, hkv=2, group=1, d=64, dtype=torch.float16, seed=7)
    assert not q.is_contiguous() and not k.is_contiguous()
    config = dict(INTERPRETER_CONFIG, tma=tma)
    out, lse = attention_forward(q, k, v, causal=True, softmax_scale=0.125, seq_first_out=True,
                                 config=config)
    assert out.permute(1, 0, 2, 3).is_contiguous()  # [s, b, h, d] in memory
    ref = attention_reference(q, k, v, causal=True, softmax_scale=0.125)
    assert _relerr(out, ref) < TOLERANCE[torch.float16]
    dout = torch.randn_like(ref).to(torch.float16).permute(1, 0, 2, 3).contiguous().permute(
        1, 0, 2, 3)  # strided like the gradient megatron hands back
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, causal=True, softmax_scale=0.125,
                                    dkdv_config=config, dq_config=config)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    attention_reference(q64, k64, v64, causal=True, softmax_scale=0.125).backward(dout.double())
    for got, want in [(dq, q64.grad), (dk, k64.grad), (dv, v64.grad)]:
        assert _relerr(got, want) < TOLERANCE[torch.float16]


def test_gqa_views_with_copied_query():
    # With 2 query heads per KV head megatron's query reshape copies; k, v stay views.
    q, k, v = _fused_qkv_views(s=21, b=1, hkv=2, group=2, d=64, dtype=torch.bfloat16, seed=11)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    _check_against_reference(q, k, v, causal=True, scale=None, tol=TOLERANCE[torch.bfloat16])


def test_backward_is_deterministic():
    q, k, v = _inputs(1, 40, 4, 1, 64, torch.bfloat16, seed=13)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        out = flash_attention(q, k, v)
        out.backward(torch.ones_like(out))
        grads.append([t.grad.clone() for t in (q, k, v)])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.parametrize("causal, s, hq, hkv, d", [(True, 37, 4, 2, 64), (False, 33, 2, 1, 32)])
def test_atomic_dq_backward_matches_float64(causal, s, hq, hkv, d):
    # deterministic=False: dQ summed by fp32 atomics inside the dK/dV kernel (one program per
    # key block, several adding into each query row), odd lengths and GQA included.
    q, k, v = _inputs(2, s, hq, hkv, d, torch.bfloat16, seed=s)
    _check_against_reference(q, k, v, causal=causal, scale=None, tol=TOLERANCE[torch.bfloat16],
                             deterministic=False)


def test_atomic_dq_equals_the_deterministic_dq_up_to_summation_order():
    q, k, v = _inputs(1, 40, 2, 2, 64, torch.float32, seed=19)
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


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = _inputs(1, 18, 2, 2, 64, torch.float32, seed=17)
    explicit = flash_attention(q, k, v, softmax_scale=1 / math.sqrt(64))
    default = flash_attention(q, k, v)
    assert torch.equal(explicit, default)
    other = flash_attention(q, k, v, softmax_scale=0.5)
    assert not torch.allclose(other, default)


@pytest.mark.parametrize("shapes, message", [
    (((1, 8, 3, 64), (1, 8, 2, 64)), "must divide"),
    (((1, 8, 2, 48), (1, 8, 2, 48)), "head dim"),
    (((1, 8, 2, 64), (1, 9, 2, 64)), "differ"),
])
def test_rejects_bad_shapes(shapes, message):
    q, k = (torch.randn(shape) for shape in shapes)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, k)


def test_impl_choice_on_cpu():
    """auto and triton both run the Triton-language kernel here (bitwise the same result);
    gluon names why it cannot run; an unknown impl is refused before any launch."""
    q, k, v = _inputs(1, 20, 2, 1, 64, torch.float32, seed=3)
    auto = flash_attention(q, k, v, impl="auto")
    assert torch.equal(auto, flash_attention(q, k, v, impl="triton"))
    with pytest.raises(ValueError, match="Gluon attention fwd cannot run: .+"):
        flash_attention(q, k, v, impl="gluon")
    with pytest.raises(ValueError, match="not one of"):
        flash_attention(q, k, v, impl="cudnn")
    assert attention_impls(q, k, v) == {"fwd": "triton", "bwd": "triton"}


# Forward variants (kernels/attention_fwd.py): PIPELINE defers each block's P V so the next
# block's softmax runs under it; SUBTILE splits the query tile into two halves taken in turn.
FWD_VARIANTS = [dict(PIPELINE=True), dict(PIPELINE=True, tma=True), dict(SUBTILE=True),
                dict(SUBTILE=True, tma=True)]


def _lse_reference(q, k, *, causal, scale):
    group = q.shape[2] // k.shape[2]
    scores = scale * q.double().transpose(1, 2) @ k.double().transpose(1, 2).repeat_interleave(
        group, dim=1).transpose(-1, -2)
    if causal:
        s = q.shape[1]
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores.logsumexp(-1)


@pytest.mark.parametrize("variant", FWD_VARIANTS, ids=lambda v: "-".join(sorted(v)))
@pytest.mark.parametrize("causal, s", [(True, 37), (True, 64), (False, 37), (False, 64),
                                       (False, 5)])
def test_forward_variants_match_float64(variant, causal, s):
    # 32-row query blocks over 8-row key blocks: up to 7 unmasked blocks before the diagonal
    # (the pipelined loop's prologue, steady state and epilogue), the first query block with
    # none (its pipelined segment is empty; so is the whole-block segment at s = 5), s = 37
    # a partial last block; GQA 4/2.
    q, k, v = (t.detach() for t in _inputs(2, s, 4, 2, 32, torch.float32, seed=s))
    config = dict(INTERPRETER_CONFIG, BLOCK_M=32, BLOCK_N=8, **variant)
    out, lse = attention_forward(q, k, v, causal=causal, softmax_scale=0.3, config=config)
    ref = attention_reference(q, k, v, causal=causal, softmax_scale=0.3)
    # fp32 operands and accumulation: only the summation order differs from float64.
    assert _relerr(out, ref) < 1e-5
    torch.testing.assert_close(lse.double(), _lse_reference(q, k, causal=causal, scale=0.3),
                               rtol=0, atol=1e-5)
    # negative control: the same output is far from the other masking's reference
    other = attention_reference(q, k, v, causal=not causal, softmax_scale=0.3)
    assert _relerr(out, other) > 1e-2


@pytest.mark.parametrize("variant", [dict(PIPELINE=True), dict(SUBTILE=True)],
                         ids=lambda v: "-".join(sorted(v)))
def test_forward_variants_bf16_match_the_plain_kernel(variant):
    # bf16: the variants round P to bf16 exactly as the plain kernel does, block by block.
    q, k, v = (t.detach() for t in _inputs(1, 45, 2, 1, 64, torch.bfloat16, seed=23))
    plain = dict(INTERPRETER_CONFIG, BLOCK_M=32, BLOCK_N=16)
    ref = attention_reference(q, k, v, causal=True, softmax_scale=None)
    out, _ = attention_forward(q, k, v, causal=True, softmax_scale=0.125,
                               config=dict(plain, **variant))
    base, _ = attention_forward(q, k, v, causal=True, softmax_scale=0.125, config=plain)
    assert _relerr(out, ref) < TOLERANCE[torch.bfloat16]
    assert _relerr(out, base.double()) < 1e-2


def test_forward_refuses_both_variants_at_once():
    q = torch.zeros(1, 16, 1, 32)
    with pytest.raises(ValueError, match="PIPELINE and SUBTILE"):
        attention_forward(q, q, q, causal=True, softmax_scale=1.0,
                          config=dict(INTERPRETER_CONFIG, PIPELINE=True, SUBTILE=True))


@pytest.mark.parametrize("causal, s", [(True, 37), (True, 64), (False, 37), (False, 64)])
def test_deferred_backward_matches_float64(causal, s):
    # DEFER (kernels/attention_bwd.py) in both backward kernels: each block's dK += dS^T Q and
    # dQ += dS K issued one iteration late. Small blocks give several unmasked blocks per
    # program, key blocks with no unmasked query block (the deferred segment empty), s = 37 a
    # partial last block; GQA 4/2 sums two query heads into each dK/dV.
    q, k, v = (t.detach() for t in _inputs(1, s, 4, 2, 32, torch.float32, seed=s + 1))
    dkdv = dict(INTERPRETER_CONFIG, BLOCK_M=8, BLOCK_N=16, DEFER=True)
    dq_config = dict(INTERPRETER_CONFIG, BLOCK_M=16, BLOCK_N=8, DEFER=True)
    out, lse = attention_forward(q, k, v, causal=causal, softmax_scale=0.3)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(s))
    grads = attention_backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=0.3,
                               dkdv_config=dkdv, dq_config=dq_config)

    def reference_grads(mask):
        leaves = [t.double().requires_grad_() for t in (q, k, v)]
        attention_reference(*leaves, causal=mask, softmax_scale=0.3).backward(dout.double())
        return [t.grad for t in leaves]

    for name, got, want in zip("qkv", grads, reference_grads(causal)):
        # fp32 throughout: only the summation order differs from float64
        assert _relerr(got, want) < 1e-5, f"d{name}"
    # negative control: the tolerance rejects the other masking's gradients
    assert max(_relerr(g, w) for g, w in zip(grads, reference_grads(not causal))) > 1e-2


def _reference_grads(q, k, v, dout, *, causal, scale=0.3):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    attention_reference(*leaves, causal=causal, softmax_scale=scale).backward(dout.double())
    return [t.grad for t in leaves]


def _one_kv_heads_ds(q, k):
    """Bytes of one KV head's dS in the stash's scratch: its smallest chunk."""
    from core.choices import ds_bytes_per_kv_head

    return ds_bytes_per_kv_head(q.shape[2] // k.shape[2], q.shape[1], q.element_size())


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
    q, k, v = (t.detach() for t in _inputs(2, s, hq, hkv, 32, torch.float32, seed=s + hq))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(s))
    stash = dict(INTERPRETER_CONFIG, DS_STASH=True, tma=tma)
    dq_ds = dict(INTERPRETER_CONFIG, BLOCK_M=32, tma=tma)
    out, lse = attention_forward(q, k, v, causal=causal, softmax_scale=0.3)
    runs = [attention_backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=0.3,
                               dkdv_config=stash, dq_config=dq_ds, ds_scratch_bytes=cap)
            for cap in (None, _one_kv_heads_ds(q, k))]
    for grads in runs:
        for name, got, want in zip("qkv", grads, _reference_grads(q, k, v, dout, causal=causal)):
            assert _relerr(got, want) < 1e-5, f"d{name}"
    for one, chunked in zip(*runs):  # the same sums in the same order, chunked or not
        assert torch.equal(one, chunked)
    # negative control: the tolerance rejects the other masking's dq
    wrong = _reference_grads(q, k, v, dout, causal=not causal)[0]
    assert _relerr(runs[0][0], wrong) > 1e-2


def test_stash_falls_back_to_the_pair_where_one_kv_head_does_not_fit(monkeypatch):
    # Long sequences: one KV head's dS over the cap. The dK/dV + dQ pair runs instead (the
    # same numbers as asked for directly), and no scratch is allocated.
    import kernels.attention as A

    def no_scratch(*args):
        raise AssertionError("the scratch was allocated")

    q, k, v = (t.detach() for t in _inputs(1, 40, 4, 2, 32, torch.float32, seed=29))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(29))
    out, lse = attention_forward(q, k, v, causal=True, softmax_scale=0.3)
    stash = dict(INTERPRETER_CONFIG, DS_STASH=True)
    cap = _one_kv_heads_ds(q, k) - 1
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
@pytest.mark.parametrize("d, dtype, s, hq, hkv, causal", [
    (128, torch.bfloat16, 1000, 8, 2, True),
    (128, torch.float16, 1024, 4, 4, False),
    (64, torch.float16, 777, 4, 1, True),
    (64, torch.bfloat16, 1024, 8, 8, True),
])
@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_gpu_tuned_configs_match_float64(d, dtype, s, hq, hkv, causal, impl):
    q, k, v = _inputs(2, s, hq, hkv, d, dtype, device="cuda", seed=s + d)
    _check_against_reference(q, k, v, causal=causal, scale=None, tol=TOLERANCE[dtype], impl=impl)


@pytest.mark.cuda
@pytest.mark.parametrize("d, s, hq, hkv", [(128, 1000, 8, 2), (64, 1024, 8, 8)])
def test_gpu_atomic_dq_matches_float64(d, s, hq, hkv):
    q, k, v = _inputs(2, s, hq, hkv, d, torch.bfloat16, device="cuda", seed=s + d)
    _check_against_reference(q, k, v, causal=True, scale=None, tol=TOLERANCE[torch.bfloat16],
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
    q, k, v = (t.detach() for t in _inputs(2, s, hq, hkv, d, torch.bfloat16, device="cuda",
                                            seed=s + d))
    dout = torch.randn_like(q)
    out, lse = attention_forward(q, k, v, causal=causal, softmax_scale=d ** -0.5)
    grads = attention_backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=d ** -0.5,
                               dkdv_config=dkdv, dq_config=dq_config,
                               deterministic=deterministic, ds_scratch_bytes=64 << 20)
    want = _reference_grads(q, k, v, dout, causal=causal, scale=d ** -0.5)
    for name, got, ref in zip("qkv", grads, want):
        assert _relerr(got, ref) < TOLERANCE[torch.bfloat16], f"d{name}"
    wrong = _reference_grads(q, k, v, dout, causal=not causal, scale=d ** -0.5)[0]
    assert _relerr(grads[0], wrong) > 10 * TOLERANCE[torch.bfloat16]


@pytest.mark.cuda
def test_gpu_stashed_backward_is_bitwise_repeatable_and_chunking_free():
    import kernels.attention as A

    q, k, v = (t.detach() for t in _inputs(2, 2048, 8, 2, 128, torch.bfloat16, device="cuda",
                                            seed=2))
    dout = torch.randn_like(q)
    out, lse = attention_forward(q, k, v, causal=True, softmax_scale=0.088)
    runs = [attention_backward(dout, q, k, v, out, lse, causal=True, softmax_scale=0.088,
                               dkdv_config=STASH, dq_config=DQ_DS, ds_scratch_bytes=cap)
            for cap in (None, None, _one_kv_heads_ds(q, k))]
    for run in runs[1:]:
        for first, other in zip(runs[0], run):
            assert torch.equal(first, other)


@pytest.mark.cuda
def test_gpu_backward_is_deterministic():
    q, k, v = _inputs(2, 2048, 8, 2, 128, torch.bfloat16, device="cuda", seed=1)
    dout = torch.randn(2, 2048, 8, 128, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(3):
        for t in (q, k, v):
            t.grad = None
        flash_attention(q, k, v).backward(dout)
        grads.append([t.grad.clone() for t in (q, k, v)])
    for run in grads[1:]:
        for first, other in zip(grads[0], run):
            assert torch.equal(first, other)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", [dict(PIPELINE=True), dict(PIPELINE=True, tma=True),
                                     dict(SUBTILE=True), dict(SUBTILE=True, num_warps=4)],
                         ids=lambda v: "-".join(f"{k}{v[k]}" for k in sorted(v)))
@pytest.mark.parametrize("d, s, hq, hkv, causal", [(128, 1000, 8, 2, True),
                                                    (128, 1024, 4, 4, False),
                                                    (64, 777, 4, 1, True)])
def test_gpu_forward_variants_match_float64(variant, d, s, hq, hkv, causal):
    q, k, v = (t.detach() for t in _inputs(2, s, hq, hkv, d, torch.bfloat16, device="cuda",
                                            seed=s + d))
    # the tuned blocks of the plain kernel, the variant on top
    config = {**dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, tma=False), **variant}
    out, lse = attention_forward(q, k, v, causal=causal, softmax_scale=d ** -0.5, config=config)
    ref = attention_reference(q, k, v, causal=causal, softmax_scale=d ** -0.5)
    assert _relerr(out, ref) < TOLERANCE[torch.bfloat16]
    # the scores' dot accumulates in fp32 over the same bf16 operands: LSE (~7) to ~1e-5
    torch.testing.assert_close(lse.double(), _lse_reference(q, k, causal=causal, scale=d ** -0.5),
                               rtol=0, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("d, s, hq, hkv, causal", [(128, 1000, 8, 2, True),
                                                    (128, 1024, 4, 4, False),
                                                    (64, 777, 4, 1, True)])
def test_gpu_deferred_backward_matches_float64(d, s, hq, hkv, causal):
    from kernels.attention import DKDV_CONFIGS, DQ_CONFIGS

    q, k, v = _inputs(2, s, hq, hkv, d, torch.bfloat16, device="cuda", seed=s + d)
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
        assert _relerr(got, want) < TOLERANCE[torch.bfloat16]
