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

H200, bf16 (benchmarks/results/rmsnorm_h200_2026-12-01_v7.json, commit 5979bbb; shapes
32768x8192, 16384x4096, 8192x5120): GPU time fwd 1.02/1.00/1.00x a copy of x (the driver's
cudaMemcpyAsync device to device, same bytes), fwd+bwd 0.98/0.96/0.94x, 1.205/1.22/1.47x
the best peer (liger, torch.compile, liger); host included (do_bench) fwd+bwd
2.19/1.76/1.52x F.rms_norm. The forward reads each row twice in chunks (statistics, then
y; kernels/rmsnorm_two_pass.py), as inductor does: a chunk in registers instead of the
row, so many programs per SM (v6, one pass: 0.97-0.99x copy). The backward is bound by
bytes in flight: each program holds its tile and the prefetched next one in registers
(0.94-0.98x copy); at 5120 the row as 512-column chunks frees the registers an 8192-lane
block wastes, so three programs fit per SM.

Three layers, as in Liger-Kernel and the Triton layer-norm tutorial:
  * private @triton.jit kernels in kernels/rmsnorm_kernels.py (row tiles forward; a
    persistent backward keeping each program's fp32 dw partial in registers, written once
    to a [programs, H] buffer; the dw reduction over that buffer in a fixed order; chunked
    forms of both; two-pass forms reading each row twice in chunks, in
    kernels/rmsnorm_two_pass.py);
  * host launchers `forward` and `backward` here, running the kernel, block, warps and
    grid of a launch config (kernels/rmsnorm_configs.py: types, tuned tables, heuristics);
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
from typing import Optional

import torch
import triton

from kernels import main_grad as main_grad_rule
from kernels import out_target
from kernels.fast_launch import CachedLaunch, aligned, device_index
from kernels.rmsnorm_configs import (DW_REDUCE_ROWS, BackwardConfig, ForwardConfig,
                                     backward_config, chunks, column_blocks, forward_config,
                                     two_pass_chunks, uses_chunked_forward)
from kernels.rmsnorm_kernels import (_backward_chunked_kernel, _backward_kernel,
                                     _dw_reduce_kernel, _forward_chunked_kernel, _forward_kernel,
                                     _forward_tma_kernel)
from kernels.rmsnorm_two_pass import _backward_two_pass_kernel, _forward_two_pass_kernel

MAX_HIDDEN = 65536  # one row lives in registers; wider rows would spill


# --------------------------------------------------------------------------- launchers


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
_FORWARD_CHUNKED = CachedLaunch(_forward_chunked_kernel)
_FORWARD_TMA = CachedLaunch(_forward_tma_kernel)
_BACKWARD_CHUNKED = CachedLaunch(_backward_chunked_kernel)
_FORWARD_TWO_PASS = CachedLaunch(_forward_two_pass_kernel)
_BACKWARD_TWO_PASS = CachedLaunch(_backward_two_pass_kernel)
_DW_REDUCE = CachedLaunch(_dw_reduce_kernel)
_PARTIALS: dict = {}  # (device index, programs, n_cols) -> fp32 [programs, n_cols] scratch


