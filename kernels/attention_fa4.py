"""flash-attn-4 (`flash_attn.cute`, FlashAttention in NVIDIA's CuTe DSL): an optional peer kernel.

flash-attn-4 is an optional dependency (`pip install 'layout-sweep[gpu]'`, pip name
`flash-attn-4`). Nothing here imports it at module import time: `installed()` only looks
for the package on the path (no import, no torch), so the sweeper can record a layout with
`attention=flash_attn` as `skipped: flash-attn-4 not installed` on a machine without it,
and `flash_attn_func()` imports it when a layer is built.

Call convention (flash-attn-4 4.0.0b36, `flash_attn/cute/interface.py`): q [b, s, hq, d],
k, v [b, s, hkv, d] (GQA: hkv divides hq, no KV repeat), bf16 or fp16, any strides with a
unit last stride and 16-byte aligned others; returns (out [b, s, hq, d] contiguous, lse or
None). SM90 supports 8 <= d <= 256 with d a multiple of 8; no dropout.
"""

from __future__ import annotations

# The probe and the head-dim rule live in core.choices: the sweeper needs them without torch.
from core.choices import FA4_HEAD_DIM_MAX as HEAD_DIM_MAX  # noqa: F401
from core.choices import FA4_HEAD_DIM_MIN as HEAD_DIM_MIN  # noqa: F401
from core.choices import FA4_HEAD_DIM_MULTIPLE as HEAD_DIM_MULTIPLE  # noqa: F401
from core.choices import FA4_NOT_INSTALLED as NOT_INSTALLED
from core.choices import fa4_head_dim_reason as head_dim_reason  # noqa: F401
from core.choices import fa4_installed as installed  # noqa: F401


def flash_attn_func():
    """flash-attn-4's `flash_attn_func`, imported now; a one-line ImportError if missing."""
    try:
        from flash_attn.cute import flash_attn_func as func
    except ImportError as e:
        raise ImportError(f"{NOT_INSTALLED} (pip install 'layout-sweep[gpu]'): {e}") from None
    return func
