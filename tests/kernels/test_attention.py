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
from tests.kernels.attention_cases import (
    TOLERANCE,
    check_against_reference,
    fused_qkv_views,
    inputs,
    lse_reference,
    relerr,
)


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




@pytest.mark.parametrize("seed", range(8))
def test_random_shapes_match_float64(seed):
    case = _random_case(seed)
    q, k, v = inputs(case["b"], case["s"], case["hq"], case["hkv"], case["d"], case["dtype"],
                      seed=seed)
    check_against_reference(q, k, v, causal=case["causal"], scale=case["scale"],
                             tol=TOLERANCE[case["dtype"]])


@pytest.mark.parametrize("causal", [True, False])
def test_fp32_is_near_exact(causal):
    # fp32 operands and accumulation on the interpreter: only summation order differs.
    q, k, v = inputs(2, 33, 4, 2, 64, torch.float32, seed=3)
    check_against_reference(q, k, v, causal=causal, scale=None, tol=1e-5)


def test_log_sum_exp_matches_reference():
    q, k, v = inputs(1, 29, 2, 1, 64, torch.float32, seed=5)
    scale = 0.2
    _, lse = attention_forward(q, k, v, causal=True, softmax_scale=scale)
    scores = scale * q.double().transpose(1, 2) @ k.double().transpose(1, 2).repeat_interleave(
        2, dim=1).transpose(-1, -2)
    scores = scores.masked_fill(torch.ones(29, 29, dtype=torch.bool).triu(1), float("-inf"))
    assert lse.shape == (1, 2, 29)
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), rtol=0, atol=1e-5)




@pytest.mark.parametrize("tma", [False, True])
def test_strided_views_and_seq_first_output(tma):
    # Both load paths: pointer arithmetic, and tensor descriptors (emulated on CPU).
    q, k, v = fused_qkv_views(s=37, b=2, hkv=2, group=1, d=64, dtype=torch.float16, seed=7)
    assert not q.is_contiguous() and not k.is_contiguous()
    config = dict(INTERPRETER_CONFIG, tma=tma)
    out, lse = attention_forward(q, k, v, causal=True, softmax_scale=0.125, seq_first_out=True,
                                 config=config)
    assert out.permute(1, 0, 2, 3).is_contiguous()  # [s, b, h, d] in memory
    ref = attention_reference(q, k, v, causal=True, softmax_scale=0.125)
    assert relerr(out, ref) < TOLERANCE[torch.float16]
    dout = torch.randn_like(ref).to(torch.float16).permute(1, 0, 2, 3).contiguous().permute(
        1, 0, 2, 3)  # strided like the gradient megatron hands back
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, causal=True, softmax_scale=0.125,
                                    dkdv_config=config, dq_config=config)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    attention_reference(q64, k64, v64, causal=True, softmax_scale=0.125).backward(dout.double())
    for got, want in [(dq, q64.grad), (dk, k64.grad), (dv, v64.grad)]:
        assert relerr(got, want) < TOLERANCE[torch.float16]


def test_gqa_views_with_copied_query():
    # With 2 query heads per KV head megatron's query reshape copies; k, v stay views.
    q, k, v = fused_qkv_views(s=21, b=1, hkv=2, group=2, d=64, dtype=torch.bfloat16, seed=11)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    check_against_reference(q, k, v, causal=True, scale=None, tol=TOLERANCE[torch.bfloat16])


def test_backward_is_deterministic():
    q, k, v = inputs(1, 40, 4, 1, 64, torch.bfloat16, seed=13)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        out = flash_attention(q, k, v)
        out.backward(torch.ones_like(out))
        grads.append([t.grad.clone() for t in (q, k, v)])
    for first, second in zip(*grads):
        assert torch.equal(first, second)




def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = inputs(1, 18, 2, 2, 64, torch.float32, seed=17)
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
    q, k, v = inputs(1, 20, 2, 1, 64, torch.float32, seed=3)
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




