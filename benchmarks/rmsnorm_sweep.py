"""The launch sweep of benchmarks/bench_rmsnorm.py: which launch configurations of
kernels/rmsnorm.py it times at a hidden size, how (GPU time of the launchers alone, each
row with the compiled kernel's registers, spills and shared memory), and the parallel
precompile of them all into Triton's cache.

Candidates: around the default (rows per program, warps, the row split or not, the hand
prefetch or Triton's pipelining, programs per SM), plus, new on 2026-12-01, chunked rows
(5120 = 5 x 1024) forward and backward and a persistent forward with the next tile's
load issued before the current tile's math (kernels/rmsnorm_configs.py says what each
field means); new after that run, the cache hints (no evict_first on the loads, y stored
.cs), the forward's packed row, one row a warp, and the TMA forward; new after
rmsnorm_h200_2026-12-01_v6.json, two passes over the row, forward and backward.
"""

from __future__ import annotations

import os
import time

import torch
import triton

from benchmarks.common import gpu_ms, relerr, tbs
from kernels import rmsnorm as ours
from kernels import rmsnorm_configs as configs

EPS = 1e-5
DTYPE = torch.bfloat16
DEVICE = "cuda"


def inputs(m, n):
    torch.manual_seed(m + n)
    x = torch.randn(m, n, device=DEVICE, dtype=DTYPE, requires_grad=True)
    w = (1 + 0.5 * torch.randn(n, device=DEVICE)).to(DTYPE).requires_grad_()
    dy = torch.randn(m, n, device=DEVICE, dtype=DTYPE)
    return x, w, dy



FORWARD_CACHES = (ours._FORWARD, ours._FORWARD_CHUNKED, ours._FORWARD_TMA, ours._FORWARD_TWO_PASS)
BACKWARD_CACHES = (ours._BACKWARD, ours._BACKWARD_CHUNKED, ours._BACKWARD_TWO_PASS)


def resources(caches, cfg) -> dict:
    """Registers per thread, spilled registers and shared memory (bytes) of the kernel
    compiled for cfg, from Triton's CompiledKernel (after its first direct launch)."""
    for cache in caches:
        for key, compiled in cache.compiled.items():
            if compiled and cfg in key:
                return dict(n_regs=compiled.n_regs, n_spills=compiled.n_spills,
                            shared=compiled.metadata.shared)
    return {}


def _chunk_widths(n_cols) -> tuple:
    """Chunk widths worth timing: those dividing a hidden size that is no power of two
    (5120 = 5 x 1024 = 10 x 512); a power of two is one chunk already."""
    if n_cols & (n_cols - 1) == 0:
        return ()
    return tuple(c for c in (1024, 512) if n_cols % c == 0 and n_cols > c)


# --------------------------------------------------------------------------- sweep


def forward_candidates(n_cols):
    """The default, rows per program x warps around it, and the row unsplit where the
    default splits it (ours.column_blocks)."""
    default = ours.forward_config(n_cols)
    block_n = triton.next_power_of_2(n_cols)
    seen = {default}
    for block_m in (1, 2, 4, 8):
        if block_m * block_n > 32768:
            continue
        for warps in (4, 8, 16):
            seen.add(ours.ForwardConfig(block_m, warps))
    if ours.column_blocks(n_cols)[1]:
        seen |= {cfg._replace(split=False) for cfg in seen}
    seen |= {default._replace(num_warps=2), default._replace(num_warps=32)}
    # Chunked rows, one tile per program; then persistent grids (the next tile's load
    # issued before this tile's math), chunked where chunks exist, else one block.
    widths = _chunk_widths(n_cols)
    for chunk in widths:
        for block_m, warps in ((1, 4), (1, 8), (2, 4), (2, 8)):
            seen.add(ours.ForwardConfig(block_m, warps, chunk=chunk))
    for block_m in sorted({1, default.block_m}):
        for warps in (4, 8):
            for programs_per_sm in (2, 4):
                seen.add(ours.ForwardConfig(block_m, warps, chunk=widths[0] if widths else 0,
                                            programs_per_sm=programs_per_sm))
    return sorted(seen | hinted_forward_candidates(n_cols) | two_pass_forward_candidates(n_cols))


