"""Forward pass of the fused attention kernel (FlashAttention-2 style).

For one (batch, query head) and one block of BLOCK_M query rows, a program
streams the key/value rows in blocks of BLOCK_N and keeps a running softmax
(online softmax, base 2):

    S_j = (Q K_j^T) * scale * log2(e)          [BLOCK_M, BLOCK_N], never stored
    m   = max(m, rowmax(S_j));  P_j = exp2(S_j - m)
    l   = l * exp2(m_old - m) + rowsum(P_j);  acc = acc * exp2(m_old - m) + P_j V_j
    O   = acc / l,   LSE = (m + log2 l) * ln 2   (natural log, kept for backward)

Causal: key blocks entirely left of the diagonal run without any mask; only the
blocks that straddle the diagonal pay for it. Rows past the sequence end are
zero-filled on load and never stored.

Tensors are [b, s, h, d] with any strides (d must be the unit stride for the
tensor-descriptor path). Key/value head `h // group` serves query head `h`.
Reference: Dao, "FlashAttention-2" (2023), Algorithm 1; Triton's fused-attention tutorial.

Variants (config flags, off by default except where kernels/attention.py's tables say):
PIPELINE defers each unmasked block's P V by one iteration so the next block's softmax runs
while that wgmma is in flight (FA3's intra-warpgroup overlap, Shah et al. 2024, sec. 3.2);
SUBTILE splits the query tile into two halves whose softmax and P V alternate.
"""

from __future__ import annotations

import triton
import triton.language as tl

# log2(e), for host-side scale folding. Inside the kernels the constants are literals
# (0.6931471805599453 = ln 2, 1.4426950408889634 = log2 e): Triton 3.6 refuses globals read
# from @triton.jit code unless TRITON_ALLOW_NON_CONSTEXPR_GLOBALS=1.
LOG2E_HOST = 1.4426950408889634


@triton.jit
def _rows_source(base, seqlen, stride_s, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                 USE_TMA: tl.constexpr):
    """A TMA tensor descriptor over one head's [seqlen, HEAD_DIM] rows, or the plain pointer."""
    if USE_TMA:
        src = tl.make_tensor_descriptor(base, shape=[seqlen, HEAD_DIM], strides=[stride_s, 1],
                                        block_shape=[BLOCK, HEAD_DIM])
    else:
        src = base
    return src


@triton.jit
def _load_rows(src, row0, seqlen, stride_s, stride_d, BLOCK: tl.constexpr,
               HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr, EVEN: tl.constexpr):
    """Rows [row0, row0 + BLOCK) of one head, [BLOCK, HEAD_DIM]; rows >= seqlen read as 0."""
    if USE_TMA:
        tile = src.load([row0, 0])  # the descriptor zero-fills out-of-bounds rows
    else:
        rows = row0 + tl.arange(0, BLOCK)
        ptrs = src + rows[:, None] * stride_s + tl.arange(0, HEAD_DIM)[None, :] * stride_d
        if EVEN:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=rows[:, None] < seqlen, other=0.0)
    return tile


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    """tl.dot with fp32 accumulation. DOT_F32 upcasts the operands first: only for the
    CPU interpreter, whose dot (Triton 3.9) multiplies bf16 bit patterns as integers.
    The operands are already rounded to their storage dtype, so numerics are unchanged."""
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc)


