"""A stand-in for a wgrad_defer arena in producer tests (kernels/out_target.py targets).

`Slots` holds a NaN-filled [3, *shape] buffer and offers its slot 1 (a view starting inside
the storage, as an arena's later slots do); `tap` records the very gradient tensor that
reaches a point of the graph, so a test can check that a producer's output arrives in the
slot's memory (same data_ptr, shape and strides: kernels.wgrad_defer.same_memory).
"""

from __future__ import annotations

import torch


class Slots:
    def __init__(self, shape, dtype, device):
        self.buffer = torch.full((3, *shape), float("nan"), dtype=dtype, device=device)
        self.asked = []  # (shape, dtype) of every call: a producer asks once per output

    @property
    def slot(self) -> torch.Tensor:
        return self.buffer[1]

    def target(self, shape, dtype):
        self.asked.append((tuple(shape), dtype))
        return self.slot

    def holds(self, t: torch.Tensor) -> bool:
        """t is the slot itself (what the consumer linear checks before skipping its copy)."""
        s = self.slot
        return t.data_ptr() == s.data_ptr() and t.shape == s.shape and t.stride() == s.stride()

    def untouched_elsewhere(self) -> bool:
        """Slots 0 and 2 still NaN: the producer wrote inside its slot only."""
        return bool(self.buffer[0].isnan().all() and self.buffer[2].isnan().all())


def tap(t: torch.Tensor, seen: list) -> torch.Tensor:
    """t itself; the gradient arriving at t is appended to `seen` in the backward."""
    t.register_hook(lambda grad: seen.append(grad))
    return t
