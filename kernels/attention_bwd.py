"""Backward pass of the fused attention kernel, deterministic (no atomics).

With P = softmax(S), S = scale * Q K^T, and the forward's LSE (so P = exp(S - LSE)
is recomputed block by block, never stored):

    delta_i = rowsum(dO_i * O_i)                       (_delta_kernel)
    dV_j = sum_i P_ij^T dO_i
    dS_ij = P_ij * (dO_i V_j^T - delta_i)
    dK_j = scale * sum_i dS_ij^T Q_i                   (_dkdv_kernel: one key block,
                                                        loops over query blocks and over
                                                        the query heads of its KV group)
    dQ_i = scale * sum_j dS_ij K_j                     (attention_dq.py: one query
                                                        block, loops over key blocks)

Each output block is owned by exactly one program and summed in a fixed order,
so results are bitwise reproducible run to run. The price is recomputing
Q K^T and dO V^T in both kernels: 7 block matmuls instead of 5.

The dK/dV kernel can take over dQ's share of that work (DQ_MODE), leaving 5 block matmuls:
- DQ_STASH (deterministic): it stores each block's dS^T, in the input dtype (the very values
  its dK matmul takes), into a [heads, s, s] scratch, and kernels/attention_dq_ds.py forms
  dQ_i = scale * sum_j dS_ij K_j from it, one query block per program, summed in a fixed
  order. The price: dS written and read once, 2 bytes per score of the causal triangle.
- DQ_ATOMIC / DQ_TMA (deterministic=False): it forms dQ_i += dS_ij K_j itself and adds it
  into an fp32 [b, s, hq, d] buffer, element by element with atomics (FlashAttention-2,
  Algorithm 2) or the whole tile with one bulk tensor reduce-add (TMA, sm_90+, as
  FlashAttention-3); the order of those additions varies run to run, hence dQ's last bits.

Measured on the H200 (benchmarks/tune_attention.py; TFLOP/s at 8x16x2048 / 4x32/8x4096,
d=128, each kernel at its share of the backward's FLOPs):
- the pair: dK/dV 291/326 (238 registers, no spills), dQ 412/502;
- DQ_STASH: dK/dV storing dS 228/290 (the store is a tensor-descriptor store Triton waits
  on every iteration; a pointer store spills), dQ = dS K 642/984: a 13% lower total at
  4096, 1.5% higher at 2048; at d=64 dS costs twice the bytes per FLOP and the storing
  kernel loses (153 against 209), so d=64 keeps the pair. Chunking the heads to fit the
  scratch: 4 chunks (the 1 GiB default) ran 3.14 / 3.49 ms against one chunk's 3.37 at
  2x16x8192 / 4x32/8x4096; 16 chunks (256 MiB: grids of 128 programs) 5.33 / 7.76
  (attention_launch_h200_2026-12-02.json);
- 5 matmuls in one kernel (DQ_TMA, whole backward counted) at most 251/331, DQ_ATOMIC
  247/282: the fifth matmul's accumulator and the transposed dS take the registers (255,
  with spills), about half the pair's achieved tensor throughput (dK/dV's 4 matmuls run
  at 466/522 actual TFLOP/s);
- tried and removed: a deterministic dQ summed in a fixed key-block order inside the
  dK/dV kernel (per-query-block counters, acquire/release; 109-141): each iteration then
  waits out an L2 round trip for the counter and one for the partial sum, unhidden.
  attention_tune_h200_2026-12-02_dq_in_dkdv.json and _stash.json.

DEFER (a config flag of either kernel, deterministic path only) issues each unmasked block's
dK += dS^T Q (or dQ += dS K) one iteration late, after the next block's S dot, so that wgmma
runs under the next exp2; the previous block's Q (or K) tile is loaded again for it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from core.choices import ds_stash_stride
from kernels.attention_fwd import (
    LOG2E_HOST,
    _dot,
    _load_rows,
    _rows_source,
    dot_f32,
    launch_extras,
)


@triton.jit
def _delta_kernel(O, DO, DELTA,
                  stride_ob, stride_os, stride_oh, stride_od,
                  stride_gb, stride_gs, stride_gh, stride_gd,
                  seqlen, num_heads,
                  HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM)
    mask = rows[:, None] < seqlen
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_os
                + cols[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + b * stride_gb + h * stride_gh + rows[:, None] * stride_gs
                 + cols[None, :] * stride_gd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * seqlen + rows, delta, mask=rows < seqlen)


# How the dK/dV kernel takes part in dQ (DQ_MODE); DQ_NONE: not at all (the dQ kernel does).
DQ_NONE, DQ_ATOMIC, DQ_TMA, DQ_STASH = 0, 1, 2, 3


@triton.jit
def _dq_share(dq_dst, ds_t, k, start_n, start_m, offs_n, offs_m, seqlen, stride_dqs,
              HEAD_DIM: tl.constexpr, EVEN: tl.constexpr, USE_TMA: tl.constexpr,
              DOT_F32: tl.constexpr, DQ_MODE: tl.constexpr):
    """This block's part in dQ. DQ_STASH: dS^T into the scratch (dq_dst: this head's
    [s, s] keys-by-queries, row stride stride_dqs; a tensor descriptor with USE_TMA).
    DQ_ATOMIC / DQ_TMA: dS K (unscaled) added into the fp32 buffer (a descriptor for DQ_TMA)."""
    if DQ_MODE == 3:  # DQ_STASH
        if USE_TMA:
            dq_dst.store([start_n, start_m], ds_t)  # rows and columns past the end are dropped
        else:
            ptrs = dq_dst + offs_n[:, None].to(tl.int64) * stride_dqs + offs_m[None, :]
            if EVEN:
                tl.store(ptrs, ds_t)
            else:
                tl.store(ptrs, ds_t, mask=(offs_n[:, None] < seqlen) & (offs_m[None, :] < seqlen))
    else:
        dq = _dot(tl.trans(ds_t), k, None, DOT_F32)  # [BLOCK_M, HEAD_DIM]
        if DQ_MODE == 2:  # DQ_TMA
            dq_dst.atomic_add([start_m, 0], dq)  # rows past the end are dropped
        else:
            ptrs = dq_dst + offs_m[:, None] * stride_dqs + tl.arange(0, HEAD_DIM)[None, :]
            if EVEN:
                tl.atomic_add(ptrs, dq, sem="relaxed")
            else:
                tl.atomic_add(ptrs, dq, mask=offs_m[:, None] < seqlen, sem="relaxed")


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, dq_dst, start_n, lo, hi,
                seqlen, stride_qs, stride_qd, stride_gs, stride_gd, stride_dqs, qk_scale2,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr,
                EVEN: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
                DOT_F32: tl.constexpr, DQ_MODE: tl.constexpr):
    offs_n = start_n + tl.arange(0, k.shape[0])
    for start_m in tl.range(lo, hi, BLOCK_M, warp_specialize=WARP_SPEC):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(q_src, start_m, seqlen, stride_qs, stride_qd, BLOCK_M, HEAD_DIM,
                       USE_TMA, EVEN)
        lse2 = _load_lse2(lse_ptr, offs_m, seqlen, EVEN)
        qk_t = _dot(k, tl.trans(q), None, DOT_F32)  # [BLOCK_N, BLOCK_M]
        p_t = tl.math.exp2(qk_t * qk_scale2 - lse2[None, :])
        if MASK:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        do = _load_rows(do_src, start_m, seqlen, stride_gs, stride_gd, BLOCK_M, HEAD_DIM,
                        USE_TMA, EVEN)
        dv = _dot(p_t.to(do.dtype), do, dv, DOT_F32)
        delta = _load_delta(delta_ptr, offs_m, seqlen, EVEN)
        dp_t = _dot(v, tl.trans(do), None, DOT_F32)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = _dot(ds_t, q, dk, DOT_F32)
        if DQ_MODE != 0:
            _dq_share(dq_dst, ds_t, k, start_n, start_m, offs_n, offs_m, seqlen, stride_dqs,
                      HEAD_DIM, EVEN, USE_TMA, DOT_F32, DQ_MODE)
    return dk, dv


@triton.jit
def _dkdv_inner_deferred(dk, dv, k, v, q_src, do_src, lse_ptr, delta_ptr, offs_n, lo, hi,
                         seqlen, stride_qs, stride_qd, stride_gs, stride_gd, qk_scale2,
                         BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN: tl.constexpr,
                         USE_TMA: tl.constexpr, DOT_F32: tl.constexpr):
    """The unmasked query blocks [lo, hi) with each block's dK += dS^T Q deferred to the
    next iteration, issued after that block's S^T dot: the wgmma then runs under the exp2 of
    P^T (Triton waits on a dot at once unless only its accumulator is carried; see
    attention_fwd._fwd_inner_pipelined). Only with DQ_NONE (the separate dQ kernel)."""
    if lo < hi:
        last = lo + (tl.cdiv(hi - lo, BLOCK_M) - 1) * BLOCK_M
        ds_t = tl.zeros([offs_n.shape[0], BLOCK_M], tl.float32)
        for start_m in tl.range(lo, hi, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_rows(q_src, start_m, seqlen, stride_qs, stride_qd, BLOCK_M, HEAD_DIM,
                           USE_TMA, EVEN)
            qk_t = _dot(k, tl.trans(q), None, DOT_F32)  # [BLOCK_N, BLOCK_M]
            # the previous block's dK share (a zero dS on the first pass), under the exp2
            q_prev = _load_rows(q_src, tl.maximum(start_m - BLOCK_M, lo), seqlen, stride_qs,
                                stride_qd, BLOCK_M, HEAD_DIM, USE_TMA, EVEN)
            dk = _dot(ds_t.to(q.dtype), q_prev, dk, DOT_F32)
            p_t = tl.math.exp2(qk_t * qk_scale2 - _load_lse2(lse_ptr, offs_m, seqlen, EVEN)[None, :])
            delta = _load_delta(delta_ptr, offs_m, seqlen, EVEN)
            do = _load_rows(do_src, start_m, seqlen, stride_gs, stride_gd, BLOCK_M, HEAD_DIM,
                            USE_TMA, EVEN)
            dv = _dot(p_t.to(do.dtype), do, dv, DOT_F32)
            dp_t = _dot(v, tl.trans(do), None, DOT_F32)
            ds_t = p_t * (dp_t - delta[None, :])
        q = _load_rows(q_src, last, seqlen, stride_qs, stride_qd, BLOCK_M, HEAD_DIM, USE_TMA,
                       EVEN)
        dk = _dot(ds_t.to(q.dtype), q, dk, DOT_F32)
    return dk, dv


@triton.jit
def _load_lse2(lse_ptr, offs_m, seqlen, EVEN: tl.constexpr):
    """The forward's LSE of rows offs_m in base 2; +inf past the end makes their P exactly 0."""
    if EVEN:
        lse2 = tl.load(lse_ptr + offs_m) * 1.4426950408889634  # log2 e
    else:
        lse2 = tl.load(lse_ptr + offs_m, mask=offs_m < seqlen, other=float("inf"))
        lse2 = lse2 * 1.4426950408889634  # log2 e
    return lse2