@triton.jit
def _softmax_update(l_i, m_i, qk, offs_m, start_n, seqlen, qk_scale2,
                    BLOCK_N: tl.constexpr, MASK_CAUSAL: tl.constexpr, MASK_TAIL: tl.constexpr,
                    NO_SOFTMAX: tl.constexpr):
    """One key block's online-softmax step on its raw scores qk: (P, alpha, l, m). The caller
    rescales acc by alpha = exp2(m_old - m) and adds P V into it."""
    if NO_SOFTMAX:
        # Diagnostic only (benchmarks/tune_attention.py): the loads and both matmuls
        # without the online softmax between them; the output is not attention.
        p = qk
        l_i += 1.0
        m_new = tl.maximum(m_i, 0.0)
        alpha = tl.full(m_i.shape, 1.0, tl.float32)
    else:
        if MASK_CAUSAL or MASK_TAIL:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            if MASK_CAUSAL:
                keep = offs_m[:, None] >= offs_n[None, :]
            else:
                keep = offs_n[None, :] < seqlen
            # Every row keeps at least one column in its first block, so m stays finite.
            qk = tl.where(keep, qk * qk_scale2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_new[:, None]
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale2)
            qk = qk * qk_scale2 - m_new[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, l_i, m_new


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_src, v_src, offs_m, lo, hi, seqlen,
               stride_ks, stride_kd, stride_vs, stride_vd, qk_scale2,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK_CAUSAL: tl.constexpr,
               MASK_TAIL: tl.constexpr, EVEN: tl.constexpr, USE_TMA: tl.constexpr,
               WARP_SPEC: tl.constexpr, DOT_F32: tl.constexpr, NO_SOFTMAX: tl.constexpr):
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _load_rows(k_src, start_n, seqlen, stride_ks, stride_kd, BLOCK_N, HEAD_DIM,
                       USE_TMA, EVEN)
        qk = _dot(q, tl.trans(k), None, DOT_F32)
        p, alpha, l_i, m_i = _softmax_update(l_i, m_i, qk, offs_m, start_n, seqlen, qk_scale2,
                                             BLOCK_N, MASK_CAUSAL, MASK_TAIL, NO_SOFTMAX)
        acc = acc * alpha[:, None]
        v = _load_rows(v_src, start_n, seqlen, stride_vs, stride_vd, BLOCK_N, HEAD_DIM,
                       USE_TMA, EVEN)
        acc = _dot(p.to(v.dtype), v, acc, DOT_F32)
    return acc, l_i, m_i


