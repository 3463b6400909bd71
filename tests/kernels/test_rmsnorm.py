"""kernels.rmsnorm against the float64 formula: forward, dx and dw over random shapes and dtypes.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay small;
the `cuda` tests repeat the check at training sizes on a GPU.
"""

import random

import pytest
import torch

from kernels import rmsnorm
from kernels.rmsnorm import backward_config, reference, rms_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Normwise relative error bound ||out - ref|| / ||ref|| for each dtype. Inputs are exact in
# the dtype and all arithmetic is fp32, so the error is the final rounding to the dtype
# (at most its unit roundoff u per element, hence at most u normwise) plus fp32 arithmetic:
# sums of up to 16384 fp32 terms err by about sqrt(H) * 2^-24 < 1e-5 relative.
# Triton's CPU interpreter truncates fp32 -> bf16 instead of rounding to nearest (up to 2u
# per element; checked on triton 3.9), so bf16 gets 2u there and u on a GPU.
_BF16_U = 2.0**-8  # 8 significand bits
TOLERANCE = {
    torch.bfloat16: (_BF16_U if DEVICE == "cuda" else 2 * _BF16_U) + 1e-5,
    torch.float16: 2.0**-11 + 1e-5,  # u = 2^-11; the interpreter rounds fp16 to nearest
    torch.float32: 1e-5,  # fp32 arithmetic alone
}
HIDDEN_SIZES = (1000, 2048, 5120, 6656, 8192, 16384)  # from the issue; most not powers of two
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _relerr(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _random_case(seed: int):
    """A leading shape of 1-3 dims (2..40 rows in all), a hidden size, a dtype, an eps."""
    rng = random.Random(seed)
    hidden = rng.choice(HIDDEN_SIZES + (rng.randint(1, 3000),))
    max_rows = max(2, 40 * 1024 // hidden)  # the interpreter's cost grows with rows * hidden
    lead = [rng.randint(1, 6) for _ in range(rng.randint(1, 3))]
    while torch.Size(lead).numel() > max_rows:
        lead[rng.randrange(len(lead))] = max(1, lead[rng.randrange(len(lead))] // 2)
    return tuple(lead) + (hidden,), rng.choice(DTYPES), rng.choice((1e-5, 1e-6, 1e-2))


def _check_against_reference(shape, dtype, eps, device=DEVICE, scale=1.0):
    x = (torch.randn(shape, device=device) * scale).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(shape[-1], device=device)).to(dtype).requires_grad_()
    dy = torch.randn(shape, device=device).to(dtype)
    y = rms_norm(x, w, eps=eps)
    y.backward(dy)

    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = reference(x64, w64, eps)
    y64.backward(dy.double())

    assert y.dtype == dtype and y.shape == x.shape
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    tol = TOLERANCE[dtype]
    for name, out, ref in (("y", y, y64), ("dx", x.grad, x64.grad), ("dw", w.grad, w64.grad)):
        assert torch.isfinite(out).all(), name
        err = _relerr(out, ref)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.2e} ({shape}, {dtype})"


@pytest.mark.parametrize("seed", range(10))
def test_random_shapes_match_float64(seed):
    torch.manual_seed(seed)
    shape, dtype, eps = _random_case(seed)
    _check_against_reference(shape, dtype, eps)


@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
def test_each_issue_hidden_size_bf16(hidden):
    torch.manual_seed(hidden)
    # More rows than the backward grid has programs, so programs walk several row tiles.
    rows = 4 * backward_config(hidden).block_m + 1
    _check_against_reference((rows, hidden), torch.bfloat16, 1e-5)


def test_column_blocks_split_only_rows_that_waste_a_quarter():
    assert rmsnorm.column_blocks(5120) == (4096, 1024)  # 5120 of 8192 lanes: split, exact
    assert rmsnorm.column_blocks(3000) == (2048, 1024)  # 3072 lanes instead of 4096
    assert rmsnorm.column_blocks(6656) == (8192, 0)  # 81% used: one block
    assert rmsnorm.column_blocks(4096) == (4096, 0)
    assert rmsnorm.column_blocks(5120, split=False) == (8192, 0)


@pytest.mark.parametrize("hidden", (5120, 1000, 2500))
def test_every_launch_variant_matches_float64(hidden):
    """Split, unsplit and chunked rows, the hand prefetch and the plain loop, several rows
    per tile, the persistent forward: each against the formula (the launch sweep of
    benchmarks/bench_rmsnorm.py picks among them, so each must be right). 11 rows: programs walk several tiles, the last partial."""
    torch.manual_seed(hidden)
    x = torch.randn(11, hidden, device=DEVICE).to(torch.bfloat16)
    w = (1 + 0.5 * torch.randn(hidden, device=DEVICE)).to(torch.bfloat16)
    dy = torch.randn_like(x)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = reference(x64, w64)
    y64.backward(dy.double())
    tol = TOLERANCE[torch.bfloat16]
    F, B = rmsnorm.ForwardConfig, rmsnorm.BackwardConfig
    for cfg in (F(1, 4), F(2, 4, split=False), F(4, 8),
                # chunked rows (5120: 5 x 1024 exact; 1000, 2500: the last chunk masked),
                # one tile per program or persistent with the next tile prefetched
                F(1, 4, chunk=1024), F(2, 4, chunk=512, programs_per_sm=1),
                F(1, 4, programs_per_sm=2),
                # cache hints, the packed row (one row a warp, persistent, one chunk)
                F(1, 1, chunk=1024, packed=True, evict_first=False),
                F(2, 4, chunk=512, programs_per_sm=1, packed=True, stream_store=True),
                F(4, 8, packed=True),
                # TMA (2500: rows of 5000 bytes, not 16-byte aligned: the chunked fallback)
                F(1, 4, chunk=1024, programs_per_sm=1, tma_stages=3),
                F(2, 4, chunk=512, programs_per_sm=2, tma_stages=2),
                # two passes over the row (1000: the last chunk masked; chunk 0: 1024)
                F(1, 4, two_pass=True), F(2, 4, chunk=256, two_pass=True),
                F(1, 8, chunk=512, programs_per_sm=2, two_pass=True)):
        assert _relerr(rmsnorm.forward(x, w, 1e-5, cfg), y64) <= tol, cfg
    for cfg in (B(1, 4, 1, prefetch=True), B(2, 4, 1, prefetch=False, split=False),
                B(2, 4, 2, prefetch=True, split=False), B(4, 8, 1, num_stages=2),
                B(1, 4, 1, prefetch=True, chunk=1024),
                B(2, 4, 1, prefetch=False, chunk=512, weight_in_registers=False),
                B(1, 4, 2, prefetch=True, chunk=256, weight_in_registers=False),
                B(2, 4, 2, prefetch=True, split=False, evict_first=False),
                B(1, 4, 1, prefetch=False, chunk=1024, evict_first=False),
                B(1, 4, 2, two_pass=True), B(2, 4, 1, chunk=256, two_pass=True),
                B(1, 8, 3, chunk=512, two_pass=True)):
        dx, dw = rmsnorm.backward(dy, x, w, 1e-5, cfg)
        assert _relerr(dx, x64.grad) <= tol and _relerr(dw, w64.grad) <= tol, cfg


def test_eps_dominates_small_inputs():
    # With mean(x^2) ~ 1e-6 << eps the output shrinks by sqrt(eps); a kernel that dropped
    # or misplaced eps would be off by orders of magnitude.
    torch.manual_seed(0)
    _check_against_reference((6, 1000), torch.float32, 1e-2, scale=1e-3)


def test_strided_rows_and_expanded_grad():
    torch.manual_seed(1)
    base = torch.randn(9, 1200, device=DEVICE)
    x = base[:, 100:1124].requires_grad_()  # row stride 1200 != hidden 1024
    w = torch.randn(1024, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w)
    y.sum().backward()  # dy is an expanded scalar: stride 0 everywhere
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    reference(x64, w64).sum().backward()
    assert _relerr(y, reference(x64.detach(), w64.detach())) <= TOLERANCE[torch.float32]
    assert _relerr(x.grad, x64.grad) <= TOLERANCE[torch.float32]
    assert _relerr(w.grad, w64.grad) <= TOLERANCE[torch.float32]


def test_deterministic_and_no_writes_into_inputs():
    torch.manual_seed(2)
    x = torch.randn(3, 7, 2048, device=DEVICE).to(torch.bfloat16)
    w = torch.randn(2048, device=DEVICE).to(torch.bfloat16)
    dy = torch.randn_like(x)
    x_before, dy_before = x.clone(), dy.clone()
    results = []
    for _ in range(2):
        xr = x.clone().requires_grad_()
        wr = w.clone().requires_grad_()
        y = rms_norm(xr, wr)
        y.backward(dy)
        # y owns exactly its own storage: megatron's recompute resizes and refills it.
        assert y.untyped_storage().nbytes() == y.numel() * y.element_size()
        assert y.untyped_storage().data_ptr() != xr.untyped_storage().data_ptr()
        results.append((y.detach(), xr.grad, wr.grad))
    assert torch.equal(x, x_before) and torch.equal(dy, dy_before)
    for a, b in zip(*results):
        assert torch.equal(a, b)  # bitwise: no atomics, fixed reduction order


def test_empty_input_and_shape_errors():
    w = torch.ones(64, device=DEVICE, requires_grad=True)
    x = torch.empty(0, 64, device=DEVICE, requires_grad=True)
    y = rms_norm(x, w)
    y.sum().backward()
    assert y.shape == (0, 64)
    assert torch.equal(w.grad, torch.zeros_like(w))
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(torch.randn(2, 64, device=DEVICE), torch.ones(32, device=DEVICE))


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(16384, 4096), (8192, 5120), (4096, 8192), (1024, 16384), (3000, 1000)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_sizes_on_gpu(shape, dtype):
    torch.manual_seed(3)
    _check_against_reference(shape, dtype, 1e-5, device="cuda")


# --------------------------------------------------------------------------- main_grad


def _tagged(w: torch.Tensor, main_grad: torch.Tensor) -> torch.Tensor:
    """w as megatron DDP holds it under the weight-gradient fusion (kernels.megatron_norm)."""
    tagged = w.detach().clone().requires_grad_()
    tagged.fused_main_grad = True
    tagged.main_grad = main_grad
    tagged.grad_added_to_main_grad = False
    return tagged


def _two_passes(hidden=1000, rows=11, seed=8):
    gen = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(rows, hidden, generator=gen).to(torch.bfloat16).to(DEVICE)  # noqa: E731
    w = (1 + 0.5 * torch.randn(hidden, generator=gen)).to(torch.bfloat16).to(DEVICE)
    start = torch.randn(hidden, generator=gen).to(DEVICE)  # what earlier micro-batches left
    return [(make(), make()) for _ in range(2)], w, start


def test_tagged_weight_accumulates_dw_into_fp32_main_grad():
    """Two backward passes into main_grad (bf16 x, dy and weight; fp32 buffer): the same fp32
    sums as the untagged kernel's dw for an fp32 copy of the weight (identical arithmetic:
    bf16 -> fp32 is exact), added to the buffer in fp32; and no bf16 rounding of dw."""
    passes, w, start = _two_passes()
    tagged = _tagged(w, start.clone())
    expected, expected64, rounded = start.clone(), start.double(), start.double()
    for x, dy in passes:
        rms_norm(x, tagged).backward(dy)
        assert tagged.grad_added_to_main_grad and tagged.grad.shape == w.shape
        tagged.grad = None  # as DDP's hook does
        w32 = w.float().requires_grad_()
        rms_norm(x, w32).backward(dy)
        expected += w32.grad  # the untagged path's dw, summed in fp32
        w64 = w.double().requires_grad_()
        reference(x.double(), w64).backward(dy.double())
        expected64 += w64.grad
        wb = w.clone().requires_grad_()
        rms_norm(x, wb).backward(dy)
        rounded += wb.grad.double()  # the old path: dw rounded to bf16, then added
    # Same kernel, same order, two fp32 adds: equal up to an fp32 ulp of the sums.
    torch.testing.assert_close(tagged.main_grad, expected, rtol=1e-6, atol=1e-6)
    # fp32 all the way: within fp32 sums of the float64 answer (1e-5 normwise); the bf16
    # path is off by its rounding (~2^-9 relative), the negative control of this bound.
    assert _relerr(tagged.main_grad, expected64) <= 1e-5
    assert _relerr(rounded, expected64) > 1e-4


def test_untagged_or_bufferless_weight_keeps_the_autograd_gradient():
    """Negative controls: without the tag, or tagged but not (yet) in DDP (no main_grad),
    dw reaches w.grad in w's dtype and a buffer beside it stays untouched."""
    passes, w, _ = _two_passes()
    x, dy = passes[0]
    untagged = _tagged(w, torch.zeros(w.shape[0], device=DEVICE))
    untagged.fused_main_grad = False
    bufferless = w.detach().clone().requires_grad_()
    bufferless.fused_main_grad = True
    plain = w.detach().clone().requires_grad_()
    for t in (untagged, bufferless, plain):
        rms_norm(x, t).backward(dy)
    assert torch.equal(untagged.main_grad, torch.zeros_like(untagged.main_grad))
    assert untagged.grad_added_to_main_grad is False
    assert untagged.grad.dtype == torch.bfloat16
    assert torch.equal(untagged.grad, plain.grad) and torch.equal(bufferless.grad, plain.grad)


def test_zero_out_wgrad_gets_a_zero_placeholder_and_16_bit_buffers_work():
    """megatron's DDP hook adds the grad even when flagged if `zero_out_wgrad`: it must be 0.
    A bf16 main_grad (grad_reduce_in_fp32 off) gets the fp32 sum rounded once."""
    passes, w, start = _two_passes(hidden=64, rows=20)
    (x, dy) = passes[0]
    tagged = _tagged(w, start.to(torch.bfloat16))
    tagged.zero_out_wgrad = True
    rms_norm(x, tagged).backward(dy)
    assert torch.equal(tagged.grad, torch.zeros_like(tagged.grad))
    w64 = w.double().requires_grad_()
    reference(x.double(), w64).backward(dy.double())
    expected = start.to(torch.bfloat16).double() + w64.grad
    assert tagged.main_grad.dtype == torch.bfloat16
    assert _relerr(tagged.main_grad, expected) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_and_hinted_forward_is_bitwise_the_plain_one(dtype):
    """The packed row is widened a second time for the store (bf16 by a bit shift, which
    no CSE merges with the reduction's conversion): the same fp32 arithmetic as the
    unpacked kernel, so y must be bitwise equal, as with cache hints (which change no
    value) and the TMA kernel (the same sums in the same order, rows by descriptors).
    Negative control: a different eps changes y."""
    torch.manual_seed(11)
    x = (torch.randn(7, 1000, device=DEVICE) * 3).to(dtype)
    w = (1 + 0.5 * torch.randn(1000, device=DEVICE)).to(dtype)
    F = rmsnorm.ForwardConfig
    plain = rmsnorm.forward(x, w, 1e-5, F(2, 4, chunk=256))
    for cfg in (F(2, 4, chunk=256, packed=True), F(2, 4, chunk=256, evict_first=False,
                                                   stream_store=True, packed=True),
                F(1, 4, chunk=256, programs_per_sm=1, packed=True),
                F(2, 4, chunk=256, programs_per_sm=1, tma_stages=2)):
        assert torch.equal(rmsnorm.forward(x, w, 1e-5, cfg), plain), cfg
    assert not torch.equal(rmsnorm.forward(x, w, 1e-1, F(2, 4, chunk=256, packed=True)), plain)


def test_two_pass_kernels_agree_with_the_one_pass_ones():
    """fp32, 7 rows of 1000 (a ragged last chunk of 256): the two-pass forward and backward
    against the one-pass kernels within fp32 summation error (the sums regroup by chunk);
    control: the same comparison with another eps fails."""
    torch.manual_seed(3)
    x, dy = torch.randn(7, 1000, device=DEVICE), torch.randn(7, 1000, device=DEVICE)
    w = 1 + 0.5 * torch.randn(1000, device=DEVICE)
    fwd, bwd = _F(1, 4, chunk=256, two_pass=True), _B(1, 4, 2, chunk=256, two_pass=True)
    y = rmsnorm.forward(x, w, 1e-5)
    dx, dw = rmsnorm.backward(dy, x, w, 1e-5, _B(1, 4, 1))
    assert _relerr(rmsnorm.forward(x, w, 1e-5, fwd), y.double()) <= 1e-6
    dx2, dw2 = rmsnorm.backward(dy, x, w, 1e-5, bwd)
    assert _relerr(dx2, dx.double()) <= 1e-6 and _relerr(dw2, dw.double()) <= 1e-6
    x_small = x * 1e-2  # where eps matters
    assert _relerr(rmsnorm.forward(x_small, w, 1e-1, fwd), rmsnorm.forward(x_small, w, 1e-5).double()) > 1e-2
    assert _relerr(rmsnorm.backward(dy, x_small, w, 1e-1, bwd)[0],
                   rmsnorm.backward(dy, x_small, w, 1e-5)[0].double()) > 1e-2


def test_plans_pass_every_constexpr_in_signature_order():
    """kernels.fast_launch launches directly only when the constexprs follow the runtime
    arguments in signature order (else it raises on a GPU; the interpreter never checks):
    every plan of every sweep candidate gives the kernel's trailing parameters, in order."""
    from benchmarks.rmsnorm_sweep import backward_candidates, forward_candidates

    plans = []
    for n in (4096, 5120, 8192):
        plans += [rmsnorm._forward_plan(n, cfg) for cfg in forward_candidates(n)]
        plans += [rmsnorm._backward_plan(n, cfg) for cfg in backward_candidates(n)]
    # all seven: block, chunked, TMA and two-pass forward; block, chunked and two-pass backward
    assert len({id(launch.kernel) for launch, _ in plans}) == 7
    for launch, constexprs in plans:
        names = list(launch.kernel.arg_names)
        assert names[len(names) - len(constexprs):] == list(constexprs), names


def test_backward_refuses_a_main_grad_it_cannot_add_into():
    x = torch.randn(3, 64, device=DEVICE)
    w = torch.ones(64, device=DEVICE)
    with pytest.raises(ValueError, match="main_grad"):
        rmsnorm.backward(x, x, w, 1e-5, main_grad=torch.zeros(128, device=DEVICE)[::2])
    with pytest.raises(ValueError, match="main_grad"):
        rmsnorm.backward(x, x, w, 1e-5, main_grad=torch.zeros(32, device=DEVICE))


_F, _B = rmsnorm.ForwardConfig, rmsnorm.BackwardConfig


@pytest.mark.cuda
@pytest.mark.parametrize("shape,cfg", [
    ((8192, 5120), _F(1, 4, chunk=1024)), ((8192, 5120), _F(1, 8, chunk=1024, programs_per_sm=4)),
    ((4096, 4096), _F(1, 4, programs_per_sm=2)), ((3001, 8192), _F(1, 8, programs_per_sm=2)),
    ((8192, 5120), _B(1, 8, 1, True, chunk=1024)),
    ((8192, 5120), _B(1, 8, 2, True, chunk=1024, weight_in_registers=False)),
    ((3001, 5120), _B(1, 4, 3, False, chunk=1024, weight_in_registers=False)),
    ((8192, 5120), _F(1, 4, chunk=1024, packed=True, evict_first=False, stream_store=True)),
    ((3001, 5120), _F(1, 1, chunk=1024, packed=True)),
    ((16384, 4096), _F(4, 16, packed=True)),
    ((3001, 8192), _F(1, 8, packed=True, programs_per_sm=2)),
    ((3001, 8192), _B(1, 16, 1, True, evict_first=False)),
    # two passes over the row (kernels/rmsnorm_two_pass.py)
    ((3001, 8192), _F(1, 8, chunk=1024, two_pass=True)), ((8192, 5120), _F(2, 8, two_pass=True)),
    ((3001, 8192), _B(1, 8, 2, chunk=1024, two_pass=True)),
    ((8192, 5120), _B(1, 4, 4, chunk=2048, two_pass=True)),
])
def test_chunked_and_persistent_kernels_match_float64_on_gpu(shape, cfg):
    """The compiled chunked and persistent kernels (the interpreter runs them above) at
    training sizes, odd row counts included, within bf16's unit roundoff (as the rest)."""
    torch.manual_seed(4)
    x = torch.randn(shape, device="cuda").to(torch.bfloat16)
    w = (1 + 0.5 * torch.randn(shape[-1], device="cuda")).to(torch.bfloat16)
    dy = torch.randn_like(x)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = reference(x64, w64)
    tol = TOLERANCE[torch.bfloat16]
    if isinstance(cfg, _F):
        assert _relerr(rmsnorm.forward(x, w, 1e-5, cfg), y64) <= tol
        return
    y64.backward(dy.double())
    dx, dw = rmsnorm.backward(dy, x, w, 1e-5, cfg)
    assert _relerr(dx, x64.grad) <= tol and _relerr(dw, w64.grad) <= tol


@pytest.mark.cuda
@pytest.mark.parametrize("shape,cfg", [
    ((8192, 5120), _F(1, 4, chunk=1024, programs_per_sm=2, tma_stages=3)),
    ((3001, 5120), _F(1, 4, chunk=1024, programs_per_sm=1, tma_stages=4)),
    ((16384, 4096), _F(1, 4, programs_per_sm=4, tma_stages=2)),
    ((3001, 8192), _F(1, 8, programs_per_sm=2, tma_stages=3)),
])
def test_tma_forward_matches_float64_on_gpu(shape, cfg):
    """The TMA forward compiled (descriptors made on the device, scratch from the allocator
    the launcher sets), odd row counts included (zero-filled loads, clipped stores), within
    bf16's unit roundoff; bitwise the chunked persistent kernel (same sums, same order)."""
    torch.manual_seed(6)
    x = torch.randn(shape, device="cuda").to(torch.bfloat16)
    w = (1 + 0.5 * torch.randn(shape[-1], device="cuda")).to(torch.bfloat16)
    y = rmsnorm.forward(x, w, 1e-5, cfg)
    assert _relerr(y, reference(x.double(), w.double())) <= TOLERANCE[torch.bfloat16]
    assert torch.equal(y, rmsnorm.forward(x, w, 1e-5, cfg._replace(tma_stages=0)))


@pytest.mark.cuda
@pytest.mark.parametrize("offset", [0, 1])  # 1: main_grad's pointer not 16-byte aligned
def test_main_grad_accumulation_on_gpu(offset):
    """The compiled ACCUMULATE reduction at a training size, into a view of a larger fp32
    buffer as megatron's grad buffer hands out: the fp32 sums of the untagged kernel for an
    fp32 copy of w, added twice (1e-6: two fp32 adds), and the buffer around it untouched."""
    torch.manual_seed(5)
    rows, hidden = 4096, 5120
    w = (1 + 0.5 * torch.randn(hidden, device="cuda")).to(torch.bfloat16)
    buffer = torch.full((hidden + 2,), 7.0, device="cuda")
    tagged = _tagged(w, buffer[offset:offset + hidden])
    expected = torch.full((hidden,), 7.0, device="cuda")
    for _ in range(2):
        x = torch.randn(rows, hidden, device="cuda").to(torch.bfloat16)
        dy = torch.randn_like(x)
        rms_norm(x, tagged).backward(dy)
        w32 = w.float().requires_grad_()
        rms_norm(x, w32).backward(dy)
        expected += w32.grad
    torch.testing.assert_close(tagged.main_grad, expected, rtol=1e-6, atol=1e-5)
    outside = torch.cat([buffer[:offset], buffer[offset + hidden:]])
    assert torch.equal(outside, torch.full_like(outside, 7.0))


@pytest.mark.parametrize("accumulate", [False, True])
def test_dw_reduction_passes_agree_with_torch(accumulate):
    """The dw reduction in 5 passes of 32 partial rows (the old plan) or 1 of 256 (H200's
    132 partials): both the fp32 sum over partials within fp32 rounding (1e-6 relative,
    132 terms), each bitwise reproducible; with ACCUMULATE on top of the buffer."""
    gen = torch.Generator().manual_seed(9)
    programs, n = 132, 100
    partial = torch.randn(programs, n, generator=gen).to(DEVICE)
    start = torch.randn(n, generator=gen).to(DEVICE)
    expected = partial.double().sum(0) + (start.double() if accumulate else 0)
    results = []
    for rows in (32, 256, 256):
        constexprs, warps = rmsnorm.dw_reduce_plan(programs, accumulate, rows)
        assert constexprs["BLOCK_P"] == rows and constexprs["BLOCK_P"] * constexprs["BLOCK_C"] <= 8192
        dw = start.clone()
        grid = (-(-n // constexprs["BLOCK_C"]),)
        rmsnorm._dw_reduce_kernel[grid](partial, dw, programs, n, **constexprs, num_warps=warps)
        assert _relerr(dw, expected) <= 1e-6, rows
        results.append(dw)
    assert torch.equal(results[1], results[2])
    assert not torch.equal(results[0], start)  # it wrote