@triton.jit
def _load_delta(delta_ptr, offs_m, seqlen, EVEN: tl.constexpr):
    if EVEN:
        delta = tl.load(delta_ptr + offs_m)
    else:
        delta = tl.load(delta_ptr + offs_m, mask=offs_m < seqlen, other=0.0)
    return delta


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, bhk_offset, ds_ld,
                 stride_qb, stride_qs, stride_qh, stride_qd,
                 stride_kb, stride_ks, stride_kh, stride_kd,
                 stride_vb, stride_vs, stride_vh, stride_vd,
                 stride_gb, stride_gs, stride_gh, stride_gd,
                 stride_dkb, stride_dks, stride_dkh, stride_dkd,
                 stride_dvb, stride_dvs, stride_dvh, stride_dvd,
                 seqlen, num_heads, num_kv_heads, group, softmax_scale, qk_scale2,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, EVEN: tl.constexpr, USE_TMA: tl.constexpr,
                 WARP_SPEC: tl.constexpr, DOT_F32: tl.constexpr, DQ_MODE: tl.constexpr,
                 DEFER: tl.constexpr):
    # DQ_ACC: DQ_ATOMIC / DQ_TMA's fp32 [b, s, hq, HEAD_DIM], contiguous; DQ_STASH's scratch
    # [programs(0) * group, s, ds_ld] in Q's dtype (query head (b, h) of this launch's KV
    # heads bhk_offset + program_id(0) at program_id(0) * group + h % group).
    # DEFER: the unmasked query blocks through _dkdv_inner_deferred (DQ_NONE only).
    tl.static_assert(not (DEFER and DQ_MODE != 0))
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    bhk = bhk_offset + tl.program_id(0)
    start_n = tl.program_id(1) * BLOCK_N
    b = (bhk // num_kv_heads).to(tl.int64)
    hk = (bhk % num_kv_heads).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k_src = _rows_source(K + b * stride_kb + hk * stride_kh, seqlen, stride_ks, BLOCK_N,
                         HEAD_DIM, USE_TMA)
    v_src = _rows_source(V + b * stride_vb + hk * stride_vh, seqlen, stride_vs, BLOCK_N,
                         HEAD_DIM, USE_TMA)
    k = _load_rows(k_src, start_n, seqlen, stride_ks, stride_kd, BLOCK_N, HEAD_DIM, USE_TMA,
                   EVEN)
    v = _load_rows(v_src, start_n, seqlen, stride_vs, stride_vd, BLOCK_N, HEAD_DIM, USE_TMA,
                   EVEN)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    # The query heads sharing this KV head, summed in order inside one program (GQA).
    for g in range(group):
        h = hk * group + g
        q_src = _rows_source(Q + b * stride_qb + h * stride_qh, seqlen, stride_qs, BLOCK_M,
                             HEAD_DIM, USE_TMA)
        do_src = _rows_source(DO + b * stride_gb + h * stride_gh, seqlen, stride_gs, BLOCK_M,
                              HEAD_DIM, USE_TMA)
        row = (b * num_heads + h) * seqlen
        if DQ_MODE == 3:  # DQ_STASH: this head's [s, s] scratch, keys by queries
            stride_dqs = ds_ld
            dq_dst = DQ_ACC + (tl.program_id(0) * group + g).to(tl.int64) * seqlen * ds_ld
            if USE_TMA:
                dq_dst = tl.make_tensor_descriptor(dq_dst, shape=[seqlen, seqlen],
                                                   strides=[ds_ld, 1],
                                                   block_shape=[BLOCK_N, BLOCK_M])
        else:
            stride_dqs = num_heads * HEAD_DIM
            dq_dst = DQ_ACC + (b * seqlen * num_heads + h) * HEAD_DIM
            if DQ_MODE == 2:  # DQ_TMA
                dq_dst = tl.make_tensor_descriptor(dq_dst, shape=[seqlen, HEAD_DIM],
                                                   strides=[stride_dqs, 1],
                                                   block_shape=[BLOCK_M, HEAD_DIM])
        if CAUSAL:
            # Query blocks on the diagonal are masked; those below it are not.
            diag_end = tl.minimum(start_n + BLOCK_N, seqlen)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, LSE + row, DELTA + row, dq_dst,
                                 start_n, start_n, diag_end, seqlen, stride_qs, stride_qd,
                                 stride_gs, stride_gd, stride_dqs, qk_scale2, BLOCK_M, HEAD_DIM,
                                 True, EVEN, USE_TMA, WARP_SPEC, DOT_F32, DQ_MODE)
            unmasked_lo = start_n + BLOCK_N
        else:
            unmasked_lo = 0
        if DEFER:
            dk, dv = _dkdv_inner_deferred(dk, dv, k, v, q_src, do_src, LSE + row, DELTA + row,
                                          offs_n, unmasked_lo, seqlen, seqlen, stride_qs,
                                          stride_qd, stride_gs, stride_gd, qk_scale2, BLOCK_M,
                                          HEAD_DIM, EVEN, USE_TMA, DOT_F32)
        else:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, LSE + row, DELTA + row, dq_dst,
                                 start_n, unmasked_lo, seqlen, seqlen, stride_qs, stride_qd,
                                 stride_gs, stride_gd, stride_dqs, qk_scale2, BLOCK_M, HEAD_DIM,
                                 False, EVEN, USE_TMA, WARP_SPEC, DOT_F32, DQ_MODE)

    dk = dk * softmax_scale
    cols = tl.arange(0, HEAD_DIM)
    dk_ptrs = (DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dks
               + cols[None, :] * stride_dkd)
    dv_ptrs = (DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvs
               + cols[None, :] * stride_dvd)
    if EVEN:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty))
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty))
    else:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=offs_n[:, None] < seqlen)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < seqlen)




