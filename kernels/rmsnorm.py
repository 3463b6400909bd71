"""RMSNorm in Triton, forward and backward.

    y = x * r * w,   r = rsqrt(mean(x^2) + eps)          (per row, statistics in fp32)

x is [..., H] (any leading shape, H any size up to 65536), w is [H]; y has x's dtype
(bf16, fp16 or fp32). With xhat = x * r and g = dy * w, the gradients are

    dx = r * (g - xhat * mean(g * xhat))                  (per row)
    dw = sum over rows of dy * xhat

Host cost: eager training steps call this for every norm of every layer, so the launchers
keep Python thin: one launch forward, two backward (row tiles, then the dw reduction), no
reshape of contiguous inputs, the launch configuration and constexprs cached per hidden
size, compiled kernels launched directly after their first call (`kernels.fast_launch`),
rstd recomputed in the backward from x (which it reads anyway) instead of stored, and the
dw partial buffer kept between calls (not while a CUDA graph is being captured): a call
allocates only its outputs (y forward; dx and dw backward).

H200, bf16 (benchmarks/results/rmsnorm_h200_2026-12-01.json; shapes 16384x4096,
32768x8192, 8192x5120): GPU time fwd 0.93/0.95/0.92x a copy of x, fwd+bwd 0.91/0.92/0.85x,
1.16/1.13/1.36x the best peer (torch.compile, liger); host included (do_bench) fwd+bwd
1.67/2.06/1.72x F.rms_norm. The backward is bound by bytes in flight: one program per SM
holds its tile and the prefetched next one in registers (0.79-0.90x copy).

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
#
# A row of H columns is held as one [BLOCK_M, BLOCK_N] part, or, when that would leave a
# quarter or more of the lanes masked (H = 5120 in 8192 lanes), as a part of BLOCK_N plus a
# tail of BLOCK_T columns (4096 + 1024): fewer dead registers, more rows in flight per SM.
# BLOCK_T = 0: no tail.


@triton.jit
def _load_part(ptr, row0, n_rows, stride, col0, n_cols,
               BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    """Columns [col0, col0 + BLOCK) of rows [row0, row0 + BLOCK_M) as fp32 (zeros outside)."""
    rows = tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK)
    mask = (rows < n_rows - row0)[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + row0 * stride + rows[:, None] * stride + cols[None, :], mask=mask,
                   other=0.0, eviction_policy="evict_first").to(tl.float32)


@triton.jit
def _store_part(ptr, value, row0, n_rows, stride, col0, n_cols,
                BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK)
    mask = (rows < n_rows - row0)[:, None] & (cols < n_cols)[None, :]
    tl.store(ptr + row0 * stride + rows[:, None] * stride + cols[None, :],
             value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_weight(w_ptr, col0, n_cols, BLOCK: tl.constexpr):
    cols = col0 + tl.arange(0, BLOCK)
    return tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)


# Row counts change from call to call; not specializing on them (divisible by 16, == 1)
# keeps one compiled kernel per hidden size, which fast_launch's cache key relies on.
@triton.jit(do_not_specialize=["n_rows"])
def _forward_kernel(
    x_ptr, w_ptr, y_ptr,
    n_rows, n_cols, stride_x, stride_y, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # 64-bit math once per program for the tile's first row; 32-bit offsets inside the tile.
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    x = _load_part(x_ptr, row0, n_rows, stride_x, 0, n_cols, BLOCK_M, BLOCK_N)
    sum_sq = tl.sum(x * x, axis=1)
    if BLOCK_T > 0:
        xt = _load_part(x_ptr, row0, n_rows, stride_x, BLOCK_N, n_cols, BLOCK_M, BLOCK_T)
        sum_sq += tl.sum(xt * xt, axis=1)
    rstd = tl.rsqrt(sum_sq / n_cols + eps)
    w = _load_weight(w_ptr, 0, n_cols, BLOCK_N)
    _store_part(y_ptr, x * rstd[:, None] * w[None, :], row0, n_rows, stride_y, 0, n_cols,
                BLOCK_M, BLOCK_N)
    if BLOCK_T > 0:
        wt = _load_weight(w_ptr, BLOCK_N, n_cols, BLOCK_T)
        _store_part(y_ptr, xt * rstd[:, None] * wt[None, :], row0, n_rows, stride_y, BLOCK_N,
                    n_cols, BLOCK_M, BLOCK_T)


@triton.jit(do_not_specialize=["n_rows"])
def _backward_kernel(
    dy_ptr, x_ptr, w_ptr, dx_ptr, dw_partial_ptr,
    n_rows, n_cols, stride_dy, stride_x, stride_dx, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    # Program p walks row tiles p, p + P, p + 2P, ... (P programs); with PREFETCH it loads
    # the next tile before working on the current one, so loads stay in flight meanwhile
    # (num_stages > 1 instead lets Triton's pipeliner stage them in shared memory).
    # rstd is recomputed from x, which is loaded anyway: the forward stores only y.
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    w = _load_weight(w_ptr, 0, n_cols, BLOCK_N)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    if BLOCK_T > 0:
        wt = _load_weight(w_ptr, BLOCK_N, n_cols, BLOCK_T)
        dwt = tl.zeros([BLOCK_T], dtype=tl.float32)
    n_tiles = tl.cdiv(n_rows, BLOCK_M)
    if PREFETCH:
        row_next = tl.cast(pid, tl.int64) * BLOCK_M
        dy_next = _load_part(dy_ptr, row_next, n_rows, stride_dy, 0, n_cols, BLOCK_M, BLOCK_N)
        x_next = _load_part(x_ptr, row_next, n_rows, stride_x, 0, n_cols, BLOCK_M, BLOCK_N)
        if BLOCK_T > 0:
            dyt_next = _load_part(dy_ptr, row_next, n_rows, stride_dy, BLOCK_N, n_cols,
                                  BLOCK_M, BLOCK_T)
            xt_next = _load_part(x_ptr, row_next, n_rows, stride_x, BLOCK_N, n_cols,
                                 BLOCK_M, BLOCK_T)
    for tile in range(pid, n_tiles, programs):
        row0 = tl.cast(tile, tl.int64) * BLOCK_M
        if PREFETCH:
            dy, x = dy_next, x_next
            row_next = row0 + programs * BLOCK_M
            dy_next = _load_part(dy_ptr, row_next, n_rows, stride_dy, 0, n_cols, BLOCK_M,
                                 BLOCK_N)
            x_next = _load_part(x_ptr, row_next, n_rows, stride_x, 0, n_cols, BLOCK_M, BLOCK_N)
            if BLOCK_T > 0:
                dyt, xt = dyt_next, xt_next
                dyt_next = _load_part(dy_ptr, row_next, n_rows, stride_dy, BLOCK_N, n_cols,
                                      BLOCK_M, BLOCK_T)
                xt_next = _load_part(x_ptr, row_next, n_rows, stride_x, BLOCK_N, n_cols,
                                     BLOCK_M, BLOCK_T)
        else:
            dy = _load_part(dy_ptr, row0, n_rows, stride_dy, 0, n_cols, BLOCK_M, BLOCK_N)
            x = _load_part(x_ptr, row0, n_rows, stride_x, 0, n_cols, BLOCK_M, BLOCK_N)
            if BLOCK_T > 0:
                dyt = _load_part(dy_ptr, row0, n_rows, stride_dy, BLOCK_N, n_cols, BLOCK_M,
                                 BLOCK_T)
                xt = _load_part(x_ptr, row0, n_rows, stride_x, BLOCK_N, n_cols, BLOCK_M,
                                BLOCK_T)
        g = dy * w[None, :]
        sum_sq = tl.sum(x * x, axis=1)
        sum_gx = tl.sum(g * x, axis=1)
        if BLOCK_T > 0:
            gt = dyt * wt[None, :]
            sum_sq += tl.sum(xt * xt, axis=1)
            sum_gx += tl.sum(gt * xt, axis=1)
        rstd = tl.rsqrt(sum_sq / n_cols + eps)
        c = sum_gx * rstd / n_cols  # mean(g * xhat)
        xhat = x * rstd[:, None]
        _store_part(dx_ptr, (g - xhat * c[:, None]) * rstd[:, None], row0, n_rows, stride_dx,
                    0, n_cols, BLOCK_M, BLOCK_N)
        dw += tl.sum(dy * xhat, axis=0)
        if BLOCK_T > 0:
            xhatt = xt * rstd[:, None]
            _store_part(dx_ptr, (gt - xhatt * c[:, None]) * rstd[:, None], row0, n_rows,
                        stride_dx, BLOCK_N, n_cols, BLOCK_M, BLOCK_T)
            dwt += tl.sum(dyt * xhatt, axis=0)
    partial = dw_partial_ptr + tl.cast(pid, tl.int64) * n_cols
    cols = tl.arange(0, BLOCK_N)
    tl.store(partial + cols, dw, mask=cols < n_cols)
    if BLOCK_T > 0:
        cols_t = BLOCK_N + tl.arange(0, BLOCK_T)
        tl.store(partial + cols_t, dwt, mask=cols_t < n_cols)


@triton.jit(do_not_specialize=["n_partials"])
def _dw_reduce_kernel(
    partial_ptr, dw_ptr, n_partials, n_cols,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    # ACCUMULATE: dw_ptr is megatron's main_grad; the fp32 sum over partials (the same
    # fixed order) is added to what it holds, in fp32, and rounded once to its dtype.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for start in range(0, n_partials, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        mask = (p < n_partials)[:, None] & col_ok[None, :]
        acc += tl.load(partial_ptr + p[:, None].to(tl.int64) * n_cols + cols[None, :],
                       mask=mask, other=0.0)
    dw = tl.sum(acc, axis=0)
    if ACCUMULATE:
        dw += tl.load(dw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(dw_ptr + cols, dw.to(dw_ptr.dtype.element_ty), mask=col_ok)


# --------------------------------------------------------------------------- launchers


class ForwardConfig(NamedTuple):
    block_m: int  # rows per program
    num_warps: int
    split: bool = True  # a row as BLOCK_N + a tail where one power of two wastes >= 1/4


class BackwardConfig(NamedTuple):
    block_m: int  # rows per loop iteration
    num_warps: int
    programs_per_sm: int  # persistent grid = SMs * programs_per_sm (capped by row tiles)
    prefetch: bool = False  # load the next row tile before computing this one
    num_stages: int = 1  # 2, 3: no change on the H200 (Triton 3.6 leaves these loads alone)
    split: bool = False  # the forward's split; slower here at 5120 (see BACKWARD_TABLE)


def _pow2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


@functools.lru_cache(maxsize=None)
def column_blocks(n_cols: int, split: bool = True) -> tuple:
    """(BLOCK_N, BLOCK_T): one power of two covering the row, or, where that leaves a
    quarter or more of it masked, the largest power of two below H plus a power-of-two tail
    (5120 -> 4096 + 1024; 6656 stays 8192: 81% used)."""
    full = triton.next_power_of_2(n_cols)
    if not split or n_cols > full * 3 // 4 or n_cols <= 16:
        return full, 0
    return full // 2, triton.next_power_of_2(n_cols - full // 2)


# Tuned launch configurations: the winners of the launch sweep of bench_rmsnorm --tune on
# the H200, bf16 (benchmarks/results/rmsnorm_h200_2026-12-01.json, GPU time), which timed
# them as the defaults. Forward: the first five configs at each size lie within 1% (e.g.
# 4096: (4, 4) and (4, 16) both 3.695 TB/s). Other sizes use the heuristics below.
FORWARD_TABLE = {
    4096: ForwardConfig(4, 4),
    5120: ForwardConfig(1, 4),  # split 4096 + 1024: 3.51 TB/s, unsplit 3.48
    8192: ForwardConfig(1, 4),
}
BACKWARD_TABLE = {
    4096: BackwardConfig(2, 16, 1, prefetch=True),
    # unsplit: with the 1024-column tail (4-byte loads a thread) 2.59 TB/s against 3.01
    5120: BackwardConfig(1, 8, 1, prefetch=True, split=False),
    8192: BackwardConfig(1, 16, 1, prefetch=True),
}


@functools.lru_cache(maxsize=None)
def forward_config(n_cols: int) -> ForwardConfig:
    """The table's entry, else: one row per program for wide rows, short rows share one
    (>= 4096 elements a program); warps so each thread holds about 16 live elements (two
    16-byte bf16 loads), 4 to 16.

    Measured on H100, bf16 (benchmarks/results/rmsnorm_h100_2026-11-23*.json sweeps): 4, 8
    and 16 warps land within 2% of each other at H = 4096..16384; 32 warps lose 5-30%.
    """
    if n_cols in FORWARD_TABLE:
        return FORWARD_TABLE[n_cols]
    block_m = max(1, min(16, 4096 // triton.next_power_of_2(n_cols)))
    return ForwardConfig(block_m, max(4, min(16, _pow2_at_most(block_m * n_cols // 512))))


@functools.lru_cache(maxsize=None)
def backward_config(n_cols: int) -> BackwardConfig:
    """The table's entry, else: one program per SM, 16 warps, walking tiles of 8192 elements
    (2 rows of 4096, one of 5120..8192) with the next tile prefetched.

    Measured on H100, bf16: prefetch, one program per SM beat 2 per SM without it by 5-10%
    (registers bound occupancy); 2 rows of 4096 beat 1 by 10%; 32 warps spill at H = 6656;
    H = 16384 has no room for a prefetched copy (2.1 TB/s without, 0.2 with: spills).
    """
    if n_cols in BACKWARD_TABLE:
        return BACKWARD_TABLE[n_cols]
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, min(16, 8192 // block_n))
    return BackwardConfig(block_m, 16, 1, prefetch=block_m * block_n <= 8192)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    if device_index >= 0:
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    return 4  # CPU under TRITON_INTERPRET: a few programs exercise the partial reduction


def _rows(t: torch.Tensor, n_cols: int):
    """(t, row stride) for a kernel that walks t as [M, H] rows: t itself when contiguous,
    else a [M, H] view with unit column stride (a copy only if the layout needs one)."""
    if t.is_contiguous():
        return t, n_cols
    t2 = t.reshape(-1, n_cols)
    if t2.stride(-1) != 1 and t2.shape[0] != 0:
        t2 = t2.contiguous()
    return t2, t2.stride(0)


_FORWARD = CachedLaunch(_forward_kernel)
_BACKWARD = CachedLaunch(_backward_kernel)
_DW_REDUCE = CachedLaunch(_dw_reduce_kernel)
_PARTIALS: dict = {}  # (device index, programs, n_cols) -> fp32 [programs, n_cols] scratch
DW_BLOCK_C = 64  # dw reduction: columns per program
_DW_CONSTEXPRS = {accumulate: dict(BLOCK_P=32, BLOCK_C=DW_BLOCK_C, ACCUMULATE=accumulate)
                  for accumulate in (False, True)}


@functools.lru_cache(maxsize=None)
def _forward_constexprs(n_cols: int, cfg: ForwardConfig) -> dict:
    block_n, block_t = column_blocks(n_cols, cfg.split)
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_T=block_t)


@functools.lru_cache(maxsize=None)
def _backward_constexprs(n_cols: int, cfg: BackwardConfig) -> dict:
    block_n, block_t = column_blocks(n_cols, cfg.split)
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_T=block_t, PREFETCH=cfg.prefetch)


def _cdiv(a: int, b: int) -> int:
    """Plain-int ceil division: triton.cdiv is a ConstexprFunction (Triton 3.9: ~10x the
    cost of this on the host, for every launch)."""
    return -(-a // b)


# fast_launch's cache keys, device index first: the launch config, every int Triton may
# specialize on (not row counts), dtype and 16-byte alignment of each pointer passed in
# (outputs and scratch are fresh: aligned, dtypes follow x and weight).


def forward(x: torch.Tensor, weight: torch.Tensor, eps: float,
            config: Optional[ForwardConfig] = None) -> torch.Tensor:
    """x [..., H], weight [H] -> y (x's shape and dtype, contiguous)."""
    n_cols = x.shape[-1]
    if x.is_contiguous():  # the hot path: no reshape, y laid out as x
        x2, stride, y = x, n_cols, torch.empty_like(x)
    else:
        x2, stride = _rows(x, n_cols)
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows = x2.numel() // n_cols if n_cols else 0
    if n_rows == 0:
        return y
    cfg = config or forward_config(n_cols)
    device = device_index(x)
    _FORWARD.launch(
        (device, cfg, n_cols, stride, x.dtype, weight.dtype, aligned(x2), aligned(weight)),
        (_cdiv(n_rows, cfg.block_m),),
        (x2, weight, y, n_rows, n_cols, stride, n_cols, eps),
        _forward_constexprs(n_cols, cfg), num_warps=cfg.num_warps)
    return y


def _partials(device: int, programs: int, n_cols: int) -> torch.Tensor:
    """The dw partial buffer, reused by every call on this device and stream order. While a
    CUDA graph is captured a fresh one comes from the graph's pool instead (a cached buffer
    first allocated there would belong to the graph)."""
    where = "cpu" if device < 0 else device
    if device >= 0 and torch._C._cuda_isCurrentStreamCapturing():
        return torch.empty((programs, n_cols), dtype=torch.float32, device=where)
    key = (device, programs, n_cols)
    buf = _PARTIALS.get(key)
    if buf is None:
        buf = _PARTIALS[key] = torch.empty((programs, n_cols), dtype=torch.float32, device=where)
    return buf


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
             config: Optional[BackwardConfig] = None, main_grad: Optional[torch.Tensor] = None):
    """dy, x [..., H] (x contiguous or [M, H] rows; dy any layout of x's shape), weight [H]
    -> dx (dy's shape, x's dtype, contiguous), dw [H] (weight's dtype).

    main_grad (a contiguous [H] buffer, fp32 or 16-bit): dw is added into it instead, by the
    same reduction kernel (its fp32 sum plus the buffer, one rounding to the buffer's
    dtype), and None is returned for dw."""
    if main_grad is not None and (main_grad.shape != weight.shape or not main_grad.is_contiguous()):
        raise ValueError(f"main_grad must be a contiguous {tuple(weight.shape)} tensor, got "
                         f"{tuple(main_grad.shape)} with strides {main_grad.stride()}")
    n_cols = x.shape[-1]
    if dy.is_contiguous() and x.is_contiguous() and dy.dtype == x.dtype:  # the hot path
        dy2, x2, stride_dy, stride_x, dx = dy, x, n_cols, n_cols, torch.empty_like(dy)
    else:
        dy2, stride_dy = _rows(dy, n_cols)
        x2, stride_x = _rows(x, n_cols)
        dx = torch.empty(dy.shape, dtype=x.dtype, device=x.device)
    n_rows = x2.numel() // n_cols if n_cols else 0
    if n_rows == 0:
        return dx, None if main_grad is not None else torch.zeros_like(weight)
    accumulate = main_grad is not None
    dw = main_grad if accumulate else torch.empty_like(weight)
    cfg = config or backward_config(n_cols)
    device = device_index(x)
    programs = min(_cdiv(n_rows, cfg.block_m), _sm_count(device) * cfg.programs_per_sm)
    partial = _partials(device, programs, n_cols)
    _BACKWARD.launch(
        (device, cfg, n_cols, stride_dy, stride_x, dy.dtype, x.dtype, weight.dtype,
         aligned(dy2), aligned(x2), aligned(weight)), (programs,),
        (dy2, x2, weight, dx, partial, n_rows, n_cols, stride_dy, stride_x, n_cols, eps),
        _backward_constexprs(n_cols, cfg), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _DW_REDUCE.launch(
        (device, n_cols, dw.dtype, accumulate, aligned(dw)), (_cdiv(n_cols, DW_BLOCK_C),),
        (partial, dw, programs, n_cols), _DW_CONSTEXPRS[accumulate], num_warps=4)
    return dx, None if accumulate else dw


# --------------------------------------------------------------------------- autograd


class RMSNormFunction(torch.autograd.Function):
    """y = rms_norm(x, w); saves x and w (rstd is recomputed in the backward from x, which
    it reads anyway).

    y and dx are allocated in their final shapes, not returned as views, so autograd can
    take dx as x.grad without a copy.

    A weight tagged `fused_main_grad` that has a `main_grad` (megatron DDP's buffer) gets
    dw added into it by the dw reduction kernel itself, as megatron's linears do under
    gradient_accumulation_fusion, and `grad_added_to_main_grad` set; autograd gets a
    placeholder (zeros under `zero_out_wgrad`, whose DDP hook adds it anyway), so DDP's
    hook fires, for overlapped reduction, without adding dw twice. Why: at mbs 1 that saves
    a bf16 dw and DDP's add kernel per norm per micro-batch, and dw's bf16 rounding.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, fwd_config=None, bwd_config=None):
        y = forward(x, weight, eps, fwd_config)
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        ctx.bwd_config = bwd_config
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        main_grad = getattr(weight, "main_grad", None) if getattr(weight, "fused_main_grad", False) else None
        dx, dw = backward(dy, x, weight, ctx.eps, ctx.bwd_config, main_grad)
        if main_grad is not None:
            weight.grad_added_to_main_grad = True
            dw = (torch.zeros_like if getattr(weight, "zero_out_wgrad", False) else torch.empty_like)(weight)
        return dx, dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim of x ([..., H]) with weight [H]; autograd-aware.

    Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1.
    """
    n_cols = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n_cols:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {n_cols}")
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"hidden size {n_cols} exceeds {MAX_HIDDEN}, the widest row kept in registers")
    if x.get_device() != weight.get_device():
        raise ValueError(f"x on {x.device} but weight on {weight.device}")
    return RMSNormFunction.apply(x, weight, float(eps))


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The formula in float64 (for tests): x * rsqrt(mean(x^2) + eps) * w."""
    x64, w64 = x.double(), weight.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64
