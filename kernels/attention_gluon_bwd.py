"""Causal attention backward in Gluon for Hopper (sm_90), FA3-style, deterministic.

One program per (key block of BLOCK_N = 128 rows, batch, KV head); two warpgroups (8 warps)
each own 64 of the key rows. The program keeps K and V in shared memory and dK, dV in
registers, and walks the query blocks its keys see under the causal mask (for every query
head of its KV group, so GQA sums dK/dV without atomics). Per query block of BLOCK_M rows:

    S^T  = K Q^T,  dP^T = V dO^T                       (async wgmma, both in flight)
    P^T  = exp2(S^T * scale * log2 e - lse * log2 e)   (under dP^T's wgmma)
    dV  += P^T dO                                      (P^T from registers)
    dS^T = P^T (dP^T - delta)
    dK  += dS^T Q                                      (dS^T from registers)
    dQ_i += dS K                                       (dS^T through shared memory)

Q and dO come in by TMA into a two-stage ring, block i+1 loading under block i.
delta = rowsum(O * dO) comes from kernels.attention_bwd's pre-kernel.

dQ without float atomics: the key blocks add their share of a query block's dQ into an fp32
buffer in a fixed order, highest key block first, each waiting on a per-query-block counter
(acquire/release, gpu scope). Key block 0 adds last and writes dq (scaled, in q's dtype)
itself, so no conversion kernel runs; the first adder writes without reading, so the buffer
needs no zeroing. The order is the same every run, so dq is bitwise repeatable. The order
also makes the wait short under the causal mask: key block j reaches query block i two
iterations after key block j+1 did. Programs of higher key blocks launch first (lower
program id), so a program only ever waits on programs that started before it.

Measured (H200, 2026-12-01, Triton 3.6; TFLOP/s with bwd = 2.5 x 2*b*hq*s^2*d; the issue's
four shapes 8x16/16x2048x128, 2x16/16x8192x128, 16x32/32x1024x64, 4x32/8x4096x128): this
kernel 205/235/158/205; deterministic=False (fp32 atomics) 242/331/160/229; a probe that
stores dQ without order or read 316/396/204/268, which bounds this design; the Triton-language
backward 295/368/234/353 and SDPA-cuDNN 410/529/249/435 in the same call (flash-attn-4's
figures: 456/546/318/499). So the in-order dQ sum costs a third (each block pays an acquire
round trip, the fp32 read, and the release's wait for the stores), and the compute core sits
at 255 registers with 400-560 bytes of spills (ptxas, sm_90a). A variant with the sum in a
one-warp writer partition (warp_specialize; TMA load of the running sum under the turn, TMA
store, release) held the compute warps to setmaxnreg 240: 1 KB of spills, 191/211/126/154.

Limits (gluon_backward_unsupported names them): sm_90, fp16/bf16, head dim 64 or 128,
sequence length a multiple of 128, TMA-able strides (16-byte aligned, last stride 1).
"""

from __future__ import annotations

import functools
import types

import torch

from kernels.attention_fwd import tma_aligned

try:  # Triton 3.6's Gluon; the CPU suite's Triton may lack or differ in it
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    _jit = gluon.jit
except ImportError:  # pragma: no cover - depends on the installed triton
    gl = types.SimpleNamespace(constexpr=object)
    _jit = None

LOG2E = 1.4426950408889634
BLOCK_N = 128
# Query rows per block, per head dim: 64 at d=128 keeps dK, dV (64 + 64 fp32 registers per
# thread), S^T, dP^T (32 + 32) and dQ (32) inside 255 registers; 128 at d=64 (halved dK, dV).
BLOCK_M = {64: 128, 128: 64}
NUM_WARPS = 8
# H200, 2026-12-01 (tree 0fb1da4 + the deferred dQ add; TFLOP/s, bwd = 2.5 x 2*b*hq*s^2*d,
# the four shapes): 205/235/158/205, against the Triton-language backward's
# 295/368/234/353 in the same call. So kernels/attention.py's "auto" keeps the Triton-language
# backward unless LAYOUT_SWEEP_GLUON_BWD=1.


