"""The residual add and the RMSNorm after it, fused, forward and backward, in Triton.

    h = a + r                                  (rounded to the dtype, as a separate add would)
    y = h * rstd * w,   rstd = rsqrt(mean(h^2) + eps)    (per row, statistics in fp32)

a is the attention block's output, r the residual stream, w the pre-MLP norm's weight; h
is the new residual stream and y the MLP's input. Backward, with dy the gradient of y and
dh_in the gradient reaching h from later in the layer (the MLP's residual add):

    dh = dh_in + rstd * (g - hhat * mean(g * hhat)),   g = dy * w,  hhat = h * rstd
    da = dr = dh,    dw = sum over rows of dy * hhat

Why: apart, the add reads 2 and writes 1 tensor and the norm reads 1 and writes 1;
backward, the norm reads 2 and writes 1 and autograd's gradient sum reads 2 and writes 1.
Fused: forward reads 2, writes 2; backward reads 3, writes 1 (all [tokens, hidden] bf16).
The backward also runs a grid of many short programs (16 rows each, dw partial per
program) where the H200 profile (2026-12-01, llama_1b3, hidden 2048) showed the
persistent-grid RMSNorm backward at 1.5 TB/s. Fewer rows per program where 16 would leave
the GPU with under 3 programs per SM (`rows_per_program`): each program runs its rows back
to back, so at mbs 1 (2048 rows) 128 programs of 16 rows took 30 us a call, 752 calls and
22.9 ms a step (h200_sweep_2026-12-01_defer, the profiled mbs-1 trial).

Layers: `_add_norm_fwd_kernel` (one row per program), `_add_norm_bwd_kernel` (ROWS rows
per program, a [programs, H] fp32 dw partial), `_add_norm_bwd_tiles_kernel` (persistent,
row tiles, one partial per program: SMs x programs_per_sm rows; the default where
BACKWARD_TABLE has the hidden size, 2048 since 2026-12-01 v7: 210 -> 138 us a call at
32768 rows), kernels/rmsnorm_kernels.py's `_dw_reduce_kernel` (the partials summed in a
fixed order, into main_grad when tagged), host `forward` / `backward`,
`AddRMSNormFunction` and `add_rms_norm`. `reference` is float64.
A weight tagged `fused_main_grad` (kernels.megatron_layer does so under megatron's
gradient_accumulation_fusion) gets dw added straight into its fp32 `main_grad`: at mbs 1
that is 47 norms x 16 micro-batches of bf16 dw and DDP add kernels fewer per step.

Output targets (`layout.wgrad_defer=step`, kernels/out_target.py): `y_target` says where y
goes (the next linear's input arena slot: FC1's, or the next layer's QKV's) and `dh_target`
where dh goes (the gradient of a and r alike: the attention output linear's or FC2's dY
slot), both set by kernels/megatron_layer.py from kernels/defer_wiring.py; None allocates.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels import main_grad as main_grad_rule
from kernels import out_target
from kernels.rmsnorm import dw_reduce_plan
from kernels.rmsnorm_kernels import _dw_reduce_kernel, _load_raw, _load_weight, _store_part

ROWS = 16  # backward rows per program: dw partials stay 1/16 of the rows' bytes
MIN_PROGRAMS_PER_SM = 3  # below this, a program's rows run in sequence with nothing to overlap them
MAX_HIDDEN = 16384  # one row lives in registers


@triton.jit
def _add_norm_fwd_kernel(a_ptr, r_ptr, w_ptr, h_ptr, y_ptr, rstd_ptr, n_cols, eps,
                         BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    offs = row * n_cols + cols
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = (a + r).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + offs, h, mask=mask)
    h = h.to(tl.float32)  # the norm sees h as stored, as it would after a separate add
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (h * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _add_norm_bwd_kernel(dy_ptr, dh_in_ptr, h_ptr, w_ptr, rstd_ptr, dh_ptr, dw_partial_ptr,
                         n_rows, n_cols, HAS_DH_IN: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(ROWS):
        row = pid.to(tl.int64) * ROWS + i
        if row < n_rows:
            offs = row * n_cols + cols
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            hhat = h * rstd
            g = dy * w
            c = tl.sum(g * hhat, axis=0) / n_cols
            dh = (g - hhat * c) * rstd
            if HAS_DH_IN:
                dh += tl.load(dh_in_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=mask)
            dw += dy * hhat
    tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _add_norm_bwd_tiles_kernel(dy_ptr, dh_in_ptr, h_ptr, w_ptr, rstd_ptr, dh_ptr, dw_partial_ptr,
                               n_rows, n_cols, HAS_DH_IN: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr):
    # Persistent (BackwardConfig.programs_per_sm > 0): program p walks [BLOCK_M, BLOCK_N] row
    # tiles p, p + P, ... with its fp32 dw partial in registers, so the partials are P rows
    # (P = SMs x programs_per_sm) instead of one per 16 rows: at 32768 x 2048 that is 528
    # rows to reduce instead of 2048 (the row-loop kernel's 16.7 MB, whose reduction took 35
    # us a call in the 2026-12-01 H200 profile). With PREFETCH the next tile's dy, h and
    # dh_in are loaded before this tile's math, so they are in flight meanwhile.
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    w = _load_weight(w_ptr, 0, n_cols, BLOCK_N)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    if PREFETCH:
        dy_n, h_n, dh_in_n = _bwd_tile_loads(dy_ptr, h_ptr, dh_in_ptr, tl.cast(pid, tl.int64) * BLOCK_M,
                                             n_rows, n_cols, HAS_DH_IN, BLOCK_M, BLOCK_N)
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_M), programs):
        row0 = tl.cast(tile, tl.int64) * BLOCK_M
        if PREFETCH:
            dy, h, dh_in = dy_n, h_n, dh_in_n
            dy_n, h_n, dh_in_n = _bwd_tile_loads(dy_ptr, h_ptr, dh_in_ptr, row0 + programs * BLOCK_M,
                                                 n_rows, n_cols, HAS_DH_IN, BLOCK_M, BLOCK_N)
        else:
            dy, h, dh_in = _bwd_tile_loads(dy_ptr, h_ptr, dh_in_ptr, row0, n_rows, n_cols,
                                           HAS_DH_IN, BLOCK_M, BLOCK_N)
        dy, h = dy.to(tl.float32), h.to(tl.float32)
        rows = row0 + tl.arange(0, BLOCK_M)
        rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)
        hhat = h * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * hhat, axis=1) / n_cols
        dh = (g - hhat * c[:, None]) * rstd[:, None]
        if HAS_DH_IN:
            dh += dh_in.to(tl.float32)
        _store_part(dh_ptr, dh, row0, n_rows, n_cols, 0, n_cols, BLOCK_M, BLOCK_N)
        dw += tl.sum(dy * hhat, axis=0)
    cols = tl.arange(0, BLOCK_N)
    tl.store(dw_partial_ptr + tl.cast(pid, tl.int64) * n_cols + cols, dw, mask=cols < n_cols)


@triton.jit
def _bwd_tile_loads(dy_ptr, h_ptr, dh_in_ptr, row0, n_rows, n_cols, HAS_DH_IN: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(dy, h, dh_in) of rows [row0, row0 + BLOCK_M) in their dtype (widened where used: a
    prefetched tile stays 16-bit); dh_in is dy (unused) without HAS_DH_IN. No cache hint:
    each byte is read once (session 6 found the evict_first hint slower for RMSNorm at
    every size it measured)."""
    dy = _load_raw(dy_ptr, row0, n_rows, n_cols, 0, n_cols, BLOCK_M, BLOCK_N, False)
    h = _load_raw(h_ptr, row0, n_rows, n_cols, 0, n_cols, BLOCK_M, BLOCK_N, False)
    if HAS_DH_IN:
        dh_in = _load_raw(dh_in_ptr, row0, n_rows, n_cols, 0, n_cols, BLOCK_M, BLOCK_N, False)
    else:
        dh_in = dy
    return dy, h, dh_in