def two_pass_forward_candidates(n_cols) -> set:
    """The row read twice in chunks (kernels/rmsnorm_two_pass.py; inductor's looped
    reduction, 4.26 TB/s at 8192 in rmsnorm_h200_2026-12-01_v6.json against our 4.11):
    rows per program x warps x chunk width (offline sm_90 compile at 8192: 32-48 registers,
    so up to 64 warps an SM)."""
    F = ours.ForwardConfig
    out = set()
    for block_m, warps in ((1, 4), (1, 8), (1, 16), (2, 8)):
        for chunk in (1024, 2048):
            if chunk < n_cols and block_m * chunk <= 32 * 32 * warps:  # at most 32 values a lane
                out.add(F(block_m, warps, chunk=chunk, two_pass=True))
    return out


# (evict_first, stream_store, packed) beside the plain (True, False, False)
FORWARD_HINTS = ((False, False, False), (False, True, False), (True, True, False),
                 (True, False, True), (False, False, True), (False, True, True))


def hinted_forward_candidates(n_cols) -> set:
    """The cache hints and the packed row (kernels/rmsnorm_configs.py) on the default and
    the one-row 4- and 8-warp configs (chunked where chunks divide the row), and one row a
    warp or two (no cross-warp reduction or none but one; packed: 141 and 69 registers at
    5120, offline sm_90 compile)."""
    widths = _chunk_widths(n_cols)
    chunk = widths[0] if widths else 0
    F = ours.ForwardConfig
    out = set()
    for base in {ours.forward_config(n_cols), F(1, 4, chunk=chunk), F(1, 8, chunk=chunk)}:
        for evict_first, stream_store, packed in FORWARD_HINTS:
            out.add(base._replace(evict_first=evict_first, stream_store=stream_store,
                                  packed=packed))
    for warps in (1, 2):
        if n_cols <= 160 * 32 * warps:  # at most 160 values a lane
            out |= {F(1, warps, chunk=chunk, packed=True),
                    F(1, warps, chunk=chunk, packed=True, evict_first=False)}
    # TMA: programs per SM x pipeline depth (shared memory per program about
    # stages x the tile: 5120 at 3 stages 43 KB); RMSNORM_SWEEP_NO_TMA=1 (set by
    # rmsnorm_device.sh when the TMA CUDA test failed) leaves them out
    warps = 4 if n_cols <= 5120 else 8
    for programs_per_sm in () if os.environ.get("RMSNORM_SWEEP_NO_TMA") else (1, 2, 4):
        for stages in (2, 3, 4):
            out.add(F(1, warps, chunk=chunk, programs_per_sm=programs_per_sm,
                      tma_stages=stages))
    return out


