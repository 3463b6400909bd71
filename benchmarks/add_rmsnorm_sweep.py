"""The fused residual add + RMSNorm (kernels/add_rmsnorm.py) at llama_1b3's hidden size, for
benchmarks/bench_rmsnorm.py: the forward, and the backward (the dw reduction included) under
each launch configuration, the configuration in use when the run started ("old") among
them, all in one process. GPU time, L2 flushed before each rep (benchmarks.common.gpu_ms).

Shapes: 32768 x 2048 (mbs 16: one step's 47 calls in the 2026-12-01 H200 profile took
5.94 ms forward, 8.64 ms backward and 1.70 ms in the dw reduction) and 2048 x 2048 (mbs 1:
the same 47 norms x 16 micro-batches). Bytes a fused kernel must move, bf16:
forward = read a, r + write h, y = 4 * M * H * 2; backward = read dy, h, dh_in + write dh =
4 * M * H * 2 (rstd, w and the dw partials uncounted: their share is in the time).
"""

from __future__ import annotations

import torch

from benchmarks.common import gpu_ms, relerr, tbs
from kernels import add_rmsnorm

SHAPES = ((32768, 2048), (2048, 2048))
EPS = 1e-5
CALLS_PER_STEP = 47  # llama_1b3: 24 layers' add+norm forward and backward, the profile's count
# (rows a tile, warps). Offline sm_90 compile (Triton 3.9), registers without / with the
# prefetch: (1, 4) 138 / 218, (1, 8) 73 / 117, (1, 16) 40 / 59, (2, 8) 127 / 169, (2, 16)
# 80 / 101, (4, 16) 108 / 128 + spills; the row-loop kernel 167 at 4 warps (3 programs an SM).
TILES = ((1, 4), (1, 8), (1, 16), (2, 8), (2, 16), (4, 16))
REDUCE_ROWS = (0, 128, 256, 512)  # the dw reduction's partial rows a pass (0: the old plan)


def inputs(m, n):
    gen = torch.Generator(device="cuda").manual_seed(m + n)
    make = lambda: torch.randn(m, n, device="cuda", generator=gen).to(torch.bfloat16)  # noqa: E731
    a, r, dh_in, dy = make(), make(), make(), make()
    w = (1 + 0.5 * torch.randn(n, device="cuda", generator=gen)).to(torch.bfloat16)
    return a, r, w, dh_in, dy


def candidates(n) -> list:
    """The config in use (old) first, then the persistent tile kernel: rows a tile x warps x
    programs per SM x prefetch, each with dw_reduce_plan's 256-row passes."""
    B = add_rmsnorm.BackwardConfig
    out = [add_rmsnorm.backward_config(n), B(add_rmsnorm.ROWS, add_rmsnorm._warps(n))]
    for block_m, warps in TILES:
        for programs_per_sm in (1, 2, 4):
            for prefetch in (True, False):
                out.append(B(block_m, warps, programs_per_sm, prefetch, 256))
    return list(dict.fromkeys(out))


def _time_backward(args, cfg, nbytes, ref) -> dict:
    dy, dh_in, h, w, rstd = args
    row = dict(config=cfg._asdict())
    try:
        dh, dw = add_rmsnorm.backward(dy, dh_in, h, w, rstd, config=cfg)
        again = add_rmsnorm.backward(dy, dh_in, h, w, rstd, config=cfg)
        row["same"] = relerr(dh, ref[0]) < 1e-2 and relerr(dw, ref[1]) < 1e-2
        row["bitwise_repeatable"] = torch.equal(dh, again[0]) and torch.equal(dw, again[1])
        row["ms"] = gpu_ms(lambda: add_rmsnorm.backward(dy, dh_in, h, w, rstd, config=cfg), reps=20)
        row["tbs"] = tbs(nbytes, row["ms"])
    except Exception as e:  # noqa: BLE001 - a config the compiler rejects: recorded
        row["error"] = repr(e)[:200]
    return row


def measure(m, n) -> dict:
    a, r, w, dh_in, dy = inputs(m, n)
    nbytes = 4 * m * n * 2
    out = dict(rows=m, hidden=n, bytes_fwd=nbytes, bytes_bwd=nbytes)
    fwd_ms = gpu_ms(lambda: add_rmsnorm.forward(a, r, w, EPS), reps=20)
    out["forward"] = dict(ms=fwd_ms, tbs=tbs(nbytes, fwd_ms))
    h, _, rstd = add_rmsnorm.forward(a, r, w, EPS)
    args = (dy, dh_in, h, w, rstd)
    old = add_rmsnorm.backward_config(n)
    ref = tuple(t.double() for t in add_rmsnorm.backward(*args, config=old))
    rows = [_time_backward(args, cfg, nbytes, ref) for cfg in candidates(n)]
    best = max((x for x in rows if x.get("same") and x.get("bitwise_repeatable")), key=lambda x: x["tbs"])
    best_cfg = add_rmsnorm.BackwardConfig(**best["config"])
    for reduce_rows in REDUCE_ROWS:  # the reduction's plans under the best backward
        cfg = best_cfg._replace(reduce_rows=reduce_rows)
        if cfg != best_cfg:
            rows.append(_time_backward(args, cfg, nbytes, ref))
    best = max((x for x in rows if x.get("same") and x.get("bitwise_repeatable")), key=lambda x: x["tbs"])
    old_row = rows[0]
    out.update(backward=rows, old=old_row, best=best,
               saved_us_per_call=(old_row["ms"] - best["ms"]) * 1e3,
               saved_ms_per_step=(old_row["ms"] - best["ms"]) * CALLS_PER_STEP * (32768 // m))
    print(f"add+norm {m}x{n} fwd {fwd_ms * 1e3:.1f} us {out['forward']['tbs']:.2f} TB/s | bwd old "
          f"{old_row['ms'] * 1e3:.1f} us {old_row['tbs']:.2f} TB/s, best {best['ms'] * 1e3:.1f} us "
          f"{best['tbs']:.2f} TB/s {tuple(best['config'].values())}: "
          f"{out['saved_ms_per_step']:.2f} ms a step", flush=True)
    for x in sorted(rows, key=lambda x: -x.get("tbs", 0))[:8]:
        print(f"   bwd {tuple(x['config'].values())} {x.get('tbs', 0):.2f} {x.get('error', '')[:60]}",
              flush=True)
    return out


def precompile(part: int, parts: int) -> None:
    """Compile every candidate whose index % parts == part (the real shapes: the row-loop
    kernel's ROWS follows the row count)."""
    jobs = [(m, n, cfg) for m, n in SHAPES for cfg in candidates(n)]
    jobs += [(m, n, add_rmsnorm.BackwardConfig(1, 4, 1, True, rows)) for m, n in SHAPES for rows in REDUCE_ROWS]
    for m, n, cfg in jobs[part::parts]:
        a, r, w, dh_in, dy = inputs(m, n)
        h, _, rstd = add_rmsnorm.forward(a, r, w, EPS)
        try:
            add_rmsnorm.backward(dy, dh_in, h, w, rstd, config=cfg)
        except Exception as e:  # noqa: BLE001 - the timed run records it
            print("precompile", cfg, repr(e)[:120], flush=True)
    torch.cuda.synchronize()
