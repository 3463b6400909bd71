"""Causal attention forward in Gluon for Hopper (sm_90a), FA3-style.

Same outputs as kernels/attention_fwd.py: O [b, s, hq, d] and LSE [b, hq, s] fp32, the natural
log of each row's sum of exp(scale * q.k) (the backward reads it). Base-2 online softmax with
the scale folded into log2 units (qk2 = scale * log2(e)):

    m_j = max(m_{j-1}, rowmax(S_j));  P_j = exp2(qk2 * (S_j - m_j))
    l_j = l_{j-1} * alpha_j + rowsum(P_j),  alpha_j = exp2(qk2 * (m_{j-1} - m_j))
    O = (sum_j P_j V_j, rescaled by each alpha) / l,  LSE = (qk2 * m + log2 l) * ln 2

Why Gluon: Triton-language 3.6 waits on a wgmma whose result is used in the same iteration, so
the softmax of one key block cannot run under the tensor-core work of another. Here the waits
are explicit. One CTA owns BLOCK_M = 128 query rows of one (batch, head), in three partitions
(gl.warp_specialize; setmaxnreg gives the consumers 240 registers, the producer 24):
- a 1-warp producer loads Q (two 64-row halves) and streams K_j, V_j through STAGES-deep
  rings of shared-memory slots by TMA, K one block ahead of V; each slot has a ready and an
  empty barrier (the empty one arrived by both consumers), so K_j's slot comes back as soon
  as S_j = Q K_j^T is done and V_j's after P_j V_j (FA3's separate K and V pipelines);
- two consumer warpgroups, 64 query rows each, take turns issuing their wgmmas (ping-pong,
  Shah et al., "FlashAttention-3", 2024, sec. 3.1): while one runs its softmax the other's
  S_j and P_{j-1} V_{j-1} hold the tensor cores. Within a warpgroup, S_j and P_{j-1} V_{j-1}
  are issued together and the softmax of block j only waits for S_j (sec. 3.2); ptxas 12.8
  still places the wait for P_{j-1} V_{j-1} before the exp2s (seen in the SASS; deferring
  that wait past S_{j+1} makes ptxas serialize every wgmma, C7514). Measured, the ping-pong
  buys 1-3% (CONFIGS). P stays in registers as wgmma's A operand.
Key blocks run from the diagonal down, so only the first (the diagonal block, BLOCK_N =
BLOCK_M) is masked, and its row maxima are finite from the start. Tiles (batch, head, query
block) run longest rows first; `persistent` launches one CTA per SM that walks the tiles
(two Q buffers; the rings and turns count on across tiles), so the producer loads the next
tile while the consumers finish the current one.

Tensors use 4D TMA descriptors over [b, s, h, d] with blocks [1, BLOCK, 1, d]: any strides
with a unit last stride (megatron's seq-first views included). The sequence length must be a
multiple of BLOCK_M; gluon_forward_unsupported says when this path cannot run.
"""

from __future__ import annotations

import functools
import math

import torch

import triton

from kernels.attention_fwd import tma_aligned
from kernels.fast_launch import CachedLaunch, aligned, device_index

try:  # Gluon's Hopper API as in Triton 3.6; other Triton versions fall back to the Triton kernel
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # Gluon's API moves between releases (warp_specialize's signature among others): the
    # kernel is written and checked against 3.6, the device's Triton.
    _GLUON_ERROR = (None if triton.__version__.startswith("3.6.") else
                    f"triton {triton.__version__}: the gluon forward is written for 3.6")
except (ImportError, AttributeError) as exc:  # pragma: no cover - depends on the installed Triton
    _GLUON_ERROR = f"triton without gluon hopper ({type(exc).__name__})"

LOG2E = 1.4426950408889634

