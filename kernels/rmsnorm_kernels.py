"""The RMSNorm Triton kernels (launched by kernels/rmsnorm.py, which holds the formula).

  * `_forward_kernel`: a [BLOCK_M, BLOCK_N] tile of rows per program (plus a BLOCK_T tail);
  * `_backward_kernel`: a persistent grid; each program loads w once, walks row tiles and
    keeps its own fp32 partial of dw in registers, written once to a [programs, H] buffer;
  * `_forward_chunked_kernel`, `_backward_chunked_kernel`: the same with the row held as
    N_CHUNKS same-shaped [BLOCK_M, CHUNK] tensors (a tuple, unrolled at compile time):
    5120 = 5 x 1024 with no lane masked and no layout conversion between the parts (the
    split block + tail needs one for the row sums); the forward optionally persistent with
    the next tile's load issued before the current tile's math (software prefetch); the
    chunked forward also with the loads' evict_first hint off, y stored streaming (.cs),
    and the row kept packed in 16 bits across the reduction (fewer registers);
  * `_forward_tma_kernel`: persistent, row tiles loaded by TMA into shared memory, several
    tiles ahead (Triton's pipeliner), y stored by TMA;
  * `_dw_reduce_kernel`: sums the partials over programs in a fixed order (deterministic),
    into a fresh dw or added into megatron's main_grad.
"""

import triton
import triton.language as tl

# --------------------------------------------------------------------------- kernels
#
# A row of H columns is held as one [BLOCK_M, BLOCK_N] part, or, when that would leave a
# quarter or more of the lanes masked (H = 5120 in 8192 lanes), as a part of BLOCK_N plus a
# tail of BLOCK_T columns (4096 + 1024): fewer dead registers, more rows in flight per SM.
# BLOCK_T = 0: no tail.


# EVICT_FIRST: the loads' evict_first hint (everywhere up to 2026-12-01, never timed against
# no hint); STORE_CS: the stores streamed (.cs, evict-first), else default (.wb).
@triton.jit
def _load_raw(ptr, row0, n_rows, stride, col0, n_cols,
              BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, EVICT_FIRST: tl.constexpr = True):
    """Columns [col0, col0 + BLOCK) of rows [row0, row0 + BLOCK_M) in ptr's dtype (zeros
    outside)."""
    rows = tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK)
    mask = (rows < n_rows - row0)[:, None] & (cols < n_cols)[None, :]
    if EVICT_FIRST:
        return tl.load(ptr + row0 * stride + rows[:, None] * stride + cols[None, :], mask=mask,
                       other=0.0, eviction_policy="evict_first")
    else:
        return tl.load(ptr + row0 * stride + rows[:, None] * stride + cols[None, :], mask=mask,
                       other=0.0)


@triton.jit
def _load_part(ptr, row0, n_rows, stride, col0, n_cols,
               BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, EVICT_FIRST: tl.constexpr = True):
    """As _load_raw, as fp32."""
    return _load_raw(ptr, row0, n_rows, stride, col0, n_cols, BLOCK_M, BLOCK,
                     EVICT_FIRST).to(tl.float32)


@triton.jit
def _load_tile(ptr, row0, n_rows, stride, col0, n_cols,
               BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, EVICT_FIRST: tl.constexpr,
               RAW: tl.constexpr):
    """_load_raw with RAW, else _load_part."""
    part = _load_raw(ptr, row0, n_rows, stride, col0, n_cols, BLOCK_M, BLOCK, EVICT_FIRST)
    if not RAW:
        part = part.to(tl.float32)
    return part