@(_jit or (lambda f: f))
def _add_dq(p, dq_smem, acc_ptr, sem_ptr, dq_ptr, stride_dqs, n_nblocks, jb, softmax_scale,
            BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
            CAUSAL: gl.constexpr, DQ_MODE: gl.constexpr):
    """Add this key block's share of query block p's dQ (staged in dq_smem, unscaled fp32)
    into the fp32 buffer at its turn: key blocks jmax .. 0 add in that order; key block 0
    writes dq instead. In two row halves, 16-byte vectors, so few registers are live."""
    if CAUSAL:
        jmax = (p * BLOCK_M + BLOCK_M - 1) // BLOCK_N
    else:
        jmax = n_nblocks - 1
    turn = jmax - jb
    io: gl.constexpr = gl.BlockedLayout([1, 4], [128 // HEAD_DIM, HEAD_DIM // 4],
                                        [gl.num_warps(), 1], [1, 0])
    HALF: gl.constexpr = BLOCK_M // 2
    offs_r = gl.arange(0, HALF, gl.SliceLayout(1, io))
    offs_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, io))
    if DQ_MODE == 0:
        if turn > 0:
            while gl.atomic_add(sem_ptr + p, 0, sem="acquire", scope="gpu") != turn:
                pass
    for c in gl.static_range(2):
        rows = p * BLOCK_M + c * HALF + offs_r
        ptrs = acc_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :]
        x = dq_smem.slice(c * HALF, HALF, dim=0).load(io)
        if DQ_MODE == 1:  # deterministic=False: fp32 atomics into a zeroed buffer
            gl.atomic_add(ptrs, x, sem="relaxed")
        elif DQ_MODE == 2:  # timing probe only (wrong dq): the store, no order, no read
            gl.store(ptrs, x)
        else:
            if turn > 0:
                x += gl.load(ptrs, cache_modifier=".cg")  # .cg: L2, never a stale L1 line
            if jb == 0:
                gl.store(dq_ptr + rows[:, None] * stride_dqs + offs_d[None, :],
                         (x * softmax_scale).to(dq_ptr.dtype.element_ty))
            else:
                gl.store(ptrs, x, cache_modifier=".cg")
    if DQ_MODE == 0:
        if jb != 0:
            gl.thread_barrier()  # every thread's share stored before the counter moves on
            gl.atomic_xchg(sem_ptr + p, turn + 1, sem="release", scope="gpu")


