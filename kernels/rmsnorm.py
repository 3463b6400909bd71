"""RMSNorm in Triton, forward and backward.

    y = x * r * w,   r = rsqrt(mean(x^2) + eps)          (per row, statistics in fp32)

x is [..., H] (any leading shape, H any size up to 65536), w is [H]; y has x's dtype
(bf16, fp16 or fp32). With xhat = x * r and g = dy * w, the gradients are

    dx = r * (g - xhat * mean(g * xhat))                  (per row)
    dw = sum over rows of dy * xhat

Host cost: eager training steps call this for every norm of every layer, so the launchers
keep Python thin: one launch forward, two backward (row tiles, then the dw reduction), the
launch configuration cached per hidden size, compiled kernels launched directly after their
first call (`kernels.fast_launch`), and the dw partial buffer kept between calls (not while
a CUDA graph is being captured), so a call allocates only its outputs (y and the fp32 rstd
forward; dx and dw backward).

H200, bf16 (benchmarks/results/rmsnorm_h200_2026-12-01.json, SHAPES 16384x4096, 32768x8192,
8192x5120): GPU time fwd 0.93/0.95/0.92x a copy of x, fwd+bwd 0.92/0.92/0.86x, 1.18/1.14/1.35x
the best peer (torch.compile, liger); host time included (do_bench), fwd+bwd 0.91/2.05/1.03x
torch's F.rms_norm (0.90/2.05/0.87x before the host-path changes, ..._run1.json). At
16384x4096 the call is host-bound: ~340 us per fwd+bwd against 184 us of GPU work. A
persistent forward (w loaded once per program, the next row tile prefetched, as the backward
does) measured 0.70-0.96x this forward in the same run's sweep, so it was dropped.

Three layers, as in Liger-Kernel and the Triton layer-norm tutorial:
  * private @triton.jit kernels: `_forward_kernel` (a [BLOCK_M, BLOCK_N] tile of rows per
    program), `_backward_kernel` (a persistent grid; each program walks row tiles and keeps
    its own fp32 partial of dw in registers, written once to a [programs, H] buffer) and
    `_dw_reduce_kernel` (sums that buffer over programs in a fixed order);
  * host launchers `forward` and `backward` choosing block, warps and grid;
  * `RMSNormFunction` (autograd) and the keyword-only entry point `rms_norm`.

dw is reduced without atomics: each partial row belongs to one program and the final sum
runs in a fixed order, so results are bit-identical from run to run on one device (the
number of partials depends only on the device's SM count).

Nothing is written in place: y, dx and dw are fresh tensors, x and dy are only read (the
megatron adapter relies on this under selective recompute).

`reference` is the float64 formula the tests compare with.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from kernels.fast_launch import CachedLaunch, aligned, device_index

MAX_HIDDEN = 65536  # one row lives in registers; wider rows would spill


# --------------------------------------------------------------------------- kernels


# Row counts change from call to call; not specializing on them (divisible by 16, == 1)
# keeps one compiled kernel per hidden size, which fast_launch's cache key relies on.
@triton.jit(do_not_specialize=["n_rows"])
def _forward_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    n_rows, n_cols, stride_x, stride_y, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # 64-bit math once per program for the tile's first row; 32-bit offsets inside the tile.
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows - row0
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + row0 * stride_x + rows[:, None] * stride_x + cols[None, :], mask=mask,
                other=0.0, eviction_policy="evict_first").to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + row0 * stride_y + rows[:, None] * stride_y + cols[None, :],
             y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row0 + rows, rstd, mask=row_ok)


@triton.jit
def _load_tile(dy_ptr, x_ptr, rstd_ptr, row0, n_rows, n_cols, stride_dy, stride_x,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dy, x (fp32, [BLOCK_M, BLOCK_N]) and rstd ([BLOCK_M]) of the tile starting at row0
    (int64); zeros past the last row."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows - row0
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    dy = tl.load(dy_ptr + row0 * stride_dy + rows[:, None] * stride_dy + cols[None, :],
                 mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    x = tl.load(x_ptr + row0 * stride_x + rows[:, None] * stride_x + cols[None, :],
                mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    rstd = tl.load(rstd_ptr + row0 + rows, mask=row_ok, other=0.0)
    return dy, x, rstd


@triton.jit(do_not_specialize=["n_rows"])
def _backward_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
    n_rows, n_cols, stride_dy, stride_x, stride_dx,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr,
):
    # Program p walks row tiles p, p + P, p + 2P, ... (P programs); with PREFETCH it loads
    # the next tile before working on the current one, so loads stay in flight meanwhile.
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    n_tiles = tl.cdiv(n_rows, BLOCK_M)
    if PREFETCH:
        dy_next, x_next, rstd_next = _load_tile(
            dy_ptr, x_ptr, rstd_ptr, tl.cast(pid, tl.int64) * BLOCK_M, n_rows, n_cols,
            stride_dy, stride_x, BLOCK_M, BLOCK_N)
    for tile in range(pid, n_tiles, programs):
        row0 = tl.cast(tile, tl.int64) * BLOCK_M
        if PREFETCH:
            dy, x, rstd = dy_next, x_next, rstd_next
            dy_next, x_next, rstd_next = _load_tile(
                dy_ptr, x_ptr, rstd_ptr, row0 + programs * BLOCK_M, n_rows, n_cols,
                stride_dy, stride_x, BLOCK_M, BLOCK_N)
        else:
            dy, x, rstd = _load_tile(dy_ptr, x_ptr, rstd_ptr, row0, n_rows, n_cols,
                                     stride_dy, stride_x, BLOCK_M, BLOCK_N)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / n_cols
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        mask = (rows < n_rows - row0)[:, None] & col_ok[None, :]
        tl.store(dx_ptr + row0 * stride_dx + rows[:, None] * stride_dx + cols[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(dw_partial_ptr + tl.cast(pid, tl.int64) * n_cols + cols, dw, mask=col_ok)


@triton.jit(do_not_specialize=["n_partials"])
def _dw_reduce_kernel(
    partial_ptr, dw_ptr, n_partials, n_cols,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for start in range(0, n_partials, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        mask = (p < n_partials)[:, None] & col_ok[None, :]
        acc += tl.load(partial_ptr + p[:, None].to(tl.int64) * n_cols + cols[None, :],
                       mask=mask, other=0.0)
    tl.store(dw_ptr + cols, tl.sum(acc, axis=0).to(dw_ptr.dtype.element_ty), mask=col_ok)


# --------------------------------------------------------------------------- launchers


class ForwardConfig(NamedTuple):
    block_m: int  # rows per program
    num_warps: int


class BackwardConfig(NamedTuple):
    block_m: int  # rows per loop iteration
    num_warps: int
    programs_per_sm: int  # persistent grid = SMs * programs_per_sm (capped by row tiles)
    prefetch: bool = False  # load the next row tile before computing this one
    num_stages: int = 1


def _pow2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


@functools.lru_cache(maxsize=None)
def forward_config(n_cols: int) -> ForwardConfig:
    """One row per program for wide rows, short rows share one (>= 4096 elements a program);
    warps so each thread holds about 16 live elements (two 16-byte bf16 loads), 4 to 16.

    Measured on H100, bf16 (benchmarks/results/rmsnorm_h100_2026-11-23*.json sweeps): 4, 8
    and 16 warps land within 2% of each other at H = 4096..16384; 32 warps lose 5-30%.
    """
    block_m = max(1, min(16, 4096 // triton.next_power_of_2(n_cols)))
    return ForwardConfig(block_m, max(4, min(16, _pow2_at_most(block_m * n_cols // 512))))


@functools.lru_cache(maxsize=None)
def backward_config(n_cols: int) -> BackwardConfig:
    """One program per SM, 16 warps, walking tiles of 8192 elements (2 rows of 4096, one of
    5120..8192) with the next tile prefetched.

    Measured on H100, bf16: prefetch with one program per SM beat 2 programs per SM without
    it by 5-10% (occupancy is register-bound: x, dy, w and the dw partial all live in
    registers); 2 rows of 4096 beat 1 by 10%; 32 warps spill at H = 6656 (2x slower).
    Wider tiles (H = 16384) have no room for a prefetched copy: without it 16 warps gave
    2.1 TB/s, prefetching spilled to 0.2 TB/s.
    """
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, min(16, 8192 // block_n))
    return BackwardConfig(block_m, 16, 1, prefetch=block_m * block_n <= 8192)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # CPU under TRITON_INTERPRET: a few programs exercise the partial reduction


def _as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """[..., H] -> [M, H] with unit stride along H (a copy only if the layout needs one)."""
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 or t2.shape[0] == 0 else t2.contiguous()


_FORWARD = CachedLaunch(_forward_kernel)
_BACKWARD = CachedLaunch(_backward_kernel)
_DW_REDUCE = CachedLaunch(_dw_reduce_kernel)
_PARTIALS: dict = {}  # (device, programs, n_cols) -> fp32 [programs, n_cols] scratch
DW_BLOCK_C = 64  # dw reduction: columns per program


# fast_launch's cache keys, device index first: the launch config, every int Triton may
# specialize on (row counts are not specialized), the dtype and 16-byte alignment of each
# pointer the caller passes in (outputs and scratch are fresh allocations: aligned, their
# dtypes follow x and weight). Spelled out, not built in a loop: they run on every call.


def forward(x2: torch.Tensor, weight: torch.Tensor, eps: float,
            config: Optional[ForwardConfig] = None, out_shape=None):
    """x2 [M, H], weight [H] -> y (x2's dtype, contiguous, shape out_shape or [M, H]),
    rstd [M] (fp32)."""
    n_rows, n_cols = x2.shape
    y = torch.empty(out_shape or (n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    if n_rows == 0:
        return y, rstd
    cfg = config or forward_config(n_cols)
    stride = x2.stride(0)
    _FORWARD.launch(
        (device_index(x2), cfg, n_cols, stride, x2.dtype, weight.dtype, aligned(x2),
         aligned(weight)), (_cdiv(n_rows, cfg.block_m),),
        (x2, weight, y, rstd, n_rows, n_cols, stride, n_cols, float(eps)),
        dict(BLOCK_M=cfg.block_m, BLOCK_N=_block_n(n_cols)), num_warps=cfg.num_warps)
    return y, rstd


@functools.lru_cache(maxsize=None)
def _block_n(n_cols: int) -> int:
    return triton.next_power_of_2(n_cols)


def _cdiv(a: int, b: int) -> int:
    """Plain-int ceil division: triton.cdiv is a ConstexprFunction (Triton 3.9: ~10x the
    cost of this on the host, for every launch)."""
    return -(-a // b)


def _partials(device: torch.device, programs: int, n_cols: int) -> torch.Tensor:
    """The dw partial buffer, reused by every call on this device and stream order. While a
    CUDA graph is captured a fresh one comes from the graph's pool instead (a cached buffer
    first allocated there would belong to the graph)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.empty((programs, n_cols), dtype=torch.float32, device=device)
    key = (device, programs, n_cols)
    buf = _PARTIALS.get(key)
    if buf is None:
        buf = _PARTIALS[key] = torch.empty((programs, n_cols), dtype=torch.float32,
                                           device=device)
    return buf