class BackwardConfig(NamedTuple):
    """How `backward` runs. programs_per_sm 0: the row-loop kernel (block_m rows a program,
    halved by rows_per_program at small row counts; one dw partial per program); > 0: the
    persistent tile kernel, block_m rows a tile, min(tiles, SMs x programs_per_sm) programs.
    reduce_rows: the dw reduction's partial rows a pass (kernels.rmsnorm.dw_reduce_plan),
    0 its form up to 2026-12-01 (128 rows x 4096 fp32 a pass, 4 warps)."""

    block_m: int
    num_warps: int
    programs_per_sm: int = 0
    prefetch: bool = False
    reduce_rows: int = 0


# Hidden sizes with a measured backward (bench_rmsnorm's add+norm part, H200 bf16, GPU time
# with the dw reduction, L2 flushed; benchmarks/results/rmsnorm_h200_2026-12-01_v7.json,
# commit 5979bbb): at 2048, 2 rows a tile, 8 warps, 2 programs an SM, prefetch, 512-row
# reduction passes won at both row counts: 32768 rows (mbs 16) 137.6 us against the row
# loop's 210.4 (3.90 against 2.55 TB/s), 2048 rows (mbs 1) 18.3 against 24.2 us. Other
# sizes run the row-loop kernel as before.
BACKWARD_TABLE: dict = {2048: BackwardConfig(2, 8, 2, True, 512)}


