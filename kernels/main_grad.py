"""The one rule for a weight whose gradient a kernel has already added into megatron DDP's
fp32 `main_grad` (kernels.wgrad's linears, the norms, the embedding, the fused loss).

megatron-core 0.16.1's DDP hook adds `param.grad` into `main_grad` unless the parameter is
marked `grad_added_to_main_grad`, or always when it is marked `zero_out_wgrad`; autograd must
still get a gradient so that the hook runs. `handed_over(weight)` marks the weight and
returns that gradient: uninitialised (never read), or zeros under `zero_out_wgrad`, where the
hook adds it anyway.
"""

from __future__ import annotations

import torch


def placeholder(weight: torch.Tensor) -> torch.Tensor:
    """What autograd gets for a weight whose gradient is already in main_grad."""
    make = torch.zeros_like if getattr(weight, "zero_out_wgrad", False) else torch.empty_like
    return make(weight)


def handed_over(weight: torch.Tensor) -> torch.Tensor:
    """Mark `weight`'s gradient as added into main_grad; return autograd's placeholder."""
    weight.grad_added_to_main_grad = True
    return placeholder(weight)