@triton.jit
def _fwd_inner_pipelined(acc, l_i, m_i, q, k_src, v_src, offs_m, lo, hi, seqlen,
                         stride_ks, stride_kd, stride_vs, stride_vd, qk_scale2,
                         BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                         USE_TMA: tl.constexpr, DOT_F32: tl.constexpr,
                         NO_SOFTMAX: tl.constexpr):
    """The unmasked key blocks [lo, hi) (whole blocks inside the sequence), pipelined by hand
    as FA3's intra-warpgroup overlap (Shah et al. 2024, sec. 3.2, Algorithm 2): iteration j
    issues S_j = Q K_j^T, then block j-1's O += P_{j-1} V_{j-1}, then block j's softmax, so
    the exp2/max/sum run while that P V wgmma is in flight. The loop carries P_{j-1} and its
    rescale factor. Why not carry S_{j+1} instead: Triton (3.6-3.9) waits on a wgmma right
    after issuing it unless its only in-loop consumers are other dots' accumulators or come
    after a wait-0 (WGMMAPipeline.cpp, dotCanBeProperlyAsync); a carried S fails that, the
    P V accumulator here passes (its rescale follows the S_j dot's wait)."""
    # No `if lo < hi` around this: an scf.if joining the accumulator makes ptxas serialize
    # every wgmma of the kernel (C7515, seen with Triton 3.6's ptxas). An empty segment instead
    # runs the prologue on block lo (masked loads, in bounds or zero-filled) with P zeroed
    # and l, m kept, and the epilogue then adds that zero P.
    has = lo < hi
    k = _load_rows(k_src, lo, seqlen, stride_ks, stride_kd, BLOCK_N, HEAD_DIM, USE_TMA, False)
    qk = _dot(q, tl.trans(k), None, DOT_F32)
    p, alpha, l_new, m_new = _softmax_update(l_i, m_i, qk, offs_m, lo, seqlen, qk_scale2,
                                             BLOCK_N, False, False, NO_SOFTMAX)
    p = tl.where(has, p, 0.0)
    alpha = tl.where(has, alpha, 1.0)
    l_i = tl.where(has, l_new, l_i)
    m_i = tl.where(has, m_new, m_i)
    for start_n in tl.range(lo + BLOCK_N, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _load_rows(k_src, start_n, seqlen, stride_ks, stride_kd, BLOCK_N, HEAD_DIM,
                       USE_TMA, True)
        qk = _dot(q, tl.trans(k), None, DOT_F32)
        acc = acc * alpha[:, None]
        v = _load_rows(v_src, start_n - BLOCK_N, seqlen, stride_vs, stride_vd, BLOCK_N,
                       HEAD_DIM, USE_TMA, True)
        acc = _dot(p.to(v.dtype), v, acc, DOT_F32)
        # Block j's softmax, under block j-1's P V; its rescale of acc waits for the next
        # iteration (or the epilogue), after that P V has landed.
        p, alpha, l_i, m_i = _softmax_update(l_i, m_i, qk, offs_m, start_n, seqlen,
                                             qk_scale2, BLOCK_N, False, False, NO_SOFTMAX)
    acc = acc * alpha[:, None]
    v = _load_rows(v_src, tl.maximum(hi - BLOCK_N, lo), seqlen, stride_vs, stride_vd, BLOCK_N,
                   HEAD_DIM, USE_TMA, False)
    acc = _dot(p.to(v.dtype), v, acc, DOT_F32)
    return acc, l_i, m_i


@triton.jit
def _fwd_inner_subtiled(acc0, l0, m0, acc1, l1, m1, q0, q1, k_src, v_src, offs_m0, offs_m1,
                        lo, hi, seqlen, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale2,
                        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                        MASK_CAUSAL: tl.constexpr, MASK_TAIL: tl.constexpr, EVEN: tl.constexpr,
                        USE_TMA: tl.constexpr, DOT_F32: tl.constexpr, NO_SOFTMAX: tl.constexpr):
    """Two query half-tiles against each key block, alternately: half 1's S = Q1 K^T is
    issued before half 0's softmax and half 0's P V before half 1's, so one half's softmax
    runs under the other half's matmul (the ping-pong of FA3 inside one program)."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _load_rows(k_src, start_n, seqlen, stride_ks, stride_kd, BLOCK_N, HEAD_DIM,
                       USE_TMA, EVEN)
        qk0 = _dot(q0, tl.trans(k), None, DOT_F32)
        qk1 = _dot(q1, tl.trans(k), None, DOT_F32)
        v = _load_rows(v_src, start_n, seqlen, stride_vs, stride_vd, BLOCK_N, HEAD_DIM,
                       USE_TMA, EVEN)
        p0, alpha0, l0, m0 = _softmax_update(l0, m0, qk0, offs_m0, start_n, seqlen, qk_scale2,
                                             BLOCK_N, MASK_CAUSAL, MASK_TAIL, NO_SOFTMAX)
        acc0 = _dot(p0.to(v.dtype), v, acc0 * alpha0[:, None], DOT_F32)
        p1, alpha1, l1, m1 = _softmax_update(l1, m1, qk1, offs_m1, start_n, seqlen, qk_scale2,
                                             BLOCK_N, MASK_CAUSAL, MASK_TAIL, NO_SOFTMAX)
        acc1 = _dot(p1.to(v.dtype), v, acc1 * alpha1[:, None], DOT_F32)
    return acc0, l0, m0, acc1, l1, m1


@triton.jit
def _store_rows(o_base, lse_base, acc, l_i, m_i, offs_m, seqlen, stride_os, stride_od,
                HEAD_DIM: tl.constexpr, EVEN: tl.constexpr):
    """O = acc / l and the natural-log LSE for the query rows offs_m (rows >= seqlen dropped)."""
    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # natural log: log2 * ln 2
    o_ptrs = o_base + offs_m[:, None] * stride_os + tl.arange(0, HEAD_DIM)[None, :] * stride_od
    if EVEN:
        tl.store(o_ptrs, acc.to(o_base.dtype.element_ty))
        tl.store(lse_base + offs_m, lse)
    else:
        tl.store(o_ptrs, acc.to(o_base.dtype.element_ty), mask=offs_m[:, None] < seqlen)
        tl.store(lse_base + offs_m, lse, mask=offs_m < seqlen)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qs, stride_qh, stride_qd,
                stride_kb, stride_ks, stride_kh, stride_kd,
                stride_vb, stride_vs, stride_vh, stride_vd,
                stride_ob, stride_os, stride_oh, stride_od,
                seqlen, num_heads, group, qk_scale2,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, EVEN: tl.constexpr, USE_TMA: tl.constexpr,
                WARP_SPEC: tl.constexpr, DOT_F32: tl.constexpr, NO_SOFTMAX: tl.constexpr,
                PIPELINE: tl.constexpr, SUBTILE: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    bh = tl.program_id(0)
    # Last query blocks first: under the causal mask they carry the most work.
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    hk = (h // group).to(tl.int64)
    h = h.to(tl.int64)

    q_base = Q + b * stride_qb + h * stride_qh
    o_base = O + b * stride_ob + h * stride_oh
    lse_base = LSE + bh.to(tl.int64) * seqlen
    k_src = _rows_source(K + b * stride_kb + hk * stride_kh, seqlen, stride_ks, BLOCK_N,
                         HEAD_DIM, USE_TMA)
    v_src = _rows_source(V + b * stride_vb + hk * stride_vh, seqlen, stride_vs, BLOCK_N,
                         HEAD_DIM, USE_TMA)
    # Causal: blocks left of the diagonal [0, start_m) need no mask and lie inside the
    # sequence; the diagonal ones [start_m, diag_end) are masked. Non-causal: whole blocks
    # [0, full), then the tail [full, seqlen) masked by length.
    full = (seqlen // BLOCK_N) * BLOCK_N
    diag_end = tl.minimum(start_m + BLOCK_M, seqlen)
    if SUBTILE:
        q_src = _rows_source(q_base, seqlen, stride_qs, BLOCK_M // 2, HEAD_DIM, USE_TMA)
        q0 = _load_rows(q_src, start_m, seqlen, stride_qs, stride_qd, BLOCK_M // 2, HEAD_DIM,
                        USE_TMA, EVEN)
        q1 = _load_rows(q_src, start_m + BLOCK_M // 2, seqlen, stride_qs, stride_qd,
                        BLOCK_M // 2, HEAD_DIM, USE_TMA, EVEN)
        offs_m0 = start_m + tl.arange(0, BLOCK_M // 2)
        offs_m1 = offs_m0 + BLOCK_M // 2
        m0 = tl.full([BLOCK_M // 2], float("-inf"), tl.float32)
        l0 = tl.zeros([BLOCK_M // 2], tl.float32)
        acc0 = tl.zeros([BLOCK_M // 2, HEAD_DIM], tl.float32)
        m1, l1, acc1 = m0, l0, acc0
        unmasked_end = start_m if CAUSAL else full
        acc0, l0, m0, acc1, l1, m1 = _fwd_inner_subtiled(
            acc0, l0, m0, acc1, l1, m1, q0, q1, k_src, v_src, offs_m0, offs_m1, 0,
            unmasked_end, seqlen, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale2,
            BLOCK_N, HEAD_DIM, False, False, True, USE_TMA, DOT_F32, NO_SOFTMAX)
        if CAUSAL or not EVEN:
            acc0, l0, m0, acc1, l1, m1 = _fwd_inner_subtiled(
                acc0, l0, m0, acc1, l1, m1, q0, q1, k_src, v_src, offs_m0, offs_m1,
                unmasked_end, diag_end if CAUSAL else seqlen, seqlen, stride_ks, stride_kd,
                stride_vs, stride_vd, qk_scale2, BLOCK_N, HEAD_DIM, CAUSAL, not CAUSAL, EVEN,
                USE_TMA, DOT_F32, NO_SOFTMAX)
        _store_rows(o_base, lse_base, acc0, l0, m0, offs_m0, seqlen, stride_os, stride_od,
                    HEAD_DIM, EVEN)
        _store_rows(o_base, lse_base, acc1, l1, m1, offs_m1, seqlen, stride_os, stride_od,
                    HEAD_DIM, EVEN)
    else:
        q_src = _rows_source(q_base, seqlen, stride_qs, BLOCK_M, HEAD_DIM, USE_TMA)
        q = _load_rows(q_src, start_m, seqlen, stride_qs, stride_qd, BLOCK_M, HEAD_DIM,
                       USE_TMA, EVEN)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        unmasked_end = start_m if CAUSAL else full
        if PIPELINE:
            acc, l_i, m_i = _fwd_inner_pipelined(
                acc, l_i, m_i, q, k_src, v_src, offs_m, 0, unmasked_end, seqlen, stride_ks,
                stride_kd, stride_vs, stride_vd, qk_scale2, BLOCK_N, HEAD_DIM, USE_TMA,
                DOT_F32, NO_SOFTMAX)
        else:
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_src, v_src, offs_m, 0, unmasked_end, seqlen, stride_ks,
                stride_kd, stride_vs, stride_vd, qk_scale2, BLOCK_N, HEAD_DIM, False, False,
                True, USE_TMA, WARP_SPEC, DOT_F32, NO_SOFTMAX)
        if CAUSAL or not EVEN:
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_src, v_src, offs_m, unmasked_end,
                diag_end if CAUSAL else seqlen, seqlen, stride_ks, stride_kd, stride_vs,
                stride_vd, qk_scale2, BLOCK_N, HEAD_DIM, CAUSAL, not CAUSAL, EVEN, USE_TMA,
                WARP_SPEC, DOT_F32, NO_SOFTMAX)
        _store_rows(o_base, lse_base, acc, l_i, m_i, offs_m, seqlen, stride_os, stride_od,
                    HEAD_DIM, EVEN)


def tma_aligned(t) -> bool:
    """TMA's layout rule for one tensor: unit last stride, 16-byte aligned base and strides."""
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((stride * size) % 16 == 0 for stride in t.stride()[:-1]))


