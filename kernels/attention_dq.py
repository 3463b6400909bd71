"""The dQ kernel of the deterministic backward's dK/dV + dQ pair (kernels/attention_bwd.py).

    dQ_i = scale * sum_j dS_ij K_j,   dS_ij = P_ij * (dO_i V_j^T - delta_i)

one program per (query block, query head), looping over key blocks in order: it recomputes
S = Q K^T and dO V^T that the dK/dV kernel also forms (3 of the pair's 7 block matmuls).
DEFER issues each unmasked block's dQ += dS K one iteration late (attention_bwd.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.attention_fwd import (
    LOG2E_HOST,
    _dot,
    _load_rows,
    _rows_source,
    dot_f32,
    launch_extras,
)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_src, v_src, offs_m, lo, hi, seqlen,
              stride_ks, stride_kd, stride_vs, stride_vd, qk_scale2,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr,
              EVEN: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
              DOT_F32: tl.constexpr):
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _load_rows(k_src, start_n, seqlen, stride_ks, stride_kd, BLOCK_N, HEAD_DIM,
                       USE_TMA, EVEN)
        v = _load_rows(v_src, start_n, seqlen, stride_vs, stride_vd, BLOCK_N, HEAD_DIM,
                       USE_TMA, EVEN)
        qk = _dot(q, tl.trans(k), None, DOT_F32)
        p = tl.math.exp2(qk * qk_scale2 - lse2[:, None])
        if MASK:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), None, DOT_F32)
        # Key rows past the end are zero, so they add nothing to dQ even unmasked.
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, DOT_F32)
    return dq


@triton.jit
def _dq_inner_deferred(dq, q, do, lse2, delta, k_src, v_src, lo, hi, seqlen,
                       stride_ks, stride_kd, stride_vs, stride_vd, qk_scale2,
                       BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN: tl.constexpr,
                       USE_TMA: tl.constexpr, DOT_F32: tl.constexpr):
    """The unmasked key blocks [lo, hi) with each block's dQ += dS K deferred to the next
    iteration, issued after that block's S dot, so the wgmma runs under the exp2 of P (see
    _dkdv_inner_deferred). The first pass adds a zero dS."""
    if lo < hi:
        ds = tl.zeros([q.shape[0], BLOCK_N], tl.float32)
        for start_n in tl.range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            k = _load_rows(k_src, start_n, seqlen, stride_ks, stride_kd, BLOCK_N, HEAD_DIM,
                           USE_TMA, EVEN)
            qk = _dot(q, tl.trans(k), None, DOT_F32)
            k_prev = _load_rows(k_src, tl.maximum(start_n - BLOCK_N, lo), seqlen, stride_ks,
                                stride_kd, BLOCK_N, HEAD_DIM, USE_TMA, EVEN)
            dq = _dot(ds.to(k.dtype), k_prev, dq, DOT_F32)
            v = _load_rows(v_src, start_n, seqlen, stride_vs, stride_vd, BLOCK_N, HEAD_DIM,
                           USE_TMA, EVEN)
            p = tl.math.exp2(qk * qk_scale2 - lse2[:, None])
            dp = _dot(do, tl.trans(v), None, DOT_F32)
            ds = p * (dp - delta[:, None])
        last = lo + (tl.cdiv(hi - lo, BLOCK_N) - 1) * BLOCK_N
        k = _load_rows(k_src, last, seqlen, stride_ks, stride_kd, BLOCK_N, HEAD_DIM, USE_TMA,
                       EVEN)
        dq = _dot(ds.to(k.dtype), k, dq, DOT_F32)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
               stride_qb, stride_qs, stride_qh, stride_qd,
               stride_kb, stride_ks, stride_kh, stride_kd,
               stride_vb, stride_vs, stride_vh, stride_vd,
               stride_gb, stride_gs, stride_gh, stride_gd,
               stride_dqb, stride_dqs, stride_dqh, stride_dqd,
               seqlen, num_heads, group, softmax_scale, qk_scale2,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, EVEN: tl.constexpr, USE_TMA: tl.constexpr,
               WARP_SPEC: tl.constexpr, DOT_F32: tl.constexpr, DEFER: tl.constexpr):
    # DEFER: the unmasked key blocks through _dq_inner_deferred.
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    bh = tl.program_id(0)
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    hk = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)

    q_src = _rows_source(Q + b * stride_qb + h * stride_qh, seqlen, stride_qs, BLOCK_M,
                         HEAD_DIM, USE_TMA)
    do_src = _rows_source(DO + b * stride_gb + h * stride_gh, seqlen, stride_gs, BLOCK_M,
                          HEAD_DIM, USE_TMA)
    k_src = _rows_source(K + b * stride_kb + hk * stride_kh, seqlen, stride_ks, BLOCK_N,
                         HEAD_DIM, USE_TMA)
    v_src = _rows_source(V + b * stride_vb + hk * stride_vh, seqlen, stride_vs, BLOCK_N,
                         HEAD_DIM, USE_TMA)
    q = _load_rows(q_src, start_m, seqlen, stride_qs, stride_qd, BLOCK_M, HEAD_DIM, USE_TMA,
                   EVEN)
    do = _load_rows(do_src, start_m, seqlen, stride_gs, stride_gd, BLOCK_M, HEAD_DIM, USE_TMA,
                    EVEN)
    row = bh.to(tl.int64) * seqlen
    if EVEN:
        lse2 = tl.load(LSE + row + offs_m) * 1.4426950408889634  # log2 e
        delta = tl.load(DELTA + row + offs_m)
    else:
        lse2 = tl.load(LSE + row + offs_m, mask=offs_m < seqlen, other=float("inf"))
        lse2 = lse2 * 1.4426950408889634  # log2 e
        delta = tl.load(DELTA + row + offs_m, mask=offs_m < seqlen, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    if CAUSAL:
        diag_end = tl.minimum(start_m + BLOCK_M, seqlen)
        dq = _dq_inner(dq, q, do, lse2, delta, k_src, v_src, offs_m, start_m, diag_end, seqlen,
                       stride_ks, stride_kd, stride_vs, stride_vd, qk_scale2, BLOCK_N,
                       HEAD_DIM, True, EVEN, USE_TMA, WARP_SPEC, DOT_F32)
        unmasked_end = start_m
        unmasked_even = True
    else:
        unmasked_end = seqlen
        unmasked_even = EVEN
    if DEFER:
        dq = _dq_inner_deferred(dq, q, do, lse2, delta, k_src, v_src, 0, unmasked_end, seqlen,
                                stride_ks, stride_kd, stride_vs, stride_vd, qk_scale2, BLOCK_N,
                                HEAD_DIM, unmasked_even, USE_TMA, DOT_F32)
    else:
        dq = _dq_inner(dq, q, do, lse2, delta, k_src, v_src, offs_m, 0, unmasked_end, seqlen,
                       stride_ks, stride_kd, stride_vs, stride_vd, qk_scale2, BLOCK_N,
                       HEAD_DIM, False, unmasked_even, USE_TMA, WARP_SPEC, DOT_F32)

    dq = dq * softmax_scale
    dq_ptrs = (DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs
               + tl.arange(0, HEAD_DIM)[None, :] * stride_dqd)
    if EVEN:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty))
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=offs_m[:, None] < seqlen)


def launch_dq(q, k, v, do, lse, delta, dq, *, causal, softmax_scale, config, use_tma):
    """dq [b, s, hq, d]: one program per (query block, batch, query head)."""
    batch, seqlen, num_heads, head_dim = q.shape
    _dq_kernel[(batch * num_heads, triton.cdiv(seqlen, config["BLOCK_M"]))](
        q, k, v, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        seqlen, num_heads, num_heads // k.shape[2], softmax_scale, softmax_scale * LOG2E_HOST,
        HEAD_DIM=head_dim, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
        CAUSAL=causal, EVEN=seqlen % config["BLOCK_M"] == 0, USE_TMA=use_tma,
        WARP_SPEC=config.get("WARP_SPEC", False), DOT_F32=dot_f32(q),
        DEFER=config.get("DEFER", False),
        num_warps=config["num_warps"], num_stages=config["num_stages"], **launch_extras(config),
    )
