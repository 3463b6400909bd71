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

import importlib.util
import os

NOT_INSTALLED = "flash-attn-4 not installed"
# SM90 (Hopper) limits of flash-attn-4 4.0.0b36 (`_validate_head_dims`): 16-byte multiples
# of bf16/fp16 elements, at most 256.
HEAD_DIM_MIN, HEAD_DIM_MAX, HEAD_DIM_MULTIPLE = 8, 256, 8


def installed() -> bool:
    """Whether `flash_attn.cute` is on the path, found without importing it (its import
    loads torch and the CuTe DSL). flash-attn-4 ships `flash_attn` as a namespace package."""
    try:
        spec = importlib.util.find_spec("flash_attn")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(os.path.isfile(os.path.join(loc, "cute", "interface.py"))
               for loc in spec.submodule_search_locations)


def head_dim_reason(head_dim: int):
    """Why flash-attn-4 cannot take this head dim on Hopper, or None."""
    if HEAD_DIM_MIN <= head_dim <= HEAD_DIM_MAX and head_dim % HEAD_DIM_MULTIPLE == 0:
        return None
    return (f"flash_attn attention supports head_dim {HEAD_DIM_MIN}..{HEAD_DIM_MAX} in steps "
            f"of {HEAD_DIM_MULTIPLE} (flash-attn-4 on SM90), got {head_dim}")


def flash_attn_func():
    """flash-attn-4's `flash_attn_func`, imported now; a one-line ImportError if missing."""
    try:
        from flash_attn.cute import flash_attn_func as func
    except ImportError as e:
        raise ImportError(f"{NOT_INSTALLED} (pip install 'layout-sweep[gpu]'): {e}") from None
    return func