@(_jit or (lambda f: f))
def _query_block(i, cnt, pend, dk, dv, lse_n, delta_n, q_desc, do_desc, q_smem, do_smem,
                 q_bar, k_smem, v_smem, ds_smem, dq_smem, lse_ptr, delta_ptr, acc_ptr,
                 sem_ptr, dq_ptr, stride_dqs, n_mblocks, n_nblocks, jb, start_n, qk_scale2,
                 softmax_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, MASK: gl.constexpr,
                 MMA_T: gl.constexpr, MMA_KV: gl.constexpr, MMA_Q: gl.constexpr,
                 DQ_MODE: gl.constexpr):
    """Query block i. Adds block `pend`'s dQ (staged in dq_smem; none when -1) under this
    block's first two wgmmas, and leaves block i's dQ staged there. lse_n, delta_n: block i's
    rows, loaded one block ahead; returns block i+1's."""
    dtype: gl.constexpr = q_desc.dtype
    st = cnt % 2
    # Every warp is past block i-1 (its wgmmas waited): stage 1-st and ds_smem are free.
    gl.thread_barrier()
    nxt = i + 1 < n_mblocks
    mbarrier.expect(q_bar.index(1 - st), 2 * q_desc.block_type.nbytes, pred=nxt)
    tma.async_copy_global_to_shared(q_desc, [(i + 1) * BLOCK_M, 0], q_bar.index(1 - st),
                                    q_smem.index(1 - st), pred=nxt)
    tma.async_copy_global_to_shared(do_desc, [(i + 1) * BLOCK_M, 0], q_bar.index(1 - st),
                                    do_smem.index(1 - st), pred=nxt)
    # lse enters as S^T's initial value, -lse2 / (scale log2 e), so it is not kept in
    # registers across the wgmma (in S^T's column layout a vector costs 16 registers a
    # thread). (-delta as dP^T's initial value made ptxas serialize the two wgmmas, C7517.)
    col_layout: gl.constexpr = gl.SliceLayout(0, MMA_T)
    neg_lse = gl.convert_layout(lse_n * (-1.4426950408889634 / qk_scale2), col_layout)
    neg_delta = gl.convert_layout(-delta_n, col_layout)
    rows_n = gl.minimum(i + 1, n_mblocks - 1) * BLOCK_M + gl.arange(0, BLOCK_M, lse_n.type.layout)
    lse_n = gl.load(lse_ptr + rows_n)
    delta_n = gl.load(delta_ptr + rows_n)
    mbarrier.wait(q_bar.index(st), (cnt // 2) & 1)
    qs = q_smem.index(st)
    dos = do_smem.index(st)

    zero_t = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA_T)
    s_t = warpgroup_mma(k_smem, qs.permute((1, 0)), zero_t + neg_lse[None, :], is_async=True)
    dp_t = warpgroup_mma(v_smem, dos.permute((1, 0)), zero_t, use_acc=False, is_async=True)
    if pend >= 0:
        _add_dq(pend, dq_smem, acc_ptr, sem_ptr, dq_ptr, stride_dqs, n_nblocks, jb,
                softmax_scale, BLOCK_M, BLOCK_N, HEAD_DIM, CAUSAL, DQ_MODE)
    s_t = warpgroup_mma_wait(num_outstanding=1, deps=[s_t])
    p_t = gl.exp2(s_t * qk_scale2)
    if MASK:
        offs_k = start_n + gl.arange(0, BLOCK_N, gl.SliceLayout(1, MMA_T))
        offs_q = i * BLOCK_M + gl.arange(0, BLOCK_M, col_layout)
        p_t = gl.where(offs_q[None, :] >= offs_k[:, None], p_t, 0.0)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA_KV, k_width=2)
    p_a = gl.convert_layout(p_t.to(dtype), a_layout)
    dv = warpgroup_mma(p_a, dos, dv, is_async=True)
    dp_t = warpgroup_mma_wait(num_outstanding=1, deps=[dp_t])
    ds_t = (p_t * (dp_t + neg_delta[None, :])).to(dtype)
    ds_a = gl.convert_layout(ds_t, a_layout)
    dk = warpgroup_mma(ds_a, qs, dk, is_async=True)
    ds_smem.store(ds_t)
    fence_async_shared()
    gl.thread_barrier()  # also: every thread's read of dq_smem (the add above) is done
    zero_q = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, MMA_Q)
    dq = warpgroup_mma(ds_smem.permute((1, 0)), k_smem, zero_q, use_acc=False, is_async=True)
    dq, dv, dk, p_a, ds_a = warpgroup_mma_wait(num_outstanding=0, deps=[dq, dv, dk, p_a, ds_a])
    dq_smem.store(dq)
    return cnt + 1, i, dk, dv, lse_n, delta_n


