"""dQ from the dS the dK/dV kernel stored (DQ_STASH, kernels/attention_bwd.py).

    dQ_i = scale * sum_j dS_ij K_j          one program per (query block, query head)

The scratch holds, per query head, dS^T: [s keys, s queries] in the inputs' dtype, rows
`ds_stash_stride(s)` apart. The dK/dV kernel wrote every score it computed (masked ones as 0);
under the causal mask the block pairs it never reached lie above the diagonal, so this kernel
reads only key blocks left of its diagonal and masks the diagonal blocks: an unwritten entry
is never read as a number. Each dQ block is summed by one program over its key blocks in
order: bitwise reproducible. This is a plain block GEMM with the matmul's operands already
in memory, no exp2 and no recomputed Q K^T or dO V^T: 1 block matmul where the dQ kernel
runs 3.
"""

from __future__ import annotations

import triton
import triton.language as tl

from core.choices import ds_stash_stride
from kernels.attention_fwd import _dot, _load_rows, _rows_source, dot_f32, launch_extras


@triton.jit
def _load_ds_t(ds_src, start_n, start_m, offs_n, offs_m, seqlen, ld, EVEN: tl.constexpr,
               USE_TMA: tl.constexpr):
    """dS^T [BLOCK_N keys, BLOCK_M queries]; entries past the end read as 0."""
    if USE_TMA:
        tile = ds_src.load([start_n, start_m])
    else:
        ptrs = ds_src + offs_n[:, None].to(tl.int64) * ld + offs_m[None, :]
        if EVEN:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(offs_n[:, None] < seqlen) & (offs_m[None, :] < seqlen),
                           other=0.0)
    return tile


@triton.jit
def _dq_ds_inner(dq, ds_src, k_src, start_m, lo, hi, seqlen, ld, stride_ks, stride_kd,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 MASK: tl.constexpr, EVEN: tl.constexpr, USE_TMA: tl.constexpr,
                 DOT_F32: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ds_t = _load_ds_t(ds_src, start_n, start_m, offs_n, offs_m, seqlen, ld, EVEN, USE_TMA)
        if MASK:  # above the diagonal: never written
            ds_t = tl.where(offs_n[:, None] <= offs_m[None, :], ds_t, 0.0)
        k = _load_rows(k_src, start_n, seqlen, stride_ks, stride_kd, BLOCK_N, HEAD_DIM,
                       USE_TMA, EVEN)
        dq = _dot(tl.trans(ds_t), k, dq, DOT_F32)
    return dq


@triton.jit
def _dq_ds_kernel(DS, K, DQ,
                  stride_kb, stride_ks, stride_kh, stride_kd,
                  stride_dqb, stride_dqs, stride_dqh, stride_dqd,
                  seqlen, ld, num_heads, group, bh_offset, softmax_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, EVEN: tl.constexpr, USE_TMA: tl.constexpr,
                  DOT_F32: tl.constexpr):
    # DS: scratch [programs(0), s, ld]; program_id(0) is query head bh_offset + it (flat b, h).
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    local = tl.program_id(0)
    bh = bh_offset + local
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M  # the longest rows first
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    hk = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    k_src = _rows_source(K + b * stride_kb + hk * stride_kh, seqlen, stride_ks, BLOCK_N,
                         HEAD_DIM, USE_TMA)
    ds_src = DS + local.to(tl.int64) * seqlen * ld
    if USE_TMA:
        ds_src = tl.make_tensor_descriptor(ds_src, shape=[seqlen, seqlen], strides=[ld, 1],
                                           block_shape=[BLOCK_N, BLOCK_M])
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:
        dq = _dq_ds_inner(dq, ds_src, k_src, start_m, 0, start_m, seqlen, ld, stride_ks,
                          stride_kd, BLOCK_M, BLOCK_N, HEAD_DIM, False, EVEN, USE_TMA, DOT_F32)
        dq = _dq_ds_inner(dq, ds_src, k_src, start_m, start_m,
                          tl.minimum(start_m + BLOCK_M, seqlen), seqlen, ld, stride_ks,
                          stride_kd, BLOCK_M, BLOCK_N, HEAD_DIM, True, EVEN, USE_TMA, DOT_F32)
    else:
        dq = _dq_ds_inner(dq, ds_src, k_src, start_m, 0, seqlen, seqlen, ld, stride_ks,
                          stride_kd, BLOCK_M, BLOCK_N, HEAD_DIM, False, EVEN, USE_TMA, DOT_F32)
    dq = dq * softmax_scale
    offs_m = start_m + tl.arange(0, BLOCK_M)
    ptrs = (DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs
            + tl.arange(0, HEAD_DIM)[None, :] * stride_dqd)
    if EVEN:
        tl.store(ptrs, dq.to(DQ.dtype.element_ty))
    else:
        tl.store(ptrs, dq.to(DQ.dtype.element_ty), mask=offs_m[:, None] < seqlen)


def launch_dq_ds(ds, k, dq, *, heads, causal, softmax_scale, config, use_tma):
    """dq [b, s, hq, d] for the flat query heads `heads` = (first, count), from `ds` (the
    scratch launch_dkdv filled for those heads: [count, s, ds_stash_stride(s)])."""
    batch, seqlen, num_heads, head_dim = dq.shape
    first, count = heads
    assert ds.shape[0] >= count and tuple(ds.shape[1:]) == (seqlen, ds_stash_stride(seqlen))
    _dq_ds_kernel[(count, triton.cdiv(seqlen, config["BLOCK_M"]))](
        ds, k, dq, *k.stride(), *dq.stride(), seqlen, ds_stash_stride(seqlen), num_heads,
        num_heads // k.shape[2], first, softmax_scale,
        HEAD_DIM=head_dim, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
        CAUSAL=causal, EVEN=seqlen % config["BLOCK_M"] == 0, USE_TMA=use_tma,
        DOT_F32=dot_f32(dq),
        num_warps=config["num_warps"], num_stages=config["num_stages"], **launch_extras(config),
    )
