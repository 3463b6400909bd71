"""flash-attn-4 (`flash_attn.cute`, FlashAttention in NVIDIA's CuTe DSL): an optional peer kernel.

flash-attn-4 is an optional dependency (`pip install 'layout-sweep[gpu]'`, pip name
`flash-attn-4`). Nothing here imports it at module import time: `installed()` only looks
for the package on the path (no import, no torch), so the sweeper can record a layout with
`attention=flash_attn` as `skipped: flash-attn-4 not installed` on a machine without it,
and `flash_attn_func()` / `SeqFirstAttention()` import it when a layer is built.

Call convention (flash-attn-4 4.0.0b36, `flash_attn/cute/interface.py`): q [b, s, hq, d],
k, v [b, s, hkv, d] (GQA: hkv divides hq, no KV repeat), bf16 or fp16, any strides with a
unit last stride and 16-byte aligned others; `flash_attn_func` returns (out [b, s, hq, d]
contiguous, lse or None). SM90 supports 8 <= d <= 256 with d a multiple of 8; no dropout.

`SeqFirstAttention` takes and returns megatron's sequence-first layout. flash_attn_func's
contiguous [b, s, hq, d] output would cost one copy into [s, b, hq * d] a layer (134 MB at
llama_1b3 mbs 16); instead `FA4Function` calls the two functions flash_attn_func's own
autograd Function (`FlashAttnFunc`) calls, `_flash_attn_fwd(..., out=)` and
`_flash_attn_bwd`, with the same arguments, handing the forward a [b, s, hq, d] view of an
[s, b, hq * d] buffer (strides aligned as `validate_output_layout` requires): the kernel
writes the output in place, same values. The buffer is fresh, or what `out_target`
(kernels/out_target.py, layout.wgrad_defer=step) offers: the attention output linear's
input slot. An installed flash-attn-4 without those functions or keywords (another
release) falls back to flash_attn_func and the copy, with one line on stderr.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Optional

import torch

# The probe and the head-dim rule live in core.choices: the sweeper needs them without torch.
from core.choices import FA4_HEAD_DIM_MAX as HEAD_DIM_MAX  # noqa: F401
from core.choices import FA4_HEAD_DIM_MIN as HEAD_DIM_MIN  # noqa: F401
from core.choices import FA4_HEAD_DIM_MULTIPLE as HEAD_DIM_MULTIPLE  # noqa: F401
from core.choices import FA4_NOT_INSTALLED as NOT_INSTALLED
from core.choices import fa4_head_dim_reason as head_dim_reason  # noqa: F401
from core.choices import fa4_installed as installed  # noqa: F401
from kernels import out_target

# The keywords FA4Function passes (4.0.0b36 has them all; flash_attn_func passes the same).
FWD_KEYWORDS = ("softmax_scale", "causal", "out", "return_lse")
BWD_PARAMETERS = ("q", "k", "v", "out", "dout", "lse", "softmax_scale", "causal")


def flash_attn_func():
    """flash-attn-4's `flash_attn_func`, imported now; a one-line ImportError if missing."""
    try:
        from flash_attn.cute import flash_attn_func as func
    except ImportError as e:
        raise ImportError(f"{NOT_INSTALLED} (pip install 'layout-sweep[gpu]'): {e}") from None
    return func


def _lacking(func, names) -> list[str]:
    if func is None:
        return ["(the function itself)"]
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return ["(no signature)"]
    return [name for name in names if name not in params]


@functools.lru_cache(maxsize=None)
def direct_kernels() -> Optional[tuple]:
    """(`_flash_attn_fwd`, `_flash_attn_bwd`) of the installed flash_attn.cute.interface when
    both take what FA4Function passes, else None after one line on stderr (once a process)."""
    try:
        from flash_attn.cute import interface
    except ImportError:
        interface = None
    fwd, bwd = (getattr(interface, name, None) for name in ("_flash_attn_fwd", "_flash_attn_bwd"))
    missing = ([f"_flash_attn_fwd {n}" for n in _lacking(fwd, FWD_KEYWORDS)]
               + [f"_flash_attn_bwd {n}" for n in _lacking(bwd, BWD_PARAMETERS)])
    if missing:
        print(f"flash-attn-4: flash_attn.cute.interface lacks {', '.join(missing)}; using "
              "flash_attn_func and one output copy a layer", file=sys.stderr)
        return None
    return fwd, bwd


