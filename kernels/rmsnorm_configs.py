"""Launch configurations of the RMSNorm kernels (kernels/rmsnorm.py, kernels/rmsnorm_chunked.py):
the config types, the tuned tables and the heuristics for other hidden sizes.

A row of H columns is held in registers in one of three ways:
  * one power-of-two block (`split=False`, `chunk=0`): 8192 lanes for H = 5120, 3/8 masked;
  * a block plus a power-of-two tail (`split=True`, `chunk=0`; 5120 = 4096 + 1024): two
    tensors of different shapes, so their row sums meet through a layout conversion;
  * `chunk` > 0: ceil(H / chunk) chunks of `chunk` columns each, unrolled at compile time
    (5120 = 5 x 1024): same-shaped tensors, no conversion, nothing masked where chunk
    divides H (kernels/rmsnorm_chunked.py).
`programs_per_sm` > 0 in a ForwardConfig makes the forward persistent (SMs x that many
programs walk row tiles, each loading the next tile before working on the current one);
0 is one program per row tile. Both new forms run the chunked kernels.

Cache hints and packed rows (new after rmsnorm_h200_2026-12-01_chunked.json, where every
kernel loaded with evict_first, never timed against no hint): `evict_first=False` loads
without an eviction hint; a forward's `stream_store` writes y with .cs (streaming);
a forward's `packed` keeps the loaded 16-bit row across the reduction instead of its fp32
copy (offline sm_90 compile, Triton 3.6, 5120 as 5 x 1024 at 4 warps: 40 registers
instead of 61, so 12 programs fit an SM instead of 8). A forward with any of them runs the
chunked kernel (chunk 0: the row as one power-of-two chunk). `tma_stages` > 0 runs the
TMA forward (kernels/rmsnorm_kernels.py: row tiles by tensor descriptors into shared
memory, pipelined that many stages deep, persistent over `programs_per_sm`; offline sm_90
compile at 5120, 4 warps, 3 stages: 71 registers, 43 KB shared); rows whose stride is not
16-byte aligned fall back to the chunked kernel with the same other fields.
`two_pass` (forward and backward, new after rmsnorm_h200_2026-12-01_v6.json) runs
kernels/rmsnorm_two_pass.py: the row read twice chunk by chunk (statistics, then output),
registers holding a chunk instead of the row; the backward one persistent over
`programs_per_sm`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import triton


class ForwardConfig(NamedTuple):
    block_m: int  # rows per program (per tile, when persistent)
    num_warps: int
    split: bool = True  # a row as BLOCK_N + a tail where one power of two wastes >= 1/4
    chunk: int = 0  # > 0: the row as chunks of this many columns (chunked kernel)
    programs_per_sm: int = 0  # > 0: persistent grid, next tile prefetched (chunked kernel)
    evict_first: bool = True  # x loaded with the evict_first hint, else with none
    stream_store: bool = False  # y stored with .cs (streaming) instead of the default .wb
    packed: bool = False  # the row held in its 16-bit form from the load to the store
    tma_stages: int = 0  # > 0: the TMA kernel, loads pipelined this many stages deep
    two_pass: bool = False  # the row read twice in chunks of `chunk` (default 1024)


class BackwardConfig(NamedTuple):
    block_m: int  # rows per loop iteration
    num_warps: int
    programs_per_sm: int  # persistent grid = SMs * programs_per_sm (capped by row tiles)
    prefetch: bool = False  # load the next row tile before computing this one
    num_stages: int = 1  # 2, 3: no change on the H200 (Triton 3.6 leaves these loads alone)
    split: bool = False  # the forward's split; slower here at 5120 (see BACKWARD_TABLE)
    chunk: int = 0  # > 0: the row as chunks of this many columns (chunked kernel)
    weight_in_registers: bool = True  # chunked kernel: w held across rows, else reloaded (L1)
    evict_first: bool = True  # dy, x loaded with the evict_first hint, else with none
    two_pass: bool = False  # the row read twice in chunks of `chunk` (default 1024)


TWO_PASS_CHUNK = 1024  # a two-pass config's chunk width where its `chunk` is 0


def two_pass_chunks(n_cols: int, chunk: int) -> tuple:
    """(CHUNK, N_CHUNKS) of the two-pass kernels (kernels/rmsnorm_two_pass.py)."""
    return chunks(n_cols, min(chunk or TWO_PASS_CHUNK, triton.next_power_of_2(n_cols)))


def uses_chunked_forward(cfg: ForwardConfig) -> bool:
    return (cfg.chunk > 0 or cfg.programs_per_sm > 0 or not cfg.evict_first
            or cfg.stream_store or cfg.packed or cfg.tma_stages > 0)


def _pow2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


@functools.lru_cache(maxsize=None)
def column_blocks(n_cols: int, split: bool = True) -> tuple:
    """(BLOCK_N, BLOCK_T): one power of two covering the row, or, where that leaves a
    quarter or more of it masked, the largest power of two below H plus a power-of-two tail
    (5120 -> 4096 + 1024; 6656 stays 8192: 81% used)."""
    full = triton.next_power_of_2(n_cols)
    if not split or n_cols > full * 3 // 4 or n_cols <= 16:
        return full, 0
    return full // 2, triton.next_power_of_2(n_cols - full // 2)


@functools.lru_cache(maxsize=None)
def chunks(n_cols: int, chunk: int) -> tuple:
    """(CHUNK, N_CHUNKS) of the chunked kernels: chunk 0 means one chunk of the whole
    power-of-two block."""
    if chunk <= 0:
        return triton.next_power_of_2(n_cols), 1
    if chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    return chunk, -(-n_cols // chunk)


# Tuned launch configurations: the winners of the launch sweep of bench_rmsnorm --tune on
# the H200, bf16 (benchmarks/results/rmsnorm_h200_2026-12-01_v7.json, commit 5979bbb, GPU
# time, TB/s of the bytes a fused kernel must move, L2 flushed), which timed them as the
# defaults. Forward: the two-pass kernel won at every size (8192 252 us = 4.26 TB/s against
# the one-pass packed row's 261, 1.02x a copy; 4096 67.4 us; 5120 44.5 us; 2048 at 32768
# rows 67.3 us against the heuristic's 73.3): registers hold a chunk (32-48 offline at
# sm_90), so SMs hold many programs. Before it (_v6.json, 5699fec): dropping the loads'
# evict_first hint gained at every size, the packed row at 5120, one row a warp at 4096;
# neither .cs stores nor the TMA forward won anywhere. Backward: no hint at 8192 (4.02
# TB/s) and 4096; at 5120 the row as ten 512-column chunks, w reloaded, 3 programs an SM
# (v6's pick, five 1024 chunks at 2 an SM, came second); at 2048 (llama_1b3's input and
# final norms, 32768 rows) 4 rows a tile at 8 warps with the prefetch, 115 us against the
# heuristic's (4, 16) 221 us. The two-pass backward did not win (pass 2's unrolled chunks
# get their loads hoisted: 128 registers at 16 warps, no more programs an SM).
# Other sizes use the heuristics below (unchanged: they keep the evict_first hint).
FORWARD_TABLE = {
    2048: ForwardConfig(1, 4, chunk=1024, two_pass=True),  # 3.99 TB/s at 32768 rows
    4096: ForwardConfig(1, 8, chunk=2048, two_pass=True),  # 3.99
    5120: ForwardConfig(1, 4, chunk=2048, two_pass=True),  # 3.77
    8192: ForwardConfig(1, 16, chunk=2048, two_pass=True),  # 4.26
}
BACKWARD_TABLE = {
    2048: BackwardConfig(4, 8, 1, prefetch=True),  # 3.49 (evict_first kept, as measured)
    4096: BackwardConfig(2, 16, 1, prefetch=True, evict_first=False),  # 3.63
    5120: BackwardConfig(1, 4, 3, chunk=512, weight_in_registers=False),  # 3.27
    8192: BackwardConfig(1, 16, 1, prefetch=True, evict_first=False),  # 4.02
}

# dw reduction (kernels.rmsnorm.dw_reduce_plan): partial rows summed per pass. The
# reduction alone over 132 partials (L2 flushed; rmsnorm_h200_2026-12-01_chunked.json, and
# again in _v6.json and _v7.json): 256 rows 6.5-7.4 us (v6: 6.5-8.2, v7: 6.4-8.4), 32 rows
# (the plan before) 8.6-9.5 us (v6: 8.4-12.9), at H = 4096, 5120, 8192.
DW_REDUCE_ROWS = 256


@functools.lru_cache(maxsize=None)
def forward_config(n_cols: int) -> ForwardConfig:
    """The table's entry, else: one row per program for wide rows, short rows share one
    (>= 4096 elements a program); warps so each thread holds about 16 live elements (two
    16-byte bf16 loads), 4 to 16.

    Measured on H100, bf16 (benchmarks/results/rmsnorm_h100_2026-11-23*.json sweeps): 4, 8
    and 16 warps land within 2% of each other at H = 4096..16384; 32 warps lose 5-30%.
    """
    if n_cols in FORWARD_TABLE:
        return FORWARD_TABLE[n_cols]
    block_m = max(1, min(16, 4096 // triton.next_power_of_2(n_cols)))
    return ForwardConfig(block_m, max(4, min(16, _pow2_at_most(block_m * n_cols // 512))))


@functools.lru_cache(maxsize=None)
def backward_config(n_cols: int) -> BackwardConfig:
    """The table's entry, else: one program per SM, 16 warps, walking tiles of 8192 elements
    (2 rows of 4096, one of 5120..8192) with the next tile prefetched.

    Measured on H100, bf16: prefetch, one program per SM beat 2 per SM without it by 5-10%
    (registers bound occupancy); 2 rows of 4096 beat 1 by 10%; 32 warps spill at H = 6656;
    H = 16384 has no room for a prefetched copy (2.1 TB/s without, 0.2 with: spills).
    """
    if n_cols in BACKWARD_TABLE:
        return BACKWARD_TABLE[n_cols]
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, min(16, 8192 // block_n))
    return BackwardConfig(block_m, 16, 1, prefetch=block_m * block_n <= 8192)
