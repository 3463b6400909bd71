"""kernels.main_grad: the placeholder rule every kernel that adds into megatron DDP's main_grad
shares (megatron-core 0.16.1's hook skips a marked weight, but adds `zero_out_wgrad` ones anyway)."""

from unittest import mock

import torch

from kernels import main_grad
from kernels.add_rmsnorm import add_rms_norm
from kernels.fused_ce import fused_linear_cross_entropy


def test_handed_over_marks_the_weight_and_gives_zeros_only_under_zero_out_wgrad():
    w = torch.randn(8, 4)
    w.grad_added_to_main_grad = False
    placeholder = main_grad.handed_over(w)
    assert w.grad_added_to_main_grad and placeholder.shape == w.shape and placeholder.dtype == w.dtype
    w.zero_out_wgrad = True
    assert torch.equal(main_grad.handed_over(w), torch.zeros_like(w))


def _tagged(weight, tag):
    weight = weight.clone().requires_grad_()
    setattr(weight, tag, True)
    weight.main_grad = torch.zeros(weight.shape, dtype=torch.float32)
    weight.grad_added_to_main_grad = False
    return weight


def test_fused_norm_and_loss_hand_autograd_the_shared_placeholder():
    """Both used to make their own torch.empty, ignoring zero_out_wgrad (which DDP's hook then
    adds): a marker placeholder must now reach autograd from both, the gradient the buffer."""
    gen = torch.Generator().manual_seed(0)
    marker = lambda w: torch.full_like(w, 3.0)  # noqa: E731 - never a real gradient
    a, r = torch.randn(6, 32, generator=gen), torch.randn(6, 32, generator=gen)
    w = _tagged(torch.rand(32, generator=gen) + 0.5, "fused_main_grad")
    x = torch.randn(6, 32, generator=gen)
    out_w = _tagged(torch.randn(16, 32, generator=gen), "fused_ce_main_grad")
    with mock.patch.object(main_grad, "placeholder", marker):
        h, y = add_rms_norm(a, r, w)
        (h.sum() + y.sum()).backward()
        fused_linear_cross_entropy(x, out_w, torch.randint(0, 16, (6,), generator=gen)).backward()
    for weight in (w, out_w):
        assert weight.grad_added_to_main_grad and torch.equal(weight.grad, marker(weight))
        assert weight.main_grad.abs().sum() > 0  # the gradient went into the buffer instead