@(_jit or (lambda f: f))
def _gluon_attn_bwd_kernel(Q, K, V, DO, DQ, DK, DV, LSE, DELTA, DQ_ACC, SEM,
                stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                stride_dqb, stride_dqs, stride_dqh, stride_dkb, stride_dks, stride_dkh,
                stride_dvb, stride_dvs, stride_dvh,
                seqlen, num_heads, num_kv_heads, group, softmax_scale, qk_scale2,
                HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                CAUSAL: gl.constexpr, Q_LAYOUT: gl.constexpr, K_LAYOUT: gl.constexpr,
                DS_LAYOUT: gl.constexpr, MMA_T: gl.constexpr, MMA_KV: gl.constexpr,
                MMA_Q: gl.constexpr, DQ_MODE: gl.constexpr):
    # DQ_MODE 0: dQ summed in key-block order (deterministic); 1: fp32 atomics; 2: probe.
    n_nblocks = seqlen // BLOCK_N
    n_mblocks = seqlen // BLOCK_M
    jb = n_nblocks - 1 - gl.program_id(0)  # higher key blocks first: they add to dQ first
    bhk = gl.program_id(1)
    b = (bhk // num_kv_heads).to(gl.int64)
    hk = (bhk % num_kv_heads).to(gl.int64)
    start_n = jb * BLOCK_N
    dtype: gl.constexpr = Q.dtype.element_ty

    k_desc = tma.make_tensor_descriptor(K + b * stride_kb + hk * stride_kh, [seqlen, HEAD_DIM],
                                        [stride_ks, 1], [BLOCK_N, HEAD_DIM], K_LAYOUT)
    v_desc = tma.make_tensor_descriptor(V + b * stride_vb + hk * stride_vh, [seqlen, HEAD_DIM],
                                        [stride_vs, 1], [BLOCK_N, HEAD_DIM], K_LAYOUT)
    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], K_LAYOUT)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], K_LAYOUT)
    q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HEAD_DIM], Q_LAYOUT)
    do_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HEAD_DIM], Q_LAYOUT)
    ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], DS_LAYOUT)
    dq_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M, HEAD_DIM],
                                        gl.SwizzledSharedLayout(4, 1, 8, [1, 0]))
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    mbarrier.init(q_bar.index(0), count=1)
    mbarrier.init(q_bar.index(1), count=1)
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [start_n, 0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [start_n, 0], kv_bar, v_smem)

    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, MMA_KV)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, MMA_KV)
    if CAUSAL:
        lo = start_n // BLOCK_M
    else:
        lo = 0
    row_layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    cnt = 0  # query blocks consumed so far: picks the ring stage and the barrier phase
    for g in range(group):
        h = hk * group + g
        bh = b * num_heads + h
        q_desc = tma.make_tensor_descriptor(Q + b * stride_qb + h * stride_qh,
                                            [seqlen, HEAD_DIM], [stride_qs, 1],
                                            [BLOCK_M, HEAD_DIM], Q_LAYOUT)
        do_desc = tma.make_tensor_descriptor(DO + b * stride_ob + h * stride_oh,
                                             [seqlen, HEAD_DIM], [stride_os, 1],
                                             [BLOCK_M, HEAD_DIM], Q_LAYOUT)
        st = cnt % 2
        mbarrier.expect(q_bar.index(st), 2 * q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [lo * BLOCK_M, 0], q_bar.index(st),
                                        q_smem.index(st))
        tma.async_copy_global_to_shared(do_desc, [lo * BLOCK_M, 0], q_bar.index(st),
                                        do_smem.index(st))
        if g == 0:
            mbarrier.wait(kv_bar, 0)
        acc_ptr = DQ_ACC + bh * seqlen * HEAD_DIM
        sem_ptr = SEM + bh * n_mblocks
        dq_ptr = DQ + b * stride_dqb + h * stride_dqh
        args = (q_desc, do_desc, q_smem, do_smem, q_bar, k_smem, v_smem, ds_smem, dq_smem,
                LSE + bh * seqlen, DELTA + bh * seqlen, acc_ptr, sem_ptr, dq_ptr, stride_dqs,
                n_mblocks, n_nblocks, jb, start_n, qk_scale2, softmax_scale)
        rows = lo * BLOCK_M + gl.arange(0, BLOCK_M, row_layout)
        lse_n = gl.load(LSE + bh * seqlen + rows)
        delta_n = gl.load(DELTA + bh * seqlen + rows)
        pend = -1
        unmasked_lo = lo
        if CAUSAL:
            unmasked_lo = lo + BLOCK_N // BLOCK_M
            for i in range(lo, unmasked_lo):  # the diagonal: keys past the query masked
                cnt, pend, dk, dv, lse_n, delta_n = _query_block(
                    i, cnt, pend, dk, dv, lse_n, delta_n, *args, BLOCK_M, BLOCK_N, HEAD_DIM,
                    CAUSAL, True, MMA_T, MMA_KV, MMA_Q, DQ_MODE)
        for i in range(unmasked_lo, n_mblocks):
            cnt, pend, dk, dv, lse_n, delta_n = _query_block(
                i, cnt, pend, dk, dv, lse_n, delta_n, *args, BLOCK_M, BLOCK_N, HEAD_DIM,
                CAUSAL, False, MMA_T, MMA_KV, MMA_Q, DQ_MODE)
        gl.thread_barrier()  # the last block's dQ, staged by every thread
        _add_dq(pend, dq_smem, acc_ptr, sem_ptr, dq_ptr, stride_dqs, n_nblocks, jb,
                softmax_scale, BLOCK_M, BLOCK_N, HEAD_DIM, CAUSAL, DQ_MODE)

    offs_n = start_n + gl.arange(0, BLOCK_N, gl.SliceLayout(1, MMA_KV))
    offs_d = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, MMA_KV))
    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :]
    gl.store(dk_ptrs, (dk * softmax_scale).to(dtype))
    gl.store(dv_ptrs, dv.to(dtype))