def backward_candidates(n_cols):
    """Warps, prefetch, Triton's pipelining (num_stages) instead of the hand prefetch,
    rows per tile, two programs per SM; each with the row split and unsplit where
    ours.column_blocks would split it; chunked rows where chunks divide the row."""
    default = ours.backward_config(n_cols)
    # The one-block family around the default (its block form where the default is chunked)
    base = default._replace(chunk=0, weight_in_registers=True,
                            programs_per_sm=1 if default.chunk else default.programs_per_sm)
    seen = {base}
    for warps in (8, 16, 32):
        for prefetch in (False, True):
            seen.add(base._replace(num_warps=warps, prefetch=prefetch))
        for stages in (2, 3):
            seen.add(base._replace(num_warps=warps, prefetch=False, num_stages=stages))
    for block_m in {max(1, base.block_m // 2), 2 * base.block_m}:
        seen.add(base._replace(block_m=block_m))
        seen.add(base._replace(block_m=block_m, prefetch=False, num_stages=2))
    seen.add(base._replace(programs_per_sm=2))
    seen.add(base._replace(programs_per_sm=2, prefetch=False))
    if ours.column_blocks(n_cols)[1]:
        seen |= {cfg._replace(split=not cfg.split) for cfg in seen}
    seen.add(default)
    # Chunked rows (no masked lanes, no layout conversion): registers per thread set
    # programs per SM (H200, 5120 x 1024, rmsnorm_h200_2026-12-01_chunked.json): 4 warps
    # reloading w 243 with prefetch (2 fit: 3.30 TB/s, the best), 166 without (3 fit:
    # 3.23); 8 warps with w in registers 177 (3.09), reloading w 128 (2 fit: 3.11).
    B = ours.BackwardConfig
    for chunk in _chunk_widths(n_cols):
        seen |= {B(1, 8, 1, True, chunk=chunk), B(1, 16, 1, True, chunk=chunk),
                 B(1, 8, 2, True, chunk=chunk, weight_in_registers=False),
                 B(1, 16, 1, True, chunk=chunk, weight_in_registers=False),
                 B(1, 4, 2, True, chunk=chunk, weight_in_registers=False),
                 B(1, 8, 2, False, chunk=chunk, weight_in_registers=False),
                 B(1, 4, 3, False, chunk=chunk, weight_in_registers=False),
                 B(1, 4, 4, False, chunk=chunk, weight_in_registers=False)}
    seen.add(default._replace(evict_first=False))  # the loads without their evict_first hint
    # Two passes over the row (kernels/rmsnorm_two_pass.py). Offline sm_90 compile (Triton
    # 3.9) at 8192: 128 registers at 16 warps, 174-187 at 8 (pass 2's unrolled chunks get
    # their loads hoisted), so no more programs fit than the one-pass kernel's: timed anyway.
    for warps in (8, 16):
        for chunk in (1024, 2048):
            if chunk < n_cols:
                seen.add(B(1, warps, 1, chunk=chunk, two_pass=True))
    return sorted(seen)


def blocks(n, cfg) -> dict:
    """How cfg holds a row: (block, tail) columns, or (chunk, number of chunks)."""
    if isinstance(cfg, configs.ForwardConfig):
        chunked = configs.uses_chunked_forward(cfg)
    else:
        chunked = cfg.chunk > 0
    if chunked:
        return dict(chunks=configs.chunks(n, cfg.chunk))
    return dict(block_tail=configs.column_blocks(n, cfg.split))


def sweep(m, n, x, w, dy):
    """Time each launch configuration on the launchers alone (GPU time: the host's launch
    latency would otherwise swamp the short kernels); returns rows, best of each. Each row
    carries the compiled kernel's registers, spills and shared memory.
    (Runs up to commit d64735e timed the sweep with do_bench, host latency included.)"""
    fwd_bytes, bwd_bytes = 2 * m * n * 2, 3 * m * n * 2
    rows = {"forward": [], "backward": []}
    y_ref = ours.forward(x, w, EPS).double()
    dx_ref, dw_ref = (t.double() for t in ours.backward(dy, x, w, EPS))
    for cfg in forward_candidates(n):
        try:
            ok = relerr(ours.forward(x, w, EPS, cfg), y_ref) < 1e-2  # sums regroup with warps
            ms = gpu_ms(lambda: ours.forward(x, w, EPS, cfg), reps=20)
            rows["forward"].append(dict(config=cfg._asdict(), ms=ms, tbs=tbs(fwd_bytes, ms),
                                        same=ok, **resources(FORWARD_CACHES, cfg)))
        except Exception as e:  # a config the compiler rejects (registers, shared memory)
            rows["forward"].append(dict(config=cfg._asdict(), error=repr(e)[:200]))
    for cfg in backward_candidates(n):
        try:
            dx, dw = ours.backward(dy, x, w, EPS, cfg)
            # same function; row sums regroup with warps, dw partials with the grid size
            ok = relerr(dx, dx_ref) < 1e-2 and relerr(dw, dw_ref) < 1e-2
            ms = gpu_ms(lambda: ours.backward(dy, x, w, EPS, cfg), reps=20)
            rows["backward"].append(dict(config=cfg._asdict(), ms=ms, tbs=tbs(bwd_bytes, ms),
                                         same=ok, **resources(BACKWARD_CACHES, cfg)))
        except Exception as e:
            rows["backward"].append(dict(config=cfg._asdict(), error=repr(e)[:200]))
    best = {k: max((r for r in v if r.get("same")), key=lambda r: r["tbs"]) for k, v in rows.items()}
    rows["dw_reduce"] = sweep_dw_reduce(m, n, x, w, dy)
    best["dw_reduce"] = max((r for r in rows["dw_reduce"] if r.get("same")), key=lambda r: r["tbs"],
                            default={"config": {"rows": ours.DW_REDUCE_ROWS}, "tbs": 0.0})
    return rows, best


DW_REDUCE_ROWS = (32, 64, 128, 256)  # partial rows a pass (kernels.rmsnorm.dw_reduce_plan)


def _dw_reduce_call(partial, dw, programs, n, rows):
    constexprs, warps = ours.dw_reduce_plan(programs, False, rows)
    grid = (-(-n // constexprs["BLOCK_C"]),)
    return lambda: ours._dw_reduce_kernel[grid](partial, dw, programs, n, **constexprs,
                                                num_warps=warps)


def sweep_dw_reduce(m, n, x, w, dy) -> list:
    """The dw reduction alone, GPU time, over the partials the default backward leaves
    (programs x n fp32, read once; tbs counts those bytes and dw's)."""
    cfg = ours.backward_config(n)
    ours.backward(dy, x, w, EPS, cfg)
    device = ours.device_index(x)
    programs = min(-(-m // cfg.block_m), ours._sm_count(device) * cfg.programs_per_sm)
    partial = ours._PARTIALS[(device, programs, n)]
    ref = partial.double().sum(0)
    out = []
    for rows in DW_REDUCE_ROWS:
        dw = torch.empty(n, device=x.device, dtype=DTYPE)
        try:
            fn = _dw_reduce_call(partial, dw, programs, n, rows)
            fn()
            constexprs, warps = ours.dw_reduce_plan(programs, False, rows)
            ms = gpu_ms(fn, reps=20)
            out.append(dict(config=dict(rows=rows, BLOCK_P=constexprs["BLOCK_P"],
                                        BLOCK_C=constexprs["BLOCK_C"], num_warps=warps),
                            ms=ms, tbs=tbs(programs * n * 4 + n * 2, ms), programs=programs,
                            same=relerr(dw, ref) < 1e-2))
        except Exception as e:  # noqa: BLE001 - recorded
            out.append(dict(config=dict(rows=rows), error=repr(e)[:200]))
    return out


def sweep_shape(m, n):
    x, w, dy = inputs(m, n)
    t = time.time()
    rows, best = sweep(m, n, x.detach(), w.detach(), dy)
    print(f"{m}x{n} sweep {time.time() - t:.0f}s  best fwd {best['forward']['config']} "
          f"{best['forward']['tbs']:.2f} TB/s, best bwd {best['backward']['config']} "
          f"{best['backward']['tbs']:.2f} TB/s", flush=True)
    for kind in ("forward", "backward", "dw_reduce"):
        for r in sorted(rows[kind], key=lambda r: -r.get("tbs", 0)):
            print(f"   {kind[:3]} {tuple(r['config'].values())} {r.get('tbs', 0):.2f} "
                  f"regs {r.get('n_regs')} spills {r.get('n_spills')} "
                  f"{r.get('error', '')[:60]}", flush=True)
    return rows, best


def precompile(part: int, parts: int, shapes) -> None:
    """Compile every sweep candidate whose index % parts == part on small inputs (the
    kernels do not specialize on row counts), filling Triton's cache for the timed run;
    run as several processes beside each other."""
    jobs = []
    for _, n in shapes:
        x, w, dy = (t.detach()[:64] for t in inputs(64, n))
        jobs += [(ours.forward, (x, w, EPS, cfg)) for cfg in forward_candidates(n)]
        jobs += [(ours.backward, (dy, x, w, EPS, cfg)) for cfg in backward_candidates(n)]
        programs = ours._sm_count(0)  # one backward program per SM: the defaults' partials
        partial = torch.zeros(programs, n, device=DEVICE)
        dw = torch.empty(n, device=DEVICE, dtype=DTYPE)
        jobs += [(_dw_reduce_call(partial, dw, programs, n, rows), ()) for rows in DW_REDUCE_ROWS]
    # TMA launches last in each worker: a fault there loses only what is left after it
    mine = sorted(jobs[part::parts],
                  key=lambda job: bool(job[1] and getattr(job[1][-1], "tma_stages", 0)))
    for fn, args in mine:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - the timed run records it
            print("precompile", args[-1] if args else fn, repr(e)[:120], flush=True)
    torch.cuda.synchronize()

