"""kernels.swiglu against the float64 formula: forward and dx over odd shapes and dtypes,
the megatron MLP built with it, and (cuda) megatron's own compiled SwiGLU at training size.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay small.
"""

from types import SimpleNamespace

import pytest
import torch

from kernels.swiglu import TritonSwiGLU, reference, swiglu
from kernels.swiglu import backward as swiglu_backward
from kernels.swiglu import forward as swiglu_forward
from tests.kernels.slots import Slots, tap

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_BF16_U = 2.0**-8
# Normwise relative error ||out - ref|| / ||ref||: inputs are exact in the dtype and all
# arithmetic is fp32, so the error is the final rounding to the dtype (u per element;
# Triton's CPU interpreter truncates to bf16, up to 2u) plus fp32 sigmoid error (< 1e-6).
TOLERANCE = {
    torch.bfloat16: (_BF16_U if DEVICE == "cuda" else 2 * _BF16_U) + 1e-5,
    torch.float32: 1e-5,
}


def _relerr(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 2, 2 * 37), (5, 2 * 1500), (1, 1, 2 * 1024)])
def test_forward_and_backward_match_float64(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).to(DEVICE)
    dy = torch.randn(*shape[:-1], shape[-1] // 2, generator=gen).to(dtype).to(DEVICE)
    x_ref = x.detach().double().requires_grad_()
    y_ref = reference(x_ref)
    y_ref.backward(dy.double())

    x_ours = x.detach().requires_grad_()
    y = swiglu(x_ours)
    y.backward(dy)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert x_ours.grad.dtype == dtype and x_ours.grad.shape == x.shape
    assert _relerr(y, y_ref.detach()) <= TOLERANCE[dtype]
    # Each half of dx on its own: a swapped or zeroed half would pass a whole-tensor norm test.
    f = shape[-1] // 2
    for half in (slice(0, f), slice(f, 2 * f)):
        assert _relerr(x_ours.grad[..., half], x_ref.grad[..., half]) <= 2 * TOLERANCE[dtype]


def test_a_wrong_formula_fails_the_same_check():
    """Negative control: the check above tells silu(b) * a (halves swapped) from the kernel."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2 * 64, generator=gen).to(DEVICE)
    a, b = torch.chunk(x.double(), 2, dim=-1)
    swapped = torch.nn.functional.silu(b) * a
    assert _relerr(swiglu(x), reference(x)) <= TOLERANCE[torch.float32]
    assert _relerr(swapped, reference(x)) > 0.1


def test_non_contiguous_rows_and_odd_width():
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(6, 2 * 50 + 8, generator=gen).to(DEVICE)
    x = wide[:, 4:4 + 100]  # rows strided past the last dimension
    assert _relerr(swiglu(x), reference(x)) <= TOLERANCE[torch.float32]
    with pytest.raises(ValueError, match="even last dimension"):
        swiglu(torch.zeros(2, 7, device=DEVICE))


def test_module_refuses_a_config_that_is_not_swiglu():
    config = SimpleNamespace(gated_linear_unit=False, activation_func=torch.nn.functional.silu,
                             add_bias_linear=False)
    with pytest.raises(ValueError, match="gated_linear_unit"):
        TritonSwiGLU(config)
    config.gated_linear_unit, config.add_bias_linear = True, True
    with pytest.raises(ValueError, match="bias"):
        TritonSwiGLU(config)
    config.add_bias_linear = False
    TritonSwiGLU(config)  # megatron's llama config: accepted


@pytest.mark.cuda
def test_matches_megatron_compiled_swiglu_at_training_size():
    """Against megatron-core's own fused SwiGLU (torch.compile'd, the stock path) on
    llama_1b3's mbs-8 fc1 output [2048, 8, 2 * 5632] in bf16: both compute in fp32 and round
    once to bf16, so they agree to within one bf16 rounding of each other (2u normwise)."""
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2048, 8, 2 * 5632, device="cuda", generator=gen).to(torch.bfloat16)
    dy = torch.randn(2048, 8, 5632, device="cuda", generator=gen).to(torch.bfloat16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = swiglu(x1)
    y1.backward(dy)
    y2 = bias_swiglu_impl(x2, None)
    y2.backward(dy)
    assert _relerr(y1, y2.double()) <= 2 * _BF16_U
    assert _relerr(x1.grad, x2.grad.double()) <= 2 * _BF16_U


def _swiglu_run(x, dy, **targets):
    seen = []
    x = tap(x.detach().clone().requires_grad_(), seen)
    y = swiglu(x, **targets)
    y.backward(dy)
    return y, seen[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_targets_receive_y_and_dx_unchanged(dtype):
    """layout.wgrad_defer: y (FC2's input) and dx (FC1's dY) written into the slots offered,
    bit-identical to the default path's fresh tensors, which lie outside them (control)."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 3, 2 * 40, generator=gen) * 3).to(dtype).to(DEVICE)
    dy = torch.randn(4, 3, 40, generator=gen).to(dtype).to(DEVICE)
    plain_y, plain_dx = _swiglu_run(x, dy)
    ys, dxs = Slots((4, 3, 40), dtype, DEVICE), Slots(x.shape, dtype, DEVICE)
    y, dx = _swiglu_run(x, dy, y_target=ys.target, dx_target=dxs.target)
    assert torch.equal(y, plain_y) and torch.equal(dx, plain_dx)
    assert ys.holds(y) and dxs.holds(dx) and ys.untouched_elsewhere() and dxs.untouched_elsewhere()
    assert ys.asked == [((4, 3, 40), dtype)] and dxs.asked == [(tuple(x.shape), dtype)]
    assert not ys.holds(plain_y) and not dxs.holds(plain_dx)