@triton.jit
def _widen(x):
    """x (loaded, 16-bit) as fp32 a second time. bf16 by a bit shift: a second fpext of the
    same value would be merged with the first by CSE, which then keeps the fp32 copy live
    (twice the registers) from the reduction to the store instead of the packed row."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _store_part(ptr, value, row0, n_rows, stride, col0, n_cols,
                BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, STORE_CS: tl.constexpr = False):
    rows = tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK)
    mask = (rows < n_rows - row0)[:, None] & (cols < n_cols)[None, :]
    if STORE_CS:
        tl.store(ptr + row0 * stride + rows[:, None] * stride + cols[None, :],
                 value.to(ptr.dtype.element_ty), mask=mask, cache_modifier=".cs")
    else:
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
    PREFETCH: tl.constexpr, EVICT_FIRST: tl.constexpr = True,
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
        dy_next = _load_part(dy_ptr, row_next, n_rows, stride_dy, 0, n_cols, BLOCK_M, BLOCK_N,
                             EVICT_FIRST)
        x_next = _load_part(x_ptr, row_next, n_rows, stride_x, 0, n_cols, BLOCK_M, BLOCK_N,
                            EVICT_FIRST)
        if BLOCK_T > 0:
            dyt_next = _load_part(dy_ptr, row_next, n_rows, stride_dy, BLOCK_N, n_cols,
                                  BLOCK_M, BLOCK_T, EVICT_FIRST)
            xt_next = _load_part(x_ptr, row_next, n_rows, stride_x, BLOCK_N, n_cols,
                                 BLOCK_M, BLOCK_T, EVICT_FIRST)
    for tile in range(pid, n_tiles, programs):
        row0 = tl.cast(tile, tl.int64) * BLOCK_M
        if PREFETCH:
            dy, x = dy_next, x_next
            row_next = row0 + programs * BLOCK_M
            dy_next = _load_part(dy_ptr, row_next, n_rows, stride_dy, 0, n_cols, BLOCK_M,
                                 BLOCK_N, EVICT_FIRST)
            x_next = _load_part(x_ptr, row_next, n_rows, stride_x, 0, n_cols, BLOCK_M, BLOCK_N,
                                EVICT_FIRST)
            if BLOCK_T > 0:
                dyt, xt = dyt_next, xt_next
                dyt_next = _load_part(dy_ptr, row_next, n_rows, stride_dy, BLOCK_N, n_cols,
                                      BLOCK_M, BLOCK_T, EVICT_FIRST)
                xt_next = _load_part(x_ptr, row_next, n_rows, stride_x, BLOCK_N, n_cols,
                                     BLOCK_M, BLOCK_T, EVICT_FIRST)
        else:
            dy = _load_part(dy_ptr, row0, n_rows, stride_dy, 0, n_cols, BLOCK_M, BLOCK_N,
                            EVICT_FIRST)
            x = _load_part(x_ptr, row0, n_rows, stride_x, 0, n_cols, BLOCK_M, BLOCK_N,
                           EVICT_FIRST)
            if BLOCK_T > 0:
                dyt = _load_part(dy_ptr, row0, n_rows, stride_dy, BLOCK_N, n_cols, BLOCK_M,
                                 BLOCK_T, EVICT_FIRST)
                xt = _load_part(x_ptr, row0, n_rows, stride_x, BLOCK_N, n_cols, BLOCK_M,
                                BLOCK_T, EVICT_FIRST)
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


# --------------------------------------------------------------------------- chunked rows


@triton.jit
def _load_chunks(ptr, row0, n_rows, stride, n_cols,
                 BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr,
                 EVICT_FIRST: tl.constexpr = True, RAW: tl.constexpr = False):
    """Rows [row0, row0 + BLOCK_M) as a tuple of N_CHUNKS [BLOCK_M, CHUNK] tensors: fp32,
    or with RAW in ptr's dtype."""
    parts = ()
    for c in tl.static_range(N_CHUNKS):
        parts = parts + (_load_tile(ptr, row0, n_rows, stride, c * CHUNK, n_cols, BLOCK_M,
                                    CHUNK, EVICT_FIRST, RAW),)
    return parts


@triton.jit
def _weight_chunks(w_ptr, n_cols, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr):
    parts = ()
    for c in tl.static_range(N_CHUNKS):
        parts = parts + (_load_weight(w_ptr, c * CHUNK, n_cols, CHUNK),)
    return parts


@triton.jit
def _row_rstd(x, n_cols, eps, N_CHUNKS: tl.constexpr):
    """rsqrt(mean(x^2) + eps) per row of the chunk tuple x (any float dtype, summed in fp32)."""
    x0 = x[0].to(tl.float32)
    sq = x0 * x0
    for c in tl.static_range(1, N_CHUNKS):
        xc = x[c].to(tl.float32)
        sq += xc * xc
    return tl.rsqrt(tl.sum(sq, axis=1) / n_cols + eps)


