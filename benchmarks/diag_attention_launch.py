"""Launch costs of the attention kernels: host time per forward call, and the price of
running the DQ_STASH backward in chunks of heads.

    GIT_COMMIT=<sha> python -m benchmarks.diag_attention_launch --out $OUT/attention_launch.json

For each of the issue's shapes and each forward (ours as every caller gets it, ours with the
Triton-language kernels, flash-attn-4 when installed): host microseconds per call (the
Python call alone, the GPU left to run behind it: N calls timed by the host clock, then one
synchronize outside the timing), GPU microseconds per call (CUDA events around N
back-to-back calls), and the top functions of a cProfile of ours' calls. A call whose host
time nears its GPU time starves the GPU between calls, in do_bench and in eager training.

`scratch`: where the default backward stores dS (kernels.attention.DKDV_STASH_CONFIGS), its
median time (do_bench, L2 flushed) with the dS scratch capped at each of SCRATCH_CAPS bytes
(smaller caps: more, smaller launches), the chunk count each cap gives.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from benchmarks import common
from benchmarks.common import attention_inputs, write_json

CALLS = 200
SCRATCH_CAPS = (256 << 20, 1 << 30, 8 << 30)


def _host_us(fn, calls=CALLS):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host


def _gpu_us(fn, calls=CALLS):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls * 1e3


def _profile(fn, calls=50, top=12):
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue().splitlines()[-(top + 2):]


def main():
    from kernels import attention as A
    from kernels import attention_fa4

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/attention_host.json")
    args = parser.parse_args()
    results = dict(common.provenance(), calls=CALLS, rows=[])
    fa4 = attention_fa4.flash_attn_func() if attention_fa4.installed() else None
    for b, hq, hkv, s, d in common.ATTENTION_SHAPES:
        q, k, v, _ = attention_inputs(b, hq, hkv, s, d, seed=1)
        fns = {"ours": lambda: A.flash_attention(q, k, v),
               "ours_triton": lambda: A.flash_attention(q, k, v, impl="triton")}
        if fa4 is not None:
            fns["flash_attn_4"] = lambda: fa4(q, k, v, causal=True)[0]
        row = dict(shape=[b, hq, hkv, s, d], impls=A.attention_impls(q, k, v))
        for name, fn in fns.items():
            for _ in range(5):
                fn()
            row[name] = dict(host_us=_host_us(fn), gpu_us=_gpu_us(fn))
        row["ours_profile"] = _profile(fns["ours"])
        print("host", row["shape"], {n: row[n] for n in fns}, flush=True)
        if d in A.DKDV_STASH_CONFIGS:
            row["scratch"] = _scratch_costs(A, q, k, v)
            print("scratch", row["shape"], row["scratch"], flush=True)
        results["rows"].append(row)
    write_json(args.out, results)


def _scratch_costs(A, q, k, v):
    from triton.testing import do_bench

    from core.choices import ds_stash_heads

    b, s, hq, d = q.shape
    scale = d ** -0.5
    out, lse = A.attention_forward(q, k, v, causal=True, softmax_scale=scale)
    do = torch.randn_like(out)
    kv_heads, group = b * k.shape[2], hq // k.shape[2]
    rows = []
    for cap in SCRATCH_CAPS:
        ms = do_bench(lambda cap=cap: A.attention_backward(
            do, q, k, v, out, lse, causal=True, softmax_scale=scale, ds_scratch_bytes=cap),
            warmup=10, rep=60, return_mode="median")
        chunk = ds_stash_heads(kv_heads, group, s, q.element_size(), cap)
        rows.append(dict(cap_bytes=cap, chunks=-(-kv_heads // chunk) if chunk else 0, bwd_ms=ms))
    return rows


if __name__ == "__main__":
    main()