def test_unusable_targets_are_ignored_and_a_wrong_out_refused():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 2 * 40, generator=gen).to(DEVICE)
    dy = torch.randn(4, 40, generator=gen).to(DEVICE)
    plain_y, plain_dx = _swiglu_run(x, dy)
    wrong = [Slots((4, 41), torch.float32, DEVICE), Slots((4, 40), torch.bfloat16, DEVICE)]
    strided = torch.zeros(4, 80, device=DEVICE)[:, ::2]
    for target in [w.target for w in wrong] + [lambda shape, dtype: strided, lambda shape, dtype: None]:
        y, dx = _swiglu_run(x, dy, y_target=target, dx_target=target)
        assert torch.equal(y, plain_y) and torch.equal(dx, plain_dx)
    assert all(w.buffer.isnan().all() for w in wrong)
    with pytest.raises(ValueError, match="contiguous"):
        swiglu_forward(x, out=strided)
    with pytest.raises(ValueError, match="dx must be"):
        swiglu_backward(dy, x, out=torch.empty(4, 80, dtype=torch.bfloat16, device=DEVICE))


@pytest.mark.cuda
def test_targets_at_training_size_on_gpu():
    """llama_1b3 at mbs 1 ([2048, 1, 2 * 5632] bf16): the same bits with and without slots."""
    x = torch.randn(2048, 1, 2 * 5632, device="cuda").to(torch.bfloat16)
    dy = torch.randn(2048, 1, 5632, device="cuda").to(torch.bfloat16)
    plain_y, plain_dx = _swiglu_run(x, dy)
    ys, dxs = Slots(dy.shape, torch.bfloat16, "cuda"), Slots(x.shape, torch.bfloat16, "cuda")
    y, dx = _swiglu_run(x, dy, y_target=ys.target, dx_target=dxs.target)
    assert torch.equal(y, plain_y) and torch.equal(dx, plain_dx)
    assert ys.holds(y) and dxs.holds(dx) and ys.untouched_elsewhere() and dxs.untouched_elsewhere()
