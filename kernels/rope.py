"""Rotary position embeddings (RoPE) for q and k in one Triton launch, forward and backward.

Megatron's non-interleaved RoPE (rotary_percent 1.0, positions 0..s-1, no scaling):

    inv_freq[j] = 1 / base^(2j / d),   theta[p, j] = p * inv_freq[j]     (fp32, j < d/2)
    out[..., :d/2] = x1 * cos(theta) - x2 * sin(theta)                   x1 = x[..., :d/2]
    out[..., d/2:] = x2 * cos(theta) + x1 * sin(theta)                   x2 = x[..., d/2:]

i.e. megatron's `t * cos(emb) + rotate_half(t) * sin(emb)` with emb = cat(freqs, freqs)
(megatron/core/models/common/embeddings/rope_utils.py, `_apply_rotary_pos_emb_bshd`).
The map is a rotation of each pair (x1[j], x2[j]) by theta, so its gradient is the
transpose, the rotation by -theta: the backward runs the same kernel with sin negated.

q is [s, b, hq, d], k is [s, b, hk, d] (hk may be fewer than hq: GQA), any strides (often
views of the fused QKV projection); both outputs are fresh contiguous [s, b, h, d] tensors
in the input dtype. Megatron's unfused path makes cos/sin tensors and several elementwise
passes over q and k each way; here one program reads BLOCK_T tokens of q and k once,
computes cos/sin of its positions in fp32 registers (amortised over all heads of both
tensors; no cos/sin tensor in HBM) and writes each output once. Math is fp32.

On CUDA cos/sin come from libdevice (__nv_cosf/__nv_sinf, full range reduction): theta
reaches s - 1 radians and tl.cos/tl.sin may lower to the hardware approximations, whose
error grows outside [-pi, pi]. The CPU interpreter has no libdevice; it uses tl.cos/tl.sin
(numpy, exact to fp32 rounding).

Layers: `_rope_kernel` / `_rotate_heads` / `_copy_heads` / `_head_tile` (@triton.jit);
`rotate` (host launcher);
`RoPEFunction` (autograd) and `apply_rope` (entry point, picking Triton on CUDA or under
TRITON_INTERPRET=1, else `torch_rope`, the same formula in torch, also the pure-torch
reference the kernel is tested against).

Output target (`layout.wgrad_defer=step`, kernels/out_target.py): `apply_rope_qkv`'s
`dqkv_target` says where the one gradient of the fused QKV output goes (the QKV linear's
dY arena slot, set by kernels/defer_wiring.py); None allocates it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kernels import out_target

DEFAULT_BASE = 10000.0  # LLaMA's, and megatron GPTModel's rotary_base default
IMPLS = ("triton", "torch")


# --------------------------------------------------------------------------- kernels


@triton.jit
def _head_tile(src_tok, dst_tok, tok_ok, hh, heads, stride_h, stride_d, dst_stride_h, j, width):
    """Element offsets (src, dst) and mask of a [BLOCK_T, BLOCK_H, BLOCK_D] tile: tokens
    src_tok/dst_tok ([BLOCK_T] int64), heads hh, columns j < width; src strided, dst with
    strided heads and unit d."""
    mask = tok_ok[:, None, None] & (hh < heads)[None, :, None] & (j < width)[None, None, :]
    src = src_tok[:, None, None] + (hh * stride_h)[None, :, None] + (j * stride_d)[None, None, :]
    dst = dst_tok[:, None, None] + (hh * dst_stride_h)[None, :, None] + j[None, None, :]
    return src, dst, mask


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, src_tok, dst_tok, tok_ok, heads, stride_h, stride_d,
                  dst_stride_h, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    """Rotate all heads of a block of tokens: src (strided) -> dst (strided heads, unit d).

    src_tok, dst_tok: [BLOCK_T] int64 element offsets of each token; cos, sin:
    [BLOCK_T, 1, BLOCK_HALF] fp32."""
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    for h0 in range(0, heads, BLOCK_H):
        src, dst, mask = _head_tile(src_tok, dst_tok, tok_ok, h0 + h, heads, stride_h, stride_d,
                                    dst_stride_h, j, HALF)
        x1 = tl.load(src_ptr + src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src_ptr + src + HALF * stride_d, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst_ptr + dst, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=mask)
        tl.store(dst_ptr + dst + HALF, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _copy_heads(src_ptr, dst_ptr, src_tok, dst_tok, tok_ok, heads, stride_h, stride_d,
                dst_stride_h, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Copy all heads of a block of tokens, unchanged (no conversion: the same bits):
    src (strided) -> dst (strided heads, unit d). The backward's dv."""
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_D)
    for h0 in range(0, heads, BLOCK_H):
        src, dst, mask = _head_tile(src_tok, dst_tok, tok_ok, h0 + h, heads, stride_h, stride_d,
                                    dst_stride_h, j, D)
        tl.store(dst_ptr + dst, tl.load(src_ptr + src, mask=mask), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, v_ptr, v_out_ptr, inv_freq_ptr,
    n_tokens, batch, q_heads, k_heads, v_heads,
    q_stride_s, q_stride_b, q_stride_h, q_stride_d,
    k_stride_s, k_stride_b, k_stride_h, k_stride_d,
    v_stride_s, v_stride_b, v_stride_h, v_stride_d,
    qo_stride_s, qo_stride_b, qo_stride_h, ko_stride_s, ko_stride_b, ko_stride_h,
    vo_stride_s, vo_stride_b, vo_stride_h,
    INVERSE: tl.constexpr, LIBDEVICE: tl.constexpr, HALF: tl.constexpr, COPY_V: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # Tokens are the (s, b) rows in s-major order, so a token's position is tok // batch.
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < n_tokens
    pos = tok // batch
    b = tok % batch
    j = tl.arange(0, BLOCK_HALF)
    inv_freq = tl.load(inv_freq_ptr + j, mask=j < HALF, other=0.0)
    theta = pos.to(tl.float32)[:, None] * inv_freq[None, :]  # megatron's fp32 product
    if LIBDEVICE:
        cos = libdevice.cos(theta)
        sin = libdevice.sin(theta)
    else:
        cos = tl.cos(theta)
        sin = tl.sin(theta)
    if INVERSE:
        sin = -sin
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    _rotate_heads(q_ptr, q_out_ptr, pos * q_stride_s + b * q_stride_b,
                  pos * qo_stride_s + b * qo_stride_b, tok_ok, q_heads, q_stride_h, q_stride_d,
                  qo_stride_h, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, k_out_ptr, pos * k_stride_s + b * k_stride_b,
                  pos * ko_stride_s + b * ko_stride_b, tok_ok, k_heads, k_stride_h, k_stride_d,
                  ko_stride_h, cos, sin, HALF, BLOCK_HK, BLOCK_HALF)
    if COPY_V:  # v has k's heads and head dim (megatron's KV groups)
        _copy_heads(v_ptr, v_out_ptr, pos * v_stride_s + b * v_stride_b,
                    pos * vo_stride_s + b * vo_stride_b, tok_ok, v_heads, v_stride_h, v_stride_d,
                    vo_stride_h, 2 * HALF, BLOCK_HK, 2 * BLOCK_HALF)


# --------------------------------------------------------------------------- launcher


class RopeConfig(NamedTuple):
    block_t: int  # tokens per program
    block_hq: int  # q heads per loop step
    block_hk: int  # k heads per loop step
    num_warps: int


TILE_ELEMENTS = 2048  # elements of one half-tile (tokens x heads x d/2) per program
# The CPU interpreter pays per program, not per element: few, large tiles keep tests fast.
INTERPRETER_TILE_ELEMENTS = 1 << 16


def launch_config(q_heads: int, k_heads: int, head_dim: int, *,
                  tile_elements: int = TILE_ELEMENTS) -> RopeConfig:
    """About `tile_elements` elements per half-tile of q: for d = 128 and 16 heads, 2 tokens
    a program, each thread holding 16 fp32 values per half with 4 warps. Untuned (see
    benchmarks/bench_rope.py for the sweep)."""
    block_half = triton.next_power_of_2(head_dim // 2)
    block_hq = min(triton.next_power_of_2(q_heads), max(1, tile_elements // block_half))
    block_t = max(1, tile_elements // (block_hq * block_half))
    block_hk = min(triton.next_power_of_2(k_heads), block_hq)
    return RopeConfig(block_t, block_hq, block_hk, num_warps=4)


def inv_freq(head_dim: int, base: float, device: torch.device) -> torch.Tensor:
    """[d/2] fp32, computed as megatron's RotaryEmbedding does on the same device (so theta
    is bit-identical to its freqs)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (base ** exponents)


# The kernel's copy, made once per device (torch_rope calls the plain function, which
# torch.compile can trace).
_cached_inv_freq = functools.lru_cache(maxsize=None)(inv_freq)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_out(out: torch.Tensor, like: torch.Tensor) -> bool:
    return out.shape == like.shape and out.stride(3) == 1 and out.dtype == like.dtype


def rotate(q: torch.Tensor, k: torch.Tensor, *, base: float, inverse: bool = False,
           config: Optional[RopeConfig] = None, out: Optional[tuple] = None,
           copy: Optional[tuple] = None):
    """Host launcher: (q_out, k_out) [s, b, h, d], rotated by +theta (or -theta with
    `inverse`, the backward). q, k: [s, b, h, d], any strides. The outputs are fresh
    contiguous tensors, or `out` = (q_out, k_out): tensors of q's and k's shapes and dtype,
    any strides with a unit last one (e.g. slices of one gradient buffer).

    copy = (v, v_out): also copy v ([s, b, hk, d], k's shape and dtype, any strides) into
    v_out (unit last stride) unchanged, in the same launch: the RoPE backward's dv, which
    torch's copy_ into a strided slice does with its slow non-vectorized kernel."""
    s, batch, q_heads, head_dim = q.shape
    k_heads = k.shape[2]
    if out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    else:
        q_out, k_out = out
        if not (_check_out(q_out, q) and _check_out(k_out, k)):
            raise ValueError("rotate's out tensors need q's and k's shapes and dtype and a unit last stride")
    v, v_out = copy if copy is not None else (k, k_out)  # unused placeholders without copy
    if copy is not None and not (v.shape == k.shape and v.dtype == k.dtype and _check_out(v_out, v)):
        raise ValueError("rotate's copy needs (v, v_out) of k's shape and dtype, v_out with a unit last stride")
    n_tokens = s * batch
    if n_tokens == 0:
        return q_out, k_out
    tile = INTERPRETER_TILE_ELEMENTS if _interpreting() else TILE_ELEMENTS
    cfg = config or launch_config(q_heads, k_heads, head_dim, tile_elements=tile)
    with _device(q):
        _rope_kernel[(triton.cdiv(n_tokens, cfg.block_t),)](
            q, k, q_out, k_out, v, v_out, _cached_inv_freq(head_dim, float(base), q.device),
            n_tokens, batch, q_heads, k_heads, v.shape[2], *q.stride(), *k.stride(), *v.stride(),
            *q_out.stride()[:3], *k_out.stride()[:3], *v_out.stride()[:3],
            INVERSE=inverse, LIBDEVICE=not _interpreting(), HALF=head_dim // 2,
            COPY_V=copy is not None, BLOCK_T=cfg.block_t, BLOCK_HQ=cfg.block_hq,
            BLOCK_HK=cfg.block_hk, BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
            num_warps=cfg.num_warps,
        )
    return q_out, k_out


# --------------------------------------------------------------------------- autograd


class RoPEFunction(torch.autograd.Function):
    """(q, k) -> (q_rot, k_rot); saves nothing (the backward needs only positions and base).

    Under megatron's selective recompute the forward reruns inside the backward: safe, as
    nothing is written in place and no state is kept."""

    @staticmethod
    def forward(ctx, q, k, base, config=None):
        ctx.base = base
        ctx.config = config
        return rotate(q, k, base=base, config=config)

    @staticmethod
    def backward(ctx, dq_rot, dk_rot):
        # Unused outputs arrive as zeros (materialized grads), so both are tensors here.
        dq, dk = rotate(dq_rot, dk_rot, base=ctx.base, inverse=True, config=ctx.config)
        return dq, dk, None, None


def _geometry(t: torch.Tensor, origin: int = 0) -> tuple:
    """(shape, strides, storage offset from `origin`): where a view lies in its storage."""
    return tuple(t.shape), t.stride(), t.storage_offset() - origin


class RoPEQKVFunction(torch.autograd.Function):
    """(qkv, where q, k, v lie in it) -> (q_rot, k_rot, v), with one gradient for qkv.

    qkv is the fused QKV projection's output that megatron splits into q, k, v views; this
    Function takes qkv itself, so autograd never runs the split's backward (a concatenation
    of dq, dk, dv into a new buffer: CatArrayBatchedCopy, 4.9 ms of an H200 step at mbs 16,
    2026-12-01). The backward allocates that buffer once and writes into it directly: the
    rotated-back dq and dk from the RoPE kernel and, in the same launch, dv copied unchanged
    (torch's `dv_out.copy_(dv)` into the strided slice was a non-vectorized elementwise
    kernel: 177 us a layer at mbs 16 on an H200, ~1.5 TB/s, 2026-12-01 profile). v is returned as
    the view of qkv it was (no copy); nothing is saved but geometry. `dqkv_target`
    (kernels.out_target.Target) may offer that buffer instead."""

    @staticmethod
    def forward(ctx, qkv, views, base, config=None, dqkv_target=None):
        q, k, v = (qkv.as_strided(*view) for view in views)
        origin = qkv.storage_offset()
        ctx.views = [(shape, stride, offset - origin) for shape, stride, offset in views]
        ctx.qkv_shape, ctx.base, ctx.config = qkv.shape, base, config
        ctx.dqkv_target = dqkv_target
        q_rot, k_rot = rotate(q, k, base=base, config=config)
        return q_rot, k_rot, v

    @staticmethod
    def backward(ctx, dq_rot, dk_rot, dv):
        shape, dtype, device = ctx.qkv_shape, dq_rot.dtype, dq_rot.device
        d_qkv = out_target.take(ctx.dqkv_target, shape, dtype, device)
        if d_qkv is None:
            d_qkv = torch.empty(shape, dtype=dtype, device=device)
        # The views' offsets are relative to qkv's start: a target may start inside its storage.
        origin = d_qkv.storage_offset()
        dq, dk, dv_out = (d_qkv.as_strided(shape, stride, origin + offset) for shape, stride, offset in ctx.views)
        rotate(dq_rot, dk_rot, base=ctx.base, inverse=True, config=ctx.config, out=(dq, dk),
               copy=(dv, dv_out))
        return d_qkv, None, None, None, None


def fused_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> Optional[torch.Tensor]:
    """The fused QKV output that query, key and value are exactly megatron's split views of
    (megatron-core 0.16 `SelfAttention.get_query_key_value_tensors`: qkv viewed as
    [s, b, ng, (np/ng + 2) * hn], split on the last dim into np/ng, 1, 1 heads), or None
    when they are not: copies (GQA with several query heads per group reshapes q into a new
    tensor), detached inputs (recompute), no autograd, or any other geometry. Only then
    can RoPEQKVFunction's gradient buffer cover qkv exactly."""
    qkv = query._base
    if (qkv is None or key._base is not qkv or value._base is not qkv or not torch.is_grad_enabled()
            or not qkv.requires_grad or not qkv.is_contiguous() or query.dim() != 4):
        return None
    s, b, heads, hn = query.shape
    groups = key.shape[2]
    if heads % groups or qkv.numel() != s * b * groups * (heads // groups + 2) * hn:
        return None
    with torch.no_grad():
        mixed = qkv.detach().view(s, b, groups, (heads // groups + 2) * hn)
        q, k, v = torch.split(mixed, [heads // groups * hn, hn, hn], dim=3)
        q = q.reshape(s, b, heads, hn)
    same = all(_geometry(a) == _geometry(e) for a, e in ((query, q), (key, k), (value, v)))
    return qkv if same and q._base is not None else None


def apply_rope_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                   base: float = DEFAULT_BASE, dqkv_target: out_target.Target = None):
    """apply_rope for megatron's split q, k, v views, returning (q_rot, k_rot, v): their
    gradients go into one buffer of the fused QKV output (RoPEQKVFunction; `dqkv_target`
    may offer it) when the views allow it and the Triton kernel runs; otherwise apply_rope,
    and v as it came."""
    _check_inputs(query, key)
    qkv = fused_qkv(query, key, value) if default_impl(query) == "triton" else None
    if qkv is None:
        return (*apply_rope(query, key, base=base), value)
    return RoPEQKVFunction.apply(qkv, [_geometry(t) for t in (query, key, value)], float(base),
                                 None, dqkv_target)


def torch_rope(q: torch.Tensor, k: torch.Tensor, *, base: float = DEFAULT_BASE):
    """The same rotation in torch (fp32 math, outputs in the input dtype; autograd through
    torch): the CPU path, and the pure-torch reference for the kernel."""
    s, head_dim = q.shape[0], q.shape[-1]
    positions = torch.arange(s, dtype=torch.float32, device=q.device)
    theta = torch.outer(positions, inv_freq(head_dim, float(base), q.device))[:, None, None, :]
    cos, sin = theta.cos(), theta.sin()

    def rotate_one(t):
        x1, x2 = t.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(t.dtype)

    return rotate_one(q), rotate_one(k)


def _check_inputs(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"expected [s, b, h, d] tensors, got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in s, b or d")
    if q.shape[3] % 2:
        raise ValueError(f"head dim {q.shape[3]} must be even to rotate its two halves")
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"q and k differ in dtype or device: {q.dtype}/{q.device}, "
                         f"{k.dtype}/{k.device}")


def default_impl(t: torch.Tensor) -> str:
    """Triton on CUDA, or anywhere under TRITON_INTERPRET=1 (the CPU tests); torch otherwise."""
    return "triton" if t.is_cuda or _interpreting() else "torch"


def apply_rope(q: torch.Tensor, k: torch.Tensor, *, base: float = DEFAULT_BASE,
               impl: Optional[str] = None):
    """RoPE at positions 0..s-1: q [s, b, hq, d], k [s, b, hk, d] -> (q_rot, k_rot), each
    contiguous in the input's dtype; autograd-aware. `impl` forces "triton" or "torch"."""
    _check_inputs(q, k)
    impl = impl or default_impl(q)
    if impl == "triton":
        return RoPEFunction.apply(q, k, float(base))
    if impl == "torch":
        return torch_rope(q, k, base=base)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