@functools.lru_cache(maxsize=None)
def dw_reduce_plan(programs: int, accumulate: bool, rows: int = 0) -> tuple:
    """(constexprs, num_warps) of the dw reduction over `programs` partial rows: BLOCK_P
    partials at a time (at most `rows`, default DW_REDUCE_ROWS) by BLOCK_C columns, one
    [BLOCK_P, BLOCK_C] tile of at most 8192 fp32 per pass. rows=32 is the reduction up to
    2026-12-01 (32 x 64, 4 warps: 5 dependent passes over the H200's 132 partials); 256
    reads them all in one pass (256 x 32, 8 warps)."""
    block_p = min(rows or DW_REDUCE_ROWS, triton.next_power_of_2(programs))
    block_c = max(16, min(64, 8192 // block_p))
    constexprs = dict(BLOCK_P=block_p, BLOCK_C=block_c, ACCUMULATE=accumulate)
    return constexprs, 8 if block_p * block_c >= 8192 else 4


@functools.lru_cache(maxsize=None)
def _forward_plan(n_cols: int, cfg: ForwardConfig) -> tuple:
    """(the kernel's CachedLaunch, its constexprs) for this config: one cached look-up a call."""
    if cfg.two_pass:
        chunk, n_chunks = two_pass_chunks(n_cols, cfg.chunk)
        return _FORWARD_TWO_PASS, dict(BLOCK_M=cfg.block_m, CHUNK=chunk, N_CHUNKS=n_chunks)
    if cfg.tma_stages:
        chunk, n_chunks = chunks(n_cols, cfg.chunk)
        return _FORWARD_TMA, dict(BLOCK_M=cfg.block_m, CHUNK=chunk, N_CHUNKS=n_chunks,
                                  STAGES=cfg.tma_stages)
    if uses_chunked_forward(cfg):
        chunk, n_chunks = chunks(n_cols, cfg.chunk)
        return _FORWARD_CHUNKED, dict(BLOCK_M=cfg.block_m, CHUNK=chunk, N_CHUNKS=n_chunks,
                                      PERSISTENT=cfg.programs_per_sm > 0,
                                      EVICT_FIRST=cfg.evict_first, PACKED=cfg.packed,
                                      STORE_CS=cfg.stream_store)
    block_n, block_t = column_blocks(n_cols, cfg.split)
    return _FORWARD, dict(BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_T=block_t)


@functools.lru_cache(maxsize=None)
def _backward_plan(n_cols: int, cfg: BackwardConfig) -> tuple:
    if cfg.two_pass:
        chunk, n_chunks = two_pass_chunks(n_cols, cfg.chunk)
        return _BACKWARD_TWO_PASS, dict(BLOCK_M=cfg.block_m, CHUNK=chunk, N_CHUNKS=n_chunks)
    if cfg.chunk > 0:
        chunk, n_chunks = chunks(n_cols, cfg.chunk)
        return _BACKWARD_CHUNKED, dict(BLOCK_M=cfg.block_m, CHUNK=chunk, N_CHUNKS=n_chunks,
                                       PREFETCH=cfg.prefetch, W_IN_REGS=cfg.weight_in_registers,
                                       EVICT_FIRST=cfg.evict_first)
    block_n, block_t = column_blocks(n_cols, cfg.split)
    return _BACKWARD, dict(BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_T=block_t,
                           PREFETCH=cfg.prefetch, EVICT_FIRST=cfg.evict_first)


def _cdiv(a: int, b: int) -> int:
    """Plain-int ceil division: triton.cdiv is a ConstexprFunction (Triton 3.9: ~10x the
    cost of this on the host, for every launch)."""
    return -(-a // b)


# fast_launch's cache keys, device index first: the launch config, every int Triton may
# specialize on (not row counts), dtype and 16-byte alignment of each pointer passed in
# (outputs and scratch are fresh: aligned, dtypes follow x and weight).


def forward(x: torch.Tensor, weight: torch.Tensor, eps: float,
            config: Optional[ForwardConfig] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., H], weight [H] -> y (x's shape and dtype, contiguous); written into `out`
    (kernels.out_target: contiguous, aligned, y's shape and dtype) when given."""
    n_cols = x.shape[-1]
    if x.is_contiguous():  # the hot path: no reshape, y laid out as x
        x2, stride = x, n_cols
        y = torch.empty_like(x) if out is None else out_target.empty(out, x.shape, x.dtype, x.device, "y")
    else:
        x2, stride = _rows(x, n_cols)
        y = out_target.empty(out, x.shape, x.dtype, x.device, "y")
    n_rows = x2.numel() // n_cols if n_cols else 0
    if n_rows == 0:
        return y
    cfg = config or forward_config(n_cols)
    device = device_index(x)
    if cfg.tma_stages and not cfg.two_pass and not _tma_ready(x2, stride, y):
        cfg = cfg._replace(tma_stages=0)  # the chunked kernel, persistent as configured
    kernel, constexprs = _forward_plan(n_cols, cfg)
    programs = _cdiv(n_rows, cfg.block_m)
    if cfg.programs_per_sm and not cfg.two_pass:  # persistent: programs walk several tiles
        programs = min(programs, _sm_count(device) * cfg.programs_per_sm)
    kernel.launch(
        (device, cfg, n_cols, stride, x.dtype, weight.dtype, aligned(x2), aligned(weight)),
        (programs,), (x2, weight, y, n_rows, n_cols, stride, n_cols, eps),
        constexprs, num_warps=cfg.num_warps)
    return y


def _tma_ready(x2: torch.Tensor, stride: int, y: torch.Tensor) -> bool:
    """What the TMA forward needs: 16-byte aligned rows of x and y; on a GPU, an allocator
    for its device-side descriptors' scratch (Triton's, per thread context), set here to a
    torch allocation where none is."""
    size = x2.element_size()
    if (stride * size) % 16 or (y.shape[-1] * size) % 16 or not (aligned(x2) and aligned(y)):
        return False
    if x2.is_cuda:
        from triton.runtime import _allocation

        if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            triton.set_allocator(_scratch)
    return True


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


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
             config: Optional[BackwardConfig] = None, main_grad: Optional[torch.Tensor] = None,
             out: Optional[torch.Tensor] = None):
    """dy, x [..., H] (x contiguous or [M, H] rows; dy any layout of x's shape), weight [H]
    -> dx (dy's shape, x's dtype, contiguous), dw [H] (weight's dtype).

    main_grad (a contiguous [H] buffer, fp32 or 16-bit): dw is added into it instead, by the
    same reduction kernel (its fp32 sum plus the buffer, one rounding to the buffer's
    dtype), and None is returned for dw. out: where dx goes (kernels.out_target), else fresh."""
    if main_grad is not None and (main_grad.shape != weight.shape or not main_grad.is_contiguous()):
        raise ValueError(f"main_grad must be a contiguous {tuple(weight.shape)} tensor, got "
                         f"{tuple(main_grad.shape)} with strides {main_grad.stride()}")
    n_cols = x.shape[-1]
    if dy.is_contiguous() and x.is_contiguous() and dy.dtype == x.dtype:  # the hot path
        dy2, x2, stride_dy, stride_x = dy, x, n_cols, n_cols
        dx = torch.empty_like(dy) if out is None else out_target.empty(out, dy.shape, x.dtype, x.device, "dx")
    else:
        dy2, stride_dy = _rows(dy, n_cols)
        x2, stride_x = _rows(x, n_cols)
        dx = out_target.empty(out, dy.shape, x.dtype, x.device, "dx")
    n_rows = x2.numel() // n_cols if n_cols else 0
    if n_rows == 0:
        return dx, None if main_grad is not None else torch.zeros_like(weight)
    accumulate = main_grad is not None
    dw = main_grad if accumulate else torch.empty_like(weight)
    cfg = config or backward_config(n_cols)
    device = device_index(x)
    programs = min(_cdiv(n_rows, cfg.block_m), _sm_count(device) * cfg.programs_per_sm)
    partial = _partials(device, programs, n_cols)
    kernel, constexprs = _backward_plan(n_cols, cfg)
    kernel.launch(
        (device, cfg, n_cols, stride_dy, stride_x, dy.dtype, x.dtype, weight.dtype,
         aligned(dy2), aligned(x2), aligned(weight)), (programs,),
        (dy2, x2, weight, dx, partial, n_rows, n_cols, stride_dy, stride_x, n_cols, eps),
        constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    dw_constexprs, dw_warps = dw_reduce_plan(programs, accumulate)
    _DW_REDUCE.launch(
        (device, n_cols, dw.dtype, accumulate, aligned(dw), dw_constexprs["BLOCK_P"]),
        (_cdiv(n_cols, dw_constexprs["BLOCK_C"]),),
        (partial, dw, programs, n_cols), dw_constexprs, num_warps=dw_warps)
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

    y_target / dx_target (kernels.out_target.Target): where y and dx go (layout.wgrad_defer).
    """

    @staticmethod
    def forward(ctx, x, weight, eps, fwd_config=None, bwd_config=None, y_target=None, dx_target=None):
        out = None if y_target is None else out_target.take(y_target, x.shape, x.dtype, x.device)
        y = forward(x, weight, eps, fwd_config, out)
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        ctx.bwd_config = bwd_config
        ctx.dx_target = dx_target
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        main_grad = getattr(weight, "main_grad", None) if getattr(weight, "fused_main_grad", False) else None
        out = None if ctx.dx_target is None else out_target.take(ctx.dx_target, dy.shape, x.dtype, x.device)
        dx, dw = backward(dy, x, weight, ctx.eps, ctx.bwd_config, main_grad, out)
        if main_grad is not None:
            dw = main_grad_rule.handed_over(weight)
        return dx, dw, None, None, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-5,
             y_target: out_target.Target = None, dx_target: out_target.Target = None) -> torch.Tensor:
    """RMSNorm over the last dim of x ([..., H]) with weight [H]; autograd-aware.
    y_target / dx_target: where y and dx go (kernels.out_target; None: fresh tensors).

    Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1.
    """
    n_cols = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n_cols:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {n_cols}")
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"hidden size {n_cols} exceeds {MAX_HIDDEN}, the widest row kept in registers")
    if x.get_device() != weight.get_device():
        raise ValueError(f"x on {x.device} but weight on {weight.device}")
    if y_target is None and dx_target is None:  # the common call, as short as before
        return RMSNormFunction.apply(x, weight, float(eps))
    return RMSNormFunction.apply(x, weight, float(eps), None, None, y_target, dx_target)


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The formula in float64 (for tests): x * rsqrt(mean(x^2) + eps) * w."""
    x64, w64 = x.double(), weight.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64