def dot_f32(q) -> bool:
    """Upcast dot operands: bf16 under the CPU interpreter only (see `_dot`)."""
    return q.device.type != "cuda" and q.dtype.is_floating_point and q.element_size() == 2


def launch_forward(q, k, v, o, lse, *, causal, softmax_scale, config, use_tma):
    """Run the forward kernel: fills o [b, s, hq, d] (any strides) and lse [b, hq, s] fp32."""
    batch, seqlen, num_heads, head_dim = q.shape
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    if config.get("PIPELINE") and config.get("SUBTILE"):
        raise ValueError("PIPELINE and SUBTILE are separate forward variants: pick one")
    grid = (batch * num_heads, triton.cdiv(seqlen, block_m))
    _fwd_kernel[grid](
        q, k, v, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        seqlen, num_heads, num_heads // k.shape[2], softmax_scale * LOG2E_HOST,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
        EVEN=seqlen % block_m == 0, USE_TMA=use_tma, WARP_SPEC=config.get("WARP_SPEC", False),
        DOT_F32=dot_f32(q), NO_SOFTMAX=config.get("NO_SOFTMAX", False),
        PIPELINE=config.get("PIPELINE", False), SUBTILE=config.get("SUBTILE", False),
        num_warps=config["num_warps"], num_stages=config["num_stages"], **launch_extras(config),
    )


def launch_extras(config) -> dict:
    """Optional launch options a config may name: maxnreg caps registers per thread."""
    return {"maxnreg": config["maxnreg"]} if config.get("maxnreg") else {}