def backward_config(n_cols: int) -> BackwardConfig:
    if n_cols in BACKWARD_TABLE:
        return BACKWARD_TABLE[n_cols]
    return BackwardConfig(ROWS, _warps(triton.next_power_of_2(n_cols)))


def _reduce_dw(partial: torch.Tensor, out: torch.Tensor, *, accumulate: bool, rows: int = 0) -> torch.Tensor:
    """out = (out +) partial.sum(0) in a fixed order, cast to out's dtype (main_grad's fp32
    or the weight's own), by kernels/rmsnorm_kernels.py's reduction: replaces torch's sum, a
    cast and DDP's or our add (3 launches). rows 0: tiles of 128 partials x 4096 fp32 (all
    partials of an mbs-1 micro-batch in one pass, 64 programs at hidden 2048; at mbs 16, 16
    passes over 2048 partials: 35 us a call, 2026-12-01 H200 profile); else
    dw_reduce_plan's tiles of `rows` partials."""
    n_programs, n_cols = partial.shape
    if rows:
        constexprs, warps = dw_reduce_plan(n_programs, accumulate, rows)
    else:
        block_p = min(128, triton.next_power_of_2(n_programs))
        constexprs = dict(BLOCK_P=block_p, BLOCK_C=max(16, min(64, 4096 // block_p)), ACCUMULATE=accumulate)
        warps = 4
    _dw_reduce_kernel[(triton.cdiv(n_cols, constexprs["BLOCK_C"]),)](partial, out, n_programs, n_cols,
                                                                     **constexprs, num_warps=warps)
    return out


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the CPU interpreter: any grid will do


def rows_per_program(n_rows: int, sms: int, rows: int = ROWS) -> int:
    """rows (default ROWS), halved (down to 1) while the backward's grid would have fewer than
    MIN_PROGRAMS_PER_SM programs per SM: 16 at mbs 16 (32768 rows on 132 SMs), 4 at mbs 1
    (2048 rows: 512 programs, dw partials 1/4 of the rows' fp32 bytes)."""
    while rows > 1 and triton.cdiv(n_rows, rows) < MIN_PROGRAMS_PER_SM * sms:
        rows //= 2
    return rows


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.is_contiguous() else t.contiguous().reshape(-1, t.shape[-1])


def _warps(block_n: int) -> int:
    return max(4, min(16, block_n // 512))


def forward(a: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, y_out: torch.Tensor = None):
    """h = a + r, y = rmsnorm(h) * w (a's shape and dtype), rstd [rows] fp32; y written into
    `y_out` (contiguous, a's shape and dtype) when given."""
    if a.shape != r.shape or a.dtype != r.dtype:
        raise ValueError(f"a and r must match, got {tuple(a.shape)} {a.dtype} and {tuple(r.shape)} {r.dtype}")
    n_cols = a.shape[-1]
    if n_cols > MAX_HIDDEN or w.shape != (n_cols,):
        raise ValueError(f"hidden size {n_cols} with weight {tuple(w.shape)} (at most {MAX_HIDDEN})")
    a2, r2 = _rows(a), _rows(r)
    # Fresh contiguous outputs of a's shape, not views: megatron copies views it returns.
    h = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    y = out_target.empty(y_out, a.shape, a.dtype, a.device, "y_out")
    rstd = torch.empty(a2.shape[0], dtype=torch.float32, device=a.device)
    if a2.shape[0]:
        block_n = triton.next_power_of_2(n_cols)
        _add_norm_fwd_kernel[(a2.shape[0],)](a2, r2, w, h, y, rstd, n_cols, float(eps),
                                             BLOCK_N=block_n, num_warps=_warps(block_n))
    return h, y, rstd


def backward(dy: torch.Tensor, dh_in, h: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor,
             *, dw_into: torch.Tensor = None, dh_out: torch.Tensor = None, config: BackwardConfig = None):
    """dh (h's shape and dtype; written into `dh_out` when given) and dw from the gradients
    of y and of h (dh_in None: no gradient reached h from later). dw: a new fp32 tensor, or,
    with `dw_into` (a weight's fp32 main_grad), added into that buffer and returned.
    config: the launch (default backward_config(hidden))."""
    h2, dy2 = _rows(h), _rows(dy)
    dh_in2 = dy2 if dh_in is None else _rows(dh_in)  # not read when absent (HAS_DH_IN)
    n_rows, n_cols = h2.shape
    dh = out_target.empty(dh_out, h.shape, h.dtype, h.device, "dh_out")
    if not n_rows:
        return dh, dw_into if dw_into is not None else torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    cfg = config or backward_config(n_cols)
    block_n = triton.next_power_of_2(n_cols)
    has_dh_in = dh_in is not None
    if cfg.programs_per_sm:
        programs = min(triton.cdiv(n_rows, cfg.block_m), _sm_count(h.device) * cfg.programs_per_sm)
        partial = torch.empty((programs, n_cols), dtype=torch.float32, device=h.device)
        _add_norm_bwd_tiles_kernel[(programs,)](dy2, dh_in2, h2, w, rstd, dh, partial, n_rows, n_cols,
                                                HAS_DH_IN=has_dh_in, BLOCK_M=cfg.block_m, BLOCK_N=block_n,
                                                PREFETCH=cfg.prefetch, num_warps=cfg.num_warps)
    else:
        rows = rows_per_program(n_rows, _sm_count(h.device), cfg.block_m)
        programs = triton.cdiv(n_rows, rows)
        partial = torch.empty((programs, n_cols), dtype=torch.float32, device=h.device)
        _add_norm_bwd_kernel[(programs,)](dy2, dh_in2, h2, w, rstd, dh, partial, n_rows, n_cols,
                                          HAS_DH_IN=has_dh_in, ROWS=rows, BLOCK_N=block_n,
                                          num_warps=cfg.num_warps)
    out = dw_into if dw_into is not None else torch.empty(n_cols, dtype=torch.float32, device=h.device)
    return dh, _reduce_dw(partial, out, accumulate=dw_into is not None, rows=cfg.reduce_rows)


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, r, w, eps, y_target=None, dh_target=None):
        h, y, rstd = forward(a, r, w, eps, out_target.take(y_target, a.shape, a.dtype, a.device))
        ctx.save_for_backward(h, w, rstd)
        ctx.dh_target = dh_target
        ctx.set_materialize_grads(False)  # an output without gradient arrives as None, not zeros
        return h, y

    @staticmethod
    def backward(ctx, dh_in, dy):
        h, w, rstd = ctx.saved_tensors
        dy = torch.zeros_like(h) if dy is None else dy  # y unused: never in a trial's layers
        dh_out = out_target.take(ctx.dh_target, h.shape, h.dtype, h.device)
        if getattr(w, "fused_main_grad", False):
            # As megatron's linears do under gradient_accumulation_fusion: dw goes into DDP's
            # fp32 buffer here, in the reduce of the partials (no bf16 rounding, no add
            # kernel of DDP's per micro-batch), and autograd gets a placeholder, flagged so
            # DDP's hook does not add it.
            dh, _ = backward(dy, dh_in, h, w, rstd, dw_into=w.main_grad, dh_out=dh_out)
            return dh, dh, main_grad_rule.handed_over(w), None, None, None
        dh, dw = backward(dy, dh_in, h, w, rstd, dh_out=dh_out)
        return dh, dh, dw.to(w.dtype), None, None, None


def add_rms_norm(a: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-5,
                 y_target: out_target.Target = None, dh_target: out_target.Target = None):
    """(h, y): h = a + r and y = RMSNorm(h) * weight; differentiable in a, r and weight.
    y_target / dh_target: where y and dh (the gradient of a and of r) go (kernels.out_target)."""
    return AddRMSNormFunction.apply(a, r, weight, eps, y_target, dh_target)


def reference(a, r, weight, eps: float = 1e-5):
    """The float64 formula (h rounded to a's dtype first, as the kernel and a separate add do)."""
    h = (a.double() + r.double()).to(a.dtype).double() if a.dtype != torch.float64 else a + r
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    return h, y