@triton.jit
def _forward_tile(x, w_ptr, y_ptr, row0, n_rows, n_cols, stride_y, eps,
                  BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr,
                  PACKED: tl.constexpr, STORE_CS: tl.constexpr):
    # Chunks summed elementwise first (same layout: free), then one cross-thread reduction
    # (one round through shared memory and its barriers instead of one per chunk).
    # PACKED: x holds the loaded 16-bit values, widened for the sum and again for the store,
    # so only the packed row stays live across the reduction.
    rstd = _row_rstd(x, n_cols, eps, N_CHUNKS)
    for c in tl.static_range(N_CHUNKS):
        w = _load_weight(w_ptr, c * CHUNK, n_cols, CHUNK)  # L1-resident after the first tile
        if PACKED:
            xc = _widen(x[c])
        else:
            xc = x[c]
        _store_part(y_ptr, xc * rstd[:, None] * w[None, :], row0, n_rows, stride_y,
                    c * CHUNK, n_cols, BLOCK_M, CHUNK, STORE_CS)


@triton.jit(do_not_specialize=["n_rows"])
def _forward_chunked_kernel(
    x_ptr, w_ptr, y_ptr,
    n_rows, n_cols, stride_x, stride_y, eps,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr,
    PERSISTENT: tl.constexpr, EVICT_FIRST: tl.constexpr = True,
    PACKED: tl.constexpr = False, STORE_CS: tl.constexpr = False,
):
    # PERSISTENT: program p walks tiles p, p + P, ...; the next tile's loads are issued
    # before this tile's reduction and stores, so they are in flight meanwhile (with PACKED
    # the prefetched tile is carried in its 16-bit form).
    if PERSISTENT:
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        x_next = _load_chunks(x_ptr, tl.cast(pid, tl.int64) * BLOCK_M, n_rows, stride_x,
                              n_cols, BLOCK_M, CHUNK, N_CHUNKS, EVICT_FIRST, PACKED)
        for tile in range(pid, tl.cdiv(n_rows, BLOCK_M), programs):
            row0 = tl.cast(tile, tl.int64) * BLOCK_M
            x = x_next
            x_next = _load_chunks(x_ptr, row0 + programs * BLOCK_M, n_rows, stride_x, n_cols,
                                  BLOCK_M, CHUNK, N_CHUNKS, EVICT_FIRST, PACKED)
            _forward_tile(x, w_ptr, y_ptr, row0, n_rows, n_cols, stride_y, eps,
                          BLOCK_M, CHUNK, N_CHUNKS, PACKED, STORE_CS)
    else:
        row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
        x = _load_chunks(x_ptr, row0, n_rows, stride_x, n_cols, BLOCK_M, CHUNK, N_CHUNKS,
                         EVICT_FIRST, PACKED)
        _forward_tile(x, w_ptr, y_ptr, row0, n_rows, n_cols, stride_y, eps,
                      BLOCK_M, CHUNK, N_CHUNKS, PACKED, STORE_CS)


@triton.jit
def _weight_chunk(w_ptr, w, c: tl.constexpr, n_cols, CHUNK: tl.constexpr,
                  W_IN_REGS: tl.constexpr):
    if W_IN_REGS:
        return w[c]
    else:
        return _load_weight(w_ptr, c * CHUNK, n_cols, CHUNK)