@pytest.mark.parametrize("variant", FWD_VARIANTS, ids=lambda v: "-".join(sorted(v)))
@pytest.mark.parametrize("causal, s", [(True, 37), (True, 64), (False, 37), (False, 64),
                                       (False, 5)])
def test_forward_variants_match_float64(variant, causal, s):
    # 32-row query blocks over 8-row key blocks: up to 7 unmasked blocks before the diagonal
    # (the pipelined loop's prologue, steady state and epilogue), the first query block with
    # none (its pipelined segment is empty; so is the whole-block segment at s = 5), s = 37
    # a partial last block; GQA 4/2.
    q, k, v = (t.detach() for t in inputs(2, s, 4, 2, 32, torch.float32, seed=s))
    config = dict(INTERPRETER_CONFIG, BLOCK_M=32, BLOCK_N=8, **variant)
    out, lse = attention_forward(q, k, v, causal=causal, softmax_scale=0.3, config=config)
    ref = attention_reference(q, k, v, causal=causal, softmax_scale=0.3)
    # fp32 operands and accumulation: only the summation order differs from float64.
    assert relerr(out, ref) < 1e-5
    torch.testing.assert_close(lse.double(), lse_reference(q, k, causal=causal, scale=0.3),
                               rtol=0, atol=1e-5)
    # negative control: the same output is far from the other masking's reference
    other = attention_reference(q, k, v, causal=not causal, softmax_scale=0.3)
    assert relerr(out, other) > 1e-2


@pytest.mark.parametrize("variant", [dict(PIPELINE=True), dict(SUBTILE=True)],
                         ids=lambda v: "-".join(sorted(v)))
def test_forward_variants_bf16_match_the_plain_kernel(variant):
    # bf16: the variants round P to bf16 exactly as the plain kernel does, block by block.
    q, k, v = (t.detach() for t in inputs(1, 45, 2, 1, 64, torch.bfloat16, seed=23))
    plain = dict(INTERPRETER_CONFIG, BLOCK_M=32, BLOCK_N=16)
    ref = attention_reference(q, k, v, causal=True, softmax_scale=None)
    out, _ = attention_forward(q, k, v, causal=True, softmax_scale=0.125,
                               config=dict(plain, **variant))
    base, _ = attention_forward(q, k, v, causal=True, softmax_scale=0.125, config=plain)
    assert relerr(out, ref) < TOLERANCE[torch.bfloat16]
    assert relerr(out, base.double()) < 1e-2


def test_forward_refuses_both_variants_at_once():
    q = torch.zeros(1, 16, 1, 32)
    with pytest.raises(ValueError, match="PIPELINE and SUBTILE"):
        attention_forward(q, q, q, causal=True, softmax_scale=1.0,
                          config=dict(INTERPRETER_CONFIG, PIPELINE=True, SUBTILE=True))






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
    q, k, v = inputs(2, s, hq, hkv, d, dtype, device="cuda", seed=s + d)
    check_against_reference(q, k, v, causal=causal, scale=None, tol=TOLERANCE[dtype], impl=impl)






@pytest.mark.cuda
def test_gpu_backward_is_deterministic():
    q, k, v = inputs(2, 2048, 8, 2, 128, torch.bfloat16, device="cuda", seed=1)
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
    q, k, v = (t.detach() for t in inputs(2, s, hq, hkv, d, torch.bfloat16, device="cuda",
                                            seed=s + d))
    # the tuned blocks of the plain kernel, the variant on top
    config = {**dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, tma=False), **variant}
    out, lse = attention_forward(q, k, v, causal=causal, softmax_scale=d ** -0.5, config=config)
    ref = attention_reference(q, k, v, causal=causal, softmax_scale=d ** -0.5)
    assert relerr(out, ref) < TOLERANCE[torch.bfloat16]
    # the scores' dot accumulates in fp32 over the same bf16 operands: LSE (~7) to ~1e-5
    torch.testing.assert_close(lse.double(), lse_reference(q, k, causal=causal, scale=d ** -0.5),
                               rtol=0, atol=1e-3)