# Per head dim: BLOCK_M = BLOCK_N, K/V ring depth, registers per thread of the consumer
# warpgroups and of the producer warp (setmaxnreg; 2 x 128 x 240 + 128 x 24 <= 64 K).
# persistent=True launches one CTA per SM over all tiles, with qbuf (default 2) Q buffers.
# pingpong=False drops the turn barriers and softmax=False skips the exp2s (P = S): both are
# diagnostics, to measure what the ping-pong buys and the matmul-bound ceiling.
# Measured (H200, bf16, causal, TFLOP/s = 2*b*hq*s^2*d / median do_bench time, the device runs
# of 0fb1da4 / 8ad8986 / 45ade86): d=128 2 -> 3 stages 361 -> 418 (8x16x2048), 485 -> 536
# (2x16x8192), 468 -> 524 (4x32/8x4096); persistent with 2 stages at 45ade86: 456 vs 436
# (8x16x2048), 521 vs 545 (2x16x8192), 571 vs 577 (4x32/8x4096), hence persistent only up to
# 2048 rows; d=64 (16x32x1024) persistent with 4 stages 328 vs 256.
CONFIGS = {64: dict(block=128, stages=4, consumer_regs=240, producer_regs=24, persistent=True),
           128: dict(block=128, stages=3, consumer_regs=240, producer_regs=24)}
SHORT_SEQ_CONFIGS = {128: dict(CONFIGS[128], stages=2, persistent=True)}  # seqlen <= 2048


def tuned_config(d: int, seqlen: int) -> dict:
    """The measured best configuration for head dim d at this sequence length."""
    return SHORT_SEQ_CONFIGS[d] if seqlen <= 2048 and d in SHORT_SEQ_CONFIGS else CONFIGS[d]