class FA4Function(torch.autograd.Function):
    """(query, key, value [s, b, h, d], any aligned strides) -> [s, b, hq * d], written by
    flash-attn-4's forward kernel in place. Saves query, key, value, the output and the fp32
    lse (what FlashAttnFunc saves, as [b, s, h, d] views); the backward gets the output's gradient as a [b, s, hq, d]
    view too (flash-attn-4 reads aligned strides as they are) and returns dq, dk, dv as
    flash-attn-4 allocates them (contiguous [b, s, h, d], seen as [s, b, h, d] views)."""

    @staticmethod
    def forward(ctx, query, key, value, softmax_scale, causal, kernels, target=None):
        fwd, _ = kernels
        s, b, heads, head_dim = query.shape
        shape = (s, b, heads * head_dim)
        buffer = out_target.take(target, shape, query.dtype, query.device)
        if buffer is None:
            buffer = torch.empty(shape, dtype=query.dtype, device=query.device)
        q, k, v = (t.permute(1, 0, 2, 3) for t in (query, key, value))
        out = buffer.view(s, b, heads, head_dim).permute(1, 0, 2, 3)
        result = fwd(q, k, v, softmax_scale=softmax_scale, causal=causal, out=out, return_lse=True)
        ctx.save_for_backward(query, key, value, buffer, result[1])
        ctx.softmax_scale, ctx.causal, ctx.kernels = softmax_scale, causal, kernels
        return buffer

    @staticmethod
    def backward(ctx, grad):
        query, key, value, buffer, lse = ctx.saved_tensors
        _, bwd = ctx.kernels
        s, b, heads, head_dim = query.shape
        q, k, v = (t.permute(1, 0, 2, 3) for t in (query, key, value))
        out = buffer.view(s, b, heads, head_dim).permute(1, 0, 2, 3)
        dout = grad.reshape(s, b, heads, head_dim).permute(1, 0, 2, 3)
        dq, dk, dv = bwd(q, k, v, out, dout, lse, softmax_scale=ctx.softmax_scale,
                         causal=ctx.causal)[:3]
        return (*(t.permute(1, 0, 2, 3) for t in (dq, dk, dv)), None, None, None, None)


class SeqFirstAttention:
    """flash-attn-4 attention on megatron's layout: __call__(query, key, value [s, b, h, d],
    softmax_scale=, causal=, target=None) -> [s, b, hq * d]. Built once a layer; imports
    flash-attn-4 (a one-line ImportError if missing) and picks FA4Function, or
    flash_attn_func plus one copy where the interface lacks what FA4Function needs."""

    def __init__(self):
        self.func = flash_attn_func()
        self.kernels = direct_kernels()

    @property
    def writes_in_place(self) -> bool:
        """Whether the output is written where it is returned (so `target` is honoured)."""
        return self.kernels is not None

    def __call__(self, query, key, value, *, softmax_scale: float, causal: bool,
                 target: out_target.Target = None) -> torch.Tensor:
        s, b, heads, head_dim = query.shape
        if self.kernels is not None:
            return FA4Function.apply(query, key, value, softmax_scale, causal, self.kernels, target)
        out, _ = self.func(query.permute(1, 0, 2, 3), key.permute(1, 0, 2, 3),
                           value.permute(1, 0, 2, 3), softmax_scale=softmax_scale, causal=causal)
        # flash_attn_func returns a contiguous [b, s, h, d]: one copy into [s, b, h * d].
        return out.permute(1, 0, 2, 3).reshape(s, b, heads * head_dim)