def backward(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
             config: Optional[BackwardConfig] = None, out_shape=None):
    """dy2, x2 [M, H], weight [H], rstd [M] -> dx (x2's dtype, contiguous, shape out_shape
    or [M, H]), dw [H] (weight's dtype)."""
    n_rows, n_cols = x2.shape
    dx = torch.empty(out_shape or (n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    if n_rows == 0:
        return dx, torch.zeros_like(weight)
    dw = torch.empty_like(weight)
    cfg = config or backward_config(n_cols)
    programs = min(_cdiv(n_rows, cfg.block_m), _sm_count(x2.device) * cfg.programs_per_sm)
    partial = _partials(x2.device, programs, n_cols)
    stride_dy, stride_x = dy2.stride(0), x2.stride(0)
    _BACKWARD.launch(
        (device_index(x2), cfg, n_cols, stride_dy, stride_x, dy2.dtype, x2.dtype, weight.dtype,
         aligned(dy2), aligned(x2), aligned(weight), aligned(rstd)), (programs,),
        (dy2, x2, weight, rstd, dx, partial, n_rows, n_cols, stride_dy, stride_x, n_cols),
        dict(BLOCK_M=cfg.block_m, BLOCK_N=_block_n(n_cols), PREFETCH=cfg.prefetch),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _DW_REDUCE.launch(
        (device_index(x2), n_cols, dw.dtype), (_cdiv(n_cols, DW_BLOCK_C),),
        (partial, dw, programs, n_cols), dict(BLOCK_P=32, BLOCK_C=DW_BLOCK_C), num_warps=4)
    return dx, dw


# --------------------------------------------------------------------------- autograd


class RMSNormFunction(torch.autograd.Function):
    """y = rms_norm(x, w); saves x, w and the fp32 rstd of each row (4 bytes a row).

    y and dx are allocated in their final shapes, not returned as views, so autograd can
    take dx as x.grad without a copy.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, fwd_config=None, bwd_config=None):
        x2 = _as_rows(x, x.shape[-1])
        y, rstd = forward(x2, weight, eps, fwd_config, x.shape)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.bwd_config = bwd_config
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = backward(_as_rows(dy, x2.shape[1]), x2, weight, rstd, ctx.bwd_config, dy.shape)
        return dx, dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim of x ([..., H]) with weight [H]; autograd-aware.

    Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1.
    """
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {n_cols}")
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"hidden size {n_cols} exceeds {MAX_HIDDEN}, the widest row kept in registers")
    if x.device != weight.device:
        raise ValueError(f"x on {x.device} but weight on {weight.device}")
    return RMSNormFunction.apply(x, weight, eps)


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The formula in float64 (for tests): x * rsqrt(mean(x^2) + eps) * w."""
    x64, w64 = x.double(), weight.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64