if _GLUON_ERROR is None:

    @gluon.jit
    def _tile(tile, n_bh, num_q_heads, group, seqlen, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
        """(batch, q_head, kv_head, start_m, n_blocks, bh) of tile `tile`: all (batch, head)
        pairs' last query block first, then the one before, ... (longest rows first)."""
        bh = tile % n_bh
        start_m = (seqlen // BLOCK_M - 1 - tile // n_bh) * BLOCK_M
        q_head = bh % num_q_heads
        if CAUSAL:
            n_blocks = (start_m + BLOCK_M) // BLOCK_N
        else:
            n_blocks = seqlen // BLOCK_N
        return bh // num_q_heads, q_head, q_head // group, start_m, n_blocks, bh

    @gluon.jit
    def _load_block(desc, smem, ready, empty, c, batch, row, kv_head, STAGES: gl.constexpr):
        """Key or value rows [row, row + BLOCK_N) into ring slot c % STAGES (the c-th block
        this CTA loads). A fresh barrier counts as having completed the phase before 0, so
        the first pass over a ring waits on parity 1 and goes straight through."""
        slot = c % STAGES
        mbarrier.wait(empty.index(slot), ((c // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(slot), desc.block_type.nbytes)
        tma.async_copy_global_to_shared(desc, [batch, row, kv_head, 0], ready.index(slot),
                                        smem.index(slot))

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready,
                  v_ready, k_empty, v_empty, n_tiles, n_bh, num_q_heads, group, seqlen,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  QBUF: gl.constexpr, CAUSAL: gl.constexpr):
        c = 0  # K/V blocks loaded so far: ring slot c % STAGES
        j = 0  # tiles so far: Q buffer j % QBUF
        for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            batch, q_head, kv_head, start_m, n_blocks, bh = _tile(
                tile, n_bh, num_q_heads, group, seqlen, BLOCK_M, BLOCK_N, CAUSAL)
            qb = j % QBUF
            mbarrier.wait(q_empty.index(qb), ((j // QBUF) & 1) ^ 1)  # see _load_block
            mbarrier.expect(q_ready.index(qb), 2 * q_desc.block_type.nbytes)  # 2 halves
            tma.async_copy_global_to_shared(q_desc, [batch, start_m, q_head, 0],
                                            q_ready.index(qb), q_smem.index(2 * qb))
            tma.async_copy_global_to_shared(q_desc, [batch, start_m + 64, q_head, 0],
                                            q_ready.index(qb), q_smem.index(2 * qb + 1))
            # K runs one block ahead of V: S_{i+1} is issued before P_i V_i, and K_i's slot
            # comes back as soon as S_i is done (FA3's separate K and V pipelines).
            _load_block(k_desc, k_smem, k_ready, k_empty, c, batch, (n_blocks - 1) * BLOCK_N,
                        kv_head, STAGES)
            for i in range(n_blocks):
                if i + 1 < n_blocks:
                    _load_block(k_desc, k_smem, k_ready, k_empty, c + i + 1, batch,
                                (n_blocks - 2 - i) * BLOCK_N, kv_head, STAGES)
                _load_block(v_desc, v_smem, v_ready, v_empty, c + i, batch,
                            (n_blocks - 1 - i) * BLOCK_N, kv_head, STAGES)
            c += n_blocks
            j += 1

    @gluon.jit
    def _consumer(o_desc, lse_ptr, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready,
                  k_empty, v_empty, turn, n_tiles, n_bh, num_q_heads, group, seqlen, qk2,
                  WG: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, QBUF: gl.constexpr,
                  CAUSAL: gl.constexpr, PINGPONG: gl.constexpr, SOFTMAX: gl.constexpr):
        """One warpgroup: query rows [64 * WG, 64 * WG + 64) of each of the CTA's tiles."""
        c = 0  # K/V blocks consumed so far (the producer's count)
        t = 0  # turns taken so far
        j = 0  # tiles so far
        for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            batch, q_head, kv_head, start_m, n_blocks, bh = _tile(
                tile, n_bh, num_q_heads, group, seqlen, BLOCK_M, BLOCK_N, CAUSAL)
            qb = j % QBUF
            mbarrier.wait(q_ready.index(qb), (j // QBUF) & 1)
            _attend_tile(o_desc, lse_ptr, q_smem.index(2 * qb + WG), k_smem, v_smem, k_ready,
                         v_ready, k_empty, v_empty, turn, batch, q_head, start_m, n_blocks,
                         bh.to(gl.int64) * seqlen + start_m, qk2, c, t, WG, BLOCK_N, HEAD_DIM,
                         STAGES, CAUSAL, PINGPONG, SOFTMAX)
            mbarrier.arrive(q_empty.index(qb), count=1)  # O is out of this buffer too
            c += n_blocks
            t += n_blocks + 1
            j += 1

    @gluon.jit
    def _attend_tile(o_desc, lse_ptr, q_mine, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty,
                     turn,
                     batch, q_head, start_m, n_blocks, lse_row0, qk2, c, t,
                     WG: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                     STAGES: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr,
                     SOFTMAX: gl.constexpr):
        """This warpgroup's 64 rows of one tile; its Q is in q_mine. Key block i is the
        producer's block c + i, and turn u of the tile is this warpgroup's turn t + u."""
        ROWS: gl.constexpr = 64
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
        dtype: gl.constexpr = o_desc.dtype
        q = q_mine.reshape([ROWS, HEAD_DIM])

        # Ping-pong (FA3 sec. 3.1): the two warpgroups take turns issuing their wgmmas, so
        # one's softmax runs while the other's matmuls hold the tensor cores. turn[WG]
        # completes once per turn the other warpgroup hands over; warpgroup 0 starts (its
        # barrier was pre-arrived), so turn t of either waits on parity t & 1.

        # Turn 0: S for key block 0 (the diagonal one when causal), its mask and softmax.
        mbarrier.wait(turn.index(WG), t & 1, pred=PINGPONG)
        mbarrier.wait(k_ready.index(c % STAGES), (c // STAGES) & 1)
        k = k_smem.index(c % STAGES).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        s_tok = warpgroup_mma(q, k, gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout),
                              use_acc=False, is_async=True)
        mbarrier.arrive(turn.index(1 - WG), count=1, pred=PINGPONG)
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        mbarrier.arrive(k_empty.index(c % STAGES), count=1)  # this warpgroup is done with K_0
        if CAUSAL:
            rows = gl.arange(0, ROWS, layout=row_layout) + WG * ROWS
            cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(cols[None, :] <= rows[:, None], s, -float("inf"))
        m = gl.max(s, axis=1)
        p = gl.exp2(s * qk2 - (m * qk2)[:, None])
        l = gl.sum(p, axis=1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        o = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
        alpha = gl.full([ROWS], 1.0, gl.float32, row_layout)

        for i in range(1, n_blocks):
            slot = (c + i) % STAGES
            prev = (c + i - 1) % STAGES
            mbarrier.wait(k_ready.index(slot), ((c + i) // STAGES) & 1)
            mbarrier.wait(turn.index(WG), (t + i) & 1, pred=PINGPONG)
            k = k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
            s_tok = warpgroup_mma(q, k, gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout),
                                  use_acc=False, is_async=True)
            # The previous softmax's rescale runs under Q K_i^T.
            o = o * gl.convert_layout(alpha, o_rows)[:, None]
            mbarrier.wait(v_ready.index(prev), ((c + i - 1) // STAGES) & 1)
            v = v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM])
            o_tok = warpgroup_mma(p_op, v, o, is_async=True)
            mbarrier.arrive(turn.index(1 - WG), count=1, pred=PINGPONG)
            # S_i done (P_{i-1} V_{i-1} may still run): block i's softmax.
            s = warpgroup_mma_wait(1, deps=(s_tok,))
            mbarrier.arrive(k_empty.index(slot), count=1)
            if SOFTMAX:
                m_new = gl.maximum(m, gl.max(s, axis=1))
                alpha = gl.exp2((m - m_new) * qk2)
                p = gl.exp2(s * qk2 - (m_new * qk2)[:, None])
                l = l * alpha + gl.sum(p, axis=1)
                m = m_new
            else:  # diagnostic: the matmuls and the pipeline alone
                p = s
            o, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
            mbarrier.arrive(v_empty.index(prev), count=1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)

        # Turn n_blocks: the last P V.
        o = o * gl.convert_layout(alpha, o_rows)[:, None]
        last = (c + n_blocks - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((c + n_blocks - 1) // STAGES) & 1)
        mbarrier.wait(turn.index(WG), (t + n_blocks) & 1, pred=PINGPONG)
        v = v_smem.index(last).reshape([BLOCK_N, HEAD_DIM])
        o_tok = warpgroup_mma(p_op, v, o, is_async=True)
        mbarrier.arrive(turn.index(1 - WG), count=1, pred=PINGPONG)
        o, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
        mbarrier.arrive(v_empty.index(last), count=1)

        o = o / gl.convert_layout(l, o_rows)[:, None]
        lse = (m * qk2 + gl.log2(l)) * 0.6931471805599453  # natural log: log2 * ln 2
        gl.store(lse_ptr + lse_row0 + WG * ROWS + gl.arange(0, ROWS, layout=row_layout), lse)
        # This warpgroup's rows of Q's buffer are free now: stage O there, write it by TMA.
        q.store(o.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [batch, start_m + WG * ROWS, q_head, 0], q_mine)
        tma.store_wait(0)

    @gluon.jit
    def _gluon_attn_fwd_kernel(q_desc, k_desc, v_desc, o_desc, lse_ptr, seqlen, num_q_heads, group, qk2,
                    n_tiles, n_bh, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, QBUF: gl.constexpr,
                    CAUSAL: gl.constexpr, PINGPONG: gl.constexpr, SOFTMAX: gl.constexpr,
                    CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        gl.static_assert(BLOCK_M == 128, "two consumer warpgroups of 64 rows")
        gl.static_assert(BLOCK_N == BLOCK_M, "only the first key block is masked")
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [2 * QBUF] + q_desc.block_type.shape,
                                           q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [QBUF, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [QBUF, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(QBUF):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)  # one arrive per consumer warpgroup
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)
            mbarrier.init(v_empty.index(i), count=2)
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        mbarrier.arrive(turn.index(0), count=1)  # warpgroup 0 takes the first turn
        fence_async_shared()

        gl.warp_specialize([
            (_consumer, (o_desc, lse_ptr, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready,
                         v_ready, k_empty, v_empty, turn, n_tiles, n_bh, num_q_heads, group,
                         seqlen, qk2,
                         0, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, QBUF, CAUSAL, PINGPONG, SOFTMAX)),
            (_consumer, (o_desc, lse_ptr, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready,
                         v_ready, k_empty, v_empty, turn, n_tiles, n_bh, num_q_heads, group,
                         seqlen, qk2,
                         1, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, QBUF, CAUSAL, PINGPONG, SOFTMAX)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty,
                         k_ready, v_ready, k_empty, v_empty, n_tiles, n_bh, num_q_heads, group,
                         seqlen,
                         BLOCK_M, BLOCK_N, STAGES, QBUF, CAUSAL)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def gluon_forward_unsupported(q, k, v, out, *, causal) -> str | None:
    """None when gluon_forward can run on these tensors, else a short reason. Cheap: no launch."""
    if q.device.type != "cuda":
        return f"tensors on {q.device.type}"
    if _GLUON_ERROR is not None:
        return _GLUON_ERROR
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return "not sm_90"
    if not causal:
        return "non-causal (the gluon forward is tuned for causal only)"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {q.dtype}"
    if not (q.dtype == k.dtype == v.dtype == out.dtype):
        return "mixed dtypes"
    d = q.shape[-1]
    if d not in CONFIGS or k.shape[-1] != d or v.shape[-1] != d:
        return f"head dim {d}"
    seqlen, block = q.shape[1], CONFIGS[d]["block"]
    if seqlen % block or k.shape[1] != seqlen or v.shape[1] != seqlen:
        return f"seq {seqlen} not a multiple of {block} (or k/v of another length)"
    if q.shape[2] % k.shape[2] or k.shape[2] != v.shape[2]:
        return "query heads not a multiple of KV heads"
    if not all(tma_aligned(t) for t in (q, k, v, out)):
        return "a stride or base not 16-byte aligned (TMA)"
    return None


def _descriptor(t, rows, d):
    block_shape = [1, rows, 1, d]
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block_shape,
                            _smem_layout(rows, d, t.dtype == torch.float16))


@functools.lru_cache(maxsize=None)
def _smem_layout(rows, d, fp16):
    # built once per block shape: ~10 us of Python each (4 descriptors a call)
    return gl.NVMMASharedLayout.get_default_for([1, rows, 1, d], gl.float16 if fp16 else gl.bfloat16)


def gluon_forward(q, k, v, out, lse, *, causal, softmax_scale, config=None) -> None:
    """Fill out [b, s, hq, d] and lse [b, hq, s] (fp32, natural log). `config` overrides
    tuned_config(d, s) (the tuning sweep uses it)."""
    b, s, hq, d = q.shape
    assert lse.is_contiguous() and lse.shape == (b, hq, s) and lse.dtype == torch.float32
    cfg = config or tuned_config(d, s)
    block = cfg["block"]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    # Q and O move in 64-row halves, one per consumer warpgroup
    descs = [_descriptor(q, 64, d), _descriptor(k, block, d), _descriptor(v, block, d),
             _descriptor(out, 64, d)]
    n_tiles = b * hq * (s // block)
    # persistent: one CTA per SM walks tiles pid, pid + grid, ... (longest rows first), so the
    # producer loads the next tile's Q and K/V while the consumers finish the current one
    ctas = cfg.get("max_ctas") or _sm_count(q.device)  # max_ctas: tests walk many tiles
    grid = min(n_tiles, ctas) if cfg.get("persistent") else n_tiles
    constexprs = dict(BLOCK_M=block, BLOCK_N=block, HEAD_DIM=d, STAGES=cfg["stages"],
                      QBUF=cfg.get("qbuf", 2 if cfg.get("persistent") else 1), CAUSAL=causal,
                      PINGPONG=cfg.get("pingpong", True), SOFTMAX=cfg.get("softmax", True),
                      CONSUMER_REGS=cfg["consumer_regs"], PRODUCER_REGS=cfg["producer_regs"])
    args = (*descs, lse, s, hq, hq // k.shape[2], scale * LOG2E, n_tiles, b * hq)
    # What Triton specializes on: the descriptors' dtype, block shape and layout (constexprs
    # and q's dtype here), lse's alignment and the value class of each int (their values).
    key = (device_index(q), q.dtype, aligned(lse), s, hq, hq // k.shape[2], n_tiles, b * hq,
           *constexprs.values())
    _launch().launch(key, (grid,), args, constexprs, num_warps=4)


@functools.lru_cache(maxsize=None)
def _launch() -> CachedLaunch:
    """The forward's compiled variants, launched without JITFunction.run's binding after the
    first call of each (kernels/fast_launch.py)."""
    return CachedLaunch(_gluon_attn_fwd_kernel)


@functools.lru_cache(maxsize=None)
def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
