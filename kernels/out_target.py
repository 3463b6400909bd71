"""Output targets: where a kernel writes an output that its consumer wants in a given place.

`layout.wgrad_defer=step` (kernels/wgrad_defer.py) keeps each decoder linear's input X and
output gradient dY of every micro-batch in an arena; the kernels that produce those tensors
(norms, SwiGLU, RoPE's fused QKV gradient, the add+norm) write straight into the arena's
slot instead of into a fresh tensor the linear would then copy. Their autograd Functions
take a `Target`: a callable `(shape, dtype) -> Tensor | None` asked at allocation time (in
the forward for an output, in the backward for a gradient), set per module by
kernels/defer_wiring.py; None (the default everywhere) allocates as before.

`take` applies the rules every launcher needs: the target must have exactly the output's
shape and dtype, be contiguous, on the output's device, and 16-byte aligned (the
alignment Triton specializes pointers on, and kernels.fast_launch's cached launches assume
of fresh outputs); anything else is ignored and the output allocated as usual (the consumer
then copies it). A launcher given an explicit `out` (`empty`) refuses an unusable one.
Which target a producer may take is the wiring's rule (kernels/defer_wiring.py): only where
its very output reaches the consumer, whose copy into the slot would otherwise overwrite it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

Target = Optional[Callable[[tuple, torch.dtype], Optional[torch.Tensor]]]


def usable(out: Optional[torch.Tensor], shape, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `out` can stand in for a fresh contiguous tensor of (shape, dtype, device)."""
    return (out is not None and tuple(out.shape) == tuple(shape) and out.dtype == dtype
            and out.device == device and out.is_contiguous() and out.data_ptr() % 16 == 0)


def take(target: Target, shape, dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    """The tensor `target` offers for an output of (shape, dtype, device), if usable; else None."""
    if target is None:
        return None
    out = target(tuple(shape), dtype)
    return out if usable(out, shape, dtype, device) else None


def empty(out: Optional[torch.Tensor], shape, dtype: torch.dtype, device: torch.device,
          name: str = "out") -> torch.Tensor:
    """A launcher's output: a fresh contiguous tensor when `out` is None, else `out` itself,
    which must be usable (a ValueError otherwise: an explicit target is never ignored)."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not usable(out, shape, dtype, device):
        raise ValueError(f"{name} must be a contiguous, 16-byte aligned {tuple(shape)} {dtype} tensor on "
                         f"{device}, got {tuple(out.shape)} {out.dtype} on {out.device} with strides {out.stride()}")
    return out
