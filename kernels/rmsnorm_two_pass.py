"""Two-pass RMSNorm kernels (launched by kernels/rmsnorm.py for a config with two_pass=True).

The other kernels (kernels/rmsnorm_kernels.py) hold a whole row tile in registers from its
load to its store, so registers bound the programs an SM runs and with them the bytes in
flight (at 8192 the backward: 127 registers x 16 warps, one program an SM, 0.964 of a
copy). Here a row tile is read twice, chunk by chunk: pass 1 sums the row statistics,
pass 2 reads the chunks again (from L2: pass 1 loads them with evict_last, pass 2 with
evict_first) and writes the output. Registers hold a chunk and the accumulators, not the
row. torch.compile's RMSNorm forward at 8192 (inductor's looped reduction: the same two
loops and hints) ran 4.26 TB/s against our one-pass 4.11 (rmsnorm_h200_2026-12-01_v6.json).

  * `_forward_two_pass_kernel`: one [BLOCK_M, CHUNK]-chunked row tile per program;
  * `_backward_two_pass_kernel`: persistent (programs walk row tiles p, p + P, ...); the
    chunk loop is unrolled (N_CHUNKS, compile time) so each program keeps its fp32 dw
    partial as N_CHUNKS register chunks, written once to the [programs, H] buffer that
    kernels/rmsnorm_kernels.py's `_dw_reduce_kernel` sums in a fixed order.
"""

import triton
import triton.language as tl

from kernels.rmsnorm_kernels import _load_weight, _store_part


@triton.jit
def _load_hinted(ptr, row0, n_rows, stride, col0, n_cols,
                 BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, KEEP: tl.constexpr):
    """Columns [col0, col0 + BLOCK) of rows [row0, row0 + BLOCK_M) as fp32 (zeros outside):
    KEEP loads evict_last (read again in pass 2), else evict_first (the last read)."""
    rows = tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK)
    mask = (rows < n_rows - row0)[:, None] & (cols < n_cols)[None, :]
    offs = row0 * stride + rows[:, None] * stride + cols[None, :]
    if KEEP:
        v = tl.load(ptr + offs, mask=mask, other=0.0, eviction_policy="evict_last")
    else:
        v = tl.load(ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")
    return v.to(tl.float32)


@triton.jit(do_not_specialize=["n_rows"])
def _forward_two_pass_kernel(
    x_ptr, w_ptr, y_ptr,
    n_rows, n_cols, stride_x, stride_y, eps,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    # Squares summed elementwise chunk after chunk, one cross-thread reduction at the end.
    sq = tl.zeros([BLOCK_M, CHUNK], dtype=tl.float32)
    for c in range(N_CHUNKS):
        x = _load_hinted(x_ptr, row0, n_rows, stride_x, c * CHUNK, n_cols, BLOCK_M, CHUNK, True)
        sq += x * x
    rstd = tl.rsqrt(tl.sum(sq, axis=1) / n_cols + eps)
    for c in range(N_CHUNKS):
        x = _load_hinted(x_ptr, row0, n_rows, stride_x, c * CHUNK, n_cols, BLOCK_M, CHUNK, False)
        w = _load_weight(w_ptr, c * CHUNK, n_cols, CHUNK)  # L1-resident after the first tile
        _store_part(y_ptr, x * rstd[:, None] * w[None, :], row0, n_rows, stride_y, c * CHUNK,
                     n_cols, BLOCK_M, CHUNK)


@triton.jit(do_not_specialize=["n_rows"])
def _backward_two_pass_kernel(
    dy_ptr, x_ptr, w_ptr, dx_ptr, dw_partial_ptr,
    n_rows, n_cols, stride_dy, stride_x, stride_dx, eps,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    dw = ()
    for c in tl.static_range(N_CHUNKS):
        dw = dw + (tl.zeros([CHUNK], dtype=tl.float32),)
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_M), programs):
        row0 = tl.cast(tile, tl.int64) * BLOCK_M
        # pass 1: sum(x^2) and sum(dy * w * x) per row, a loop (not unrolled: ptxas would
        # hoist every chunk's loads, the whole row in registers again)
        sq = tl.zeros([BLOCK_M, CHUNK], dtype=tl.float32)
        gx = tl.zeros([BLOCK_M, CHUNK], dtype=tl.float32)
        for c in range(N_CHUNKS):
            x = _load_hinted(x_ptr, row0, n_rows, stride_x, c * CHUNK, n_cols, BLOCK_M, CHUNK, True)
            dy = _load_hinted(dy_ptr, row0, n_rows, stride_dy, c * CHUNK, n_cols, BLOCK_M, CHUNK,
                              True)
            sq += x * x
            gx += dy * _load_weight(w_ptr, c * CHUNK, n_cols, CHUNK)[None, :] * x
        rstd = tl.rsqrt(tl.sum(sq, axis=1) / n_cols + eps)
        coef = tl.sum(gx, axis=1) * rstd / n_cols  # mean(g * xhat)
        # pass 2: dx = rstd * (g - xhat * coef), dw += dy * xhat
        new_dw = ()
        for c in tl.static_range(N_CHUNKS):
            x = _load_hinted(x_ptr, row0, n_rows, stride_x, c * CHUNK, n_cols, BLOCK_M, CHUNK, False)
            dy = _load_hinted(dy_ptr, row0, n_rows, stride_dy, c * CHUNK, n_cols, BLOCK_M, CHUNK,
                              False)
            w = _load_weight(w_ptr, c * CHUNK, n_cols, CHUNK)
            xhat = x * rstd[:, None]
            _store_part(dx_ptr, (dy * w[None, :] - xhat * coef[:, None]) * rstd[:, None], row0,
                         n_rows, stride_dx, c * CHUNK, n_cols, BLOCK_M, CHUNK)
            new_dw = new_dw + (dw[c] + tl.sum(dy * xhat, axis=0),)
        dw = new_dw
    partial = dw_partial_ptr + tl.cast(pid, tl.int64) * n_cols
    for c in tl.static_range(N_CHUNKS):
        cols = c * CHUNK + tl.arange(0, CHUNK)
        tl.store(partial + cols, dw[c], mask=cols < n_cols)