@triton.jit(do_not_specialize=["n_rows"])
def _backward_chunked_kernel(
    dy_ptr, x_ptr, w_ptr, dx_ptr, dw_partial_ptr,
    n_rows, n_cols, stride_dy, stride_x, stride_dx, eps,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr,
    PREFETCH: tl.constexpr, W_IN_REGS: tl.constexpr, EVICT_FIRST: tl.constexpr = True,
):
    # As _backward_kernel: persistent, dw partial per program in registers, optionally the
    # next tile prefetched; W_IN_REGS keeps w in registers across tiles (else each tile
    # reloads it from L1: fewer registers, more programs or rows in flight). The prefetched
    # tile needs no 16-bit form here: ptxas already keeps it packed until it is used
    # (offline sm_90 compile, Triton 3.6: the same registers either way).
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    w = _weight_chunks(w_ptr, n_cols, CHUNK, N_CHUNKS)
    dw = ()
    for c in tl.static_range(N_CHUNKS):
        dw = dw + (tl.zeros([CHUNK], dtype=tl.float32),)
    if PREFETCH:
        row_next = tl.cast(pid, tl.int64) * BLOCK_M
        dy_next = _load_chunks(dy_ptr, row_next, n_rows, stride_dy, n_cols, BLOCK_M, CHUNK,
                               N_CHUNKS, EVICT_FIRST)
        x_next = _load_chunks(x_ptr, row_next, n_rows, stride_x, n_cols, BLOCK_M, CHUNK,
                              N_CHUNKS, EVICT_FIRST)
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_M), programs):
        row0 = tl.cast(tile, tl.int64) * BLOCK_M
        if PREFETCH:
            dy, x = dy_next, x_next
            row_next = row0 + programs * BLOCK_M
            dy_next = _load_chunks(dy_ptr, row_next, n_rows, stride_dy, n_cols, BLOCK_M, CHUNK,
                                   N_CHUNKS, EVICT_FIRST)
            x_next = _load_chunks(x_ptr, row_next, n_rows, stride_x, n_cols, BLOCK_M, CHUNK,
                                  N_CHUNKS, EVICT_FIRST)
        else:
            dy = _load_chunks(dy_ptr, row0, n_rows, stride_dy, n_cols, BLOCK_M, CHUNK, N_CHUNKS,
                              EVICT_FIRST)
            x = _load_chunks(x_ptr, row0, n_rows, stride_x, n_cols, BLOCK_M, CHUNK, N_CHUNKS,
                             EVICT_FIRST)
        # Chunks summed elementwise, then one reduction each (as in _forward_tile).
        sq = x[0] * x[0]
        gx = dy[0] * _weight_chunk(w_ptr, w, 0, n_cols, CHUNK, W_IN_REGS)[None, :] * x[0]
        for c in tl.static_range(1, N_CHUNKS):
            sq += x[c] * x[c]
            gx += dy[c] * _weight_chunk(w_ptr, w, c, n_cols, CHUNK, W_IN_REGS)[None, :] * x[c]
        rstd = tl.rsqrt(tl.sum(sq, axis=1) / n_cols + eps)
        coef = tl.sum(gx, axis=1) * rstd / n_cols  # mean(g * xhat)
        new_dw = ()
        for c in tl.static_range(N_CHUNKS):
            wc = _weight_chunk(w_ptr, w, c, n_cols, CHUNK, W_IN_REGS)
            xhat = x[c] * rstd[:, None]
            _store_part(dx_ptr, (dy[c] * wc[None, :] - xhat * coef[:, None]) * rstd[:, None],
                        row0, n_rows, stride_dx, c * CHUNK, n_cols, BLOCK_M, CHUNK)
            new_dw = new_dw + (dw[c] + tl.sum(dy[c] * xhat, axis=0),)
        dw = new_dw
    partial = dw_partial_ptr + tl.cast(pid, tl.int64) * n_cols
    for c in tl.static_range(N_CHUNKS):
        cols = c * CHUNK + tl.arange(0, CHUNK)
        tl.store(partial + cols, dw[c], mask=cols < n_cols)


# --------------------------------------------------------------------------- TMA forward


@triton.jit(do_not_specialize=["n_rows"])
def _forward_tma_kernel(
    x_ptr, w_ptr, y_ptr,
    n_rows, n_cols, stride_x, stride_y, eps,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr,
    STAGES: tl.constexpr,
):
    # Persistent: program p walks tiles p, p + P, ... Row tiles arrive by TMA (tensor
    # descriptor loads into shared memory, zero-filled past the last row and column) that
    # Triton's pipeliner issues STAGES - 1 tiles ahead, so the bytes in flight are bounded
    # by shared memory rather than by registers (the chunked kernels' limit); y leaves by
    # TMA stores (clipped at the edges). Needs 16-byte aligned rows (the launcher checks).
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[n_rows, n_cols], strides=[stride_x, 1],
                                       block_shape=[BLOCK_M, CHUNK])
    y_desc = tl.make_tensor_descriptor(y_ptr, shape=[n_rows, n_cols], strides=[stride_y, 1],
                                       block_shape=[BLOCK_M, CHUNK])
    for tile in tl.range(pid, tl.cdiv(n_rows, BLOCK_M), programs, num_stages=STAGES):
        row0 = tile * BLOCK_M
        x = ()
        for c in tl.static_range(N_CHUNKS):
            x = x + (x_desc.load([row0, c * CHUNK]),)
        rstd = _row_rstd(x, n_cols, eps, N_CHUNKS)
        for c in tl.static_range(N_CHUNKS):
            w = _load_weight(w_ptr, c * CHUNK, n_cols, CHUNK)
            y = x[c].to(tl.float32) * rstd[:, None] * w[None, :]
            y_desc.store([row0, c * CHUNK], y.to(y_ptr.dtype.element_ty))