def launch_delta(o, do, delta):
    """delta [b, hq, s] fp32 = rowsum(o * do)."""
    batch, seqlen, num_heads, head_dim = o.shape
    block = 64
    _delta_kernel[(batch * num_heads, triton.cdiv(seqlen, block))](
        o, do, delta, *o.stride(), *do.stride(), seqlen, num_heads,
        HEAD_DIM=head_dim, BLOCK=block, num_warps=4,
    )


def dq_mode(config, *, deterministic: bool, use_tma: bool, on_gpu: bool) -> int:
    """How the dK/dV kernel takes part in dQ: DQ_STASH for a "DS_STASH" config (deterministic
    either way); else DQ_NONE when deterministic; else DQ_TMA for a "DQ_TMA" config on a GPU
    with tensor descriptors (the CPU interpreter has no bulk reduce), else DQ_ATOMIC."""
    if config.get("DS_STASH"):
        return DQ_STASH
    if deterministic:
        return DQ_NONE
    return DQ_TMA if use_tma and on_gpu and config.get("DQ_TMA") else DQ_ATOMIC


def launch_dkdv(q, k, v, do, lse, delta, dk, dv, *, causal, softmax_scale, config, use_tma,
                dq_acc=None, mode=None, kv_heads=None):
    """dk, dv [b, s, hkv, d]: one program per (key block, batch, KV head), for the flat
    (batch, KV head) range `kv_heads` = (first, count) (default: all).

    mode DQ_ATOMIC / DQ_TMA: also adds the unscaled dQ into `dq_acc` (fp32 [b, s, hq, d],
    contiguous, zeroed); DQ_STASH: stores dS^T into `dq_acc`, the scratch [count * group,
    s, ds_stash_stride(s)] in q's dtype. mode None: DQ_NONE, or DQ_ATOMIC given dq_acc."""
    batch, seqlen, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    first, count = kv_heads or (0, batch * num_kv_heads)
    if mode is None:
        mode = DQ_NONE if dq_acc is None else DQ_ATOMIC
    if mode in (DQ_ATOMIC, DQ_TMA):
        assert dq_acc.dtype == torch.float32 and dq_acc.is_contiguous()
    if mode == DQ_STASH:
        group = num_heads // num_kv_heads
        assert dq_acc.dtype == q.dtype and dq_acc.is_contiguous()
        assert dq_acc.shape[0] >= count * group and tuple(dq_acc.shape[1:]) == (
            seqlen, ds_stash_stride(seqlen))
    _dkdv_kernel[(count, triton.cdiv(seqlen, config["BLOCK_N"]))](
        q, k, v, do, lse, delta, dk, dv, dk if dq_acc is None else dq_acc, first,
        ds_stash_stride(seqlen),
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        seqlen, num_heads, num_kv_heads, num_heads // num_kv_heads, softmax_scale,
        softmax_scale * LOG2E_HOST,
        HEAD_DIM=head_dim, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
        CAUSAL=causal, EVEN=seqlen % config["BLOCK_N"] == 0, USE_TMA=use_tma,
        WARP_SPEC=config.get("WARP_SPEC", False), DOT_F32=dot_f32(q),
        DQ_MODE=mode, DEFER=config.get("DEFER", False),
        num_warps=config["num_warps"], num_stages=config["num_stages"], **launch_extras(config),
    )