def kernel_constexprs(head_dim: int) -> dict:
    """The layouts and block sizes of one head dim (also what the sm_90a compile check uses)."""
    block_m = BLOCK_M[head_dim]
    nvmma = functools.partial(gl.NVMMASharedLayout, element_bitwidth=16, rank=2)
    mma = functools.partial(gl.NVMMADistributedLayout, version=[3, 0])
    # dQ [BLOCK_M, d]: a 64-row block splits its columns over the two warpgroups.
    mma_q = (mma(warps_per_cta=[4, 2], instr_shape=[16, head_dim // 2, 16]) if block_m == 64
             else mma(warps_per_cta=[8, 1], instr_shape=[16, head_dim, 16]))
    return dict(
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
        Q_LAYOUT=nvmma(swizzle_byte_width=128), K_LAYOUT=nvmma(swizzle_byte_width=128),
        DS_LAYOUT=nvmma(swizzle_byte_width=min(128, block_m * 2)),
        MMA_T=mma(warps_per_cta=[8, 1], instr_shape=[16, block_m, 16]),
        MMA_KV=mma(warps_per_cta=[8, 1], instr_shape=[16, head_dim, 16]),
        MMA_Q=mma_q,
    )


@functools.lru_cache(maxsize=1)
def _gluon_hopper_missing() -> str | None:
    if _jit is None:
        return "triton without gluon hopper"
    return None


def shape_unsupported(q, k) -> str | None:
    """Why these shapes and dtypes cannot run (device aside), or None."""
    d, s = q.shape[-1], q.shape[1]
    if d not in BLOCK_M:
        return f"head dim {d}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}"
    if s % BLOCK_N:
        return f"seq {s} not a multiple of {BLOCK_N}"
    if q.shape[2] % k.shape[2]:
        return f"KV heads {k.shape[2]} do not divide query heads {q.shape[2]}"
    return None


def gluon_backward_unsupported(q, k, v, do, *, causal, deterministic) -> str | None:
    """None when gluon_backward can run on these tensors, else a short reason.
    Both dQ modes run (deterministic=False: fp32 atomics)."""
    return _cannot_run(q, k, v, do)


def _cannot_run(q, k, v, do) -> str | None:
    missing = _gluon_hopper_missing()
    if missing:
        return missing
    if not q.is_cuda:
        return "not a CUDA tensor"
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return "not sm_90"
    reason = shape_unsupported(q, k)
    if reason:
        return reason
    if not all(tma_aligned(t) for t in (q, k, v, do)):
        return "strides not TMA-able (last stride 1, others and base 16-byte aligned)"
    return None


def gluon_backward(do, q, k, v, out, lse, dq, dk, dv, *, causal, softmax_scale,
                   deterministic=True, _dq_mode=None) -> None:
    """dq [b, s, hq, d], dk, dv [b, s, hkv, d] (preallocated, any strides, last stride 1).

    deterministic=False: dQ by fp32 atomics into a zeroed buffer, then scaled into dq (the
    summation order, hence dq's last bits, vary run to run)."""
    reason = _cannot_run(q, k, v, do)
    if reason:
        raise ValueError(f"gluon attention backward: {reason}")
    import triton

    from kernels.attention import _scratch
    from kernels.attention_bwd import launch_delta

    b, s, hq, d = q.shape
    hkv = k.shape[2]
    consts = kernel_constexprs(d)
    mode = _dq_mode if _dq_mode is not None else (0 if deterministic else 1)
    delta = torch.empty_like(lse)
    alloc = torch.zeros if mode == 1 else torch.empty  # the ordered sum's first adder writes
    dq_acc = alloc((b, hq, s, d), dtype=torch.float32, device=q.device)
    sem = torch.zeros((b * hq, s // consts["BLOCK_M"]), dtype=torch.int32, device=q.device)
    with torch.cuda.device(q.device):
        launch_delta(out, do, delta)
        triton.set_allocator(_scratch)  # device-side TMA descriptors (see attention._use_tma)
        _gluon_attn_bwd_kernel[(s // BLOCK_N, b * hkv)](
            q, k, v, do, dq, dk, dv, lse, delta, dq_acc, sem,
            *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(do), *_bsh(dq), *_bsh(dk), *_bsh(dv),
            s, hq, hkv, hq // hkv, float(softmax_scale), float(softmax_scale) * LOG2E,
            CAUSAL=bool(causal), DQ_MODE=mode, **consts, num_warps=NUM_WARPS,
        )
        if mode == 1:
            dq.copy_(dq_acc.mul_(softmax_scale).transpose(1, 2))


def _bsh(t: torch.Tensor):
    """(batch, sequence, head) strides of a [b, s, h, d] tensor."""
    return t.stride(0), t.stride(1), t.stride(2)

