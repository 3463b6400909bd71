"""Block-config sweep of the fused attention kernels on one GPU; winners go to a JSON file.

    GIT_COMMIT=<sha> python -m benchmarks.tune_attention --out $OUT/attention_tune.json \
        --winners-out /tmp/attention_winners.json [--compile-only]

Each candidate (block sizes, warps, stages, tensor-descriptor loads, warp specialization) of
each kernel (forward, dK/dV, dQ, the dK/dV kernel that also adds dQ for deterministic=False
with element-wise atomics or bulk tensor reduce-adds, and the DQ_STASH pair: the dK/dV
kernel that stores dS and the dQ = dS K kernel) is first compiled in its own worker process: a compiler abort then
costs that config only, and Triton's on-disk cache serves the timing process. The worker
reports the compiled kernel's registers and spills (Triton's n_regs, n_spills). Then each
config that compiled is timed (bf16, causal, do_bench median) at the tune shapes, checked
against SDPA-flash's result, and the fastest correct one per kernel and head dim wins.
`--compile-only` stops after the compile phase; `--compiled FILE` (that run's --out) then
times without compiling again.
bench_attention.py --configs FILE installs the winners before it measures.

TFLOP/s per kernel: forward counts 2*b*hq*s^2*d (causal); dK/dV and dQ count half the
backward's 2.5x each (so do the DQ_STASH pair's two); the dK/dV kernels that add dQ count
the whole 2.5x. The faster of atomics and reduce-adds wins deterministic=False's slot; the
DQ_STASH pair replaces the dK/dV + dQ pair only where its total is lower.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import (
    attention_flops_fwd,
    attention_inputs,
    error_tail,
    provenance,
    relerr,
    write_json,
)

TUNE_SHAPES = {128: [(8, 16, 16, 2048, 128), (4, 32, 8, 4096, 128)],
               64: [(16, 32, 32, 1024, 64)]}
KINDS = ("fwd", "dkdv", "dq", "dkdv_atomic", "dkdv_tma", "dkdv_stash", "dq_ds",
         "fwd_nosoftmax")
WORK = {"fwd": 1.0, "dkdv": 1.25, "dq": 1.25, "dkdv_atomic": 2.5,  # x forward FLOPs
        "dkdv_tma": 2.5, "dkdv_stash": 1.25, "dq_ds": 1.25, "fwd_nosoftmax": 1.0}
# A diagnostic, never a winner: the forward's loads and two matmuls without the online
# softmax between them (NO_SOFTMAX), the ceiling of this kernel's pipeline as it is.
DIAGNOSTIC = {"fwd_nosoftmax"}


def _cfg(bm, bn, w, s, tma, ws=False, extra=None):
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, tma=tma, WARP_SPEC=ws,
                **(extra or {}))


# The forward's variants (kernels/attention_fwd.py): P = PIPELINE (block j-1's P V deferred
# under block j's softmax), S = SUBTILE (two query half-tiles in turn); maxnreg caps registers.
# The backward's: D = DEFER (each block's dK or dQ matmul issued one iteration late).
P, S, D = dict(PIPELINE=True), dict(SUBTILE=True), dict(DEFER=True)
# The dK/dV kernel's part in dQ: R = bulk tensor reduce-add (TMA), Z = stores dS (DQ_STASH).
R, Z = dict(DQ_TMA=True), dict(DS_STASH=True)


def candidates(kind, d):
    """fwd/dq: BLOCK_M query rows held, BLOCK_N key rows streamed; dkdv: BLOCK_N key rows
    held, BLOCK_M query rows streamed. (bm, bn, warps, stages, tma, warp-specialized,
    extra config keys)."""
    table = {
        ("fwd", 128): [(128, 64, 8, 3, False), (128, 64, 8, 4, False), (128, 128, 8, 3, True),
                       (128, 64, 8, 3, False, False, P), (128, 64, 8, 4, False, False, P),
                       (128, 64, 8, 3, True, False, P), (128, 128, 8, 3, True, False, P),
                       (128, 64, 8, 2, False, False, P), (128, 64, 8, 3, False, False, S),
                       (128, 64, 4, 3, False, False, S), (128, 64, 8, 3, True, False, S),
                       (128, 64, 4, 3, False, False, dict(S, maxnreg=168))],
        ("dkdv", 128): [(32, 64, 4, 3, False), (32, 64, 4, 3, True), (32, 128, 8, 3, True),
                        (32, 64, 4, 3, False, False, D), (32, 64, 4, 3, True, False, D),
                        (32, 128, 8, 3, True, False, D), (64, 128, 8, 3, True, False, D),
                        (32, 64, 4, 2, False, False, D)],
        ("dq", 128): [(128, 32, 8, 3, True, True), (128, 32, 8, 3, True), (128, 32, 8, 3, False),
                      (128, 32, 8, 3, True, False, D), (128, 32, 8, 3, False, False, D),
                      (128, 64, 8, 3, True, False, D), (128, 64, 8, 2, False, False, D)],
        ("dkdv_atomic", 128): [(64, 128, 8, 3, True), (32, 64, 4, 3, True), (32, 64, 4, 3, False),
                               (32, 128, 8, 3, True), (16, 64, 4, 3, True),
                               (64, 128, 8, 2, True)],
        ("dkdv_tma", 128): [(32, 128, 8, 3, True, False, R), (64, 128, 8, 3, True, False, R),
                            (64, 128, 8, 2, True, False, R), (32, 128, 8, 4, True, False, R),
                            (32, 64, 4, 3, True, False, R), (16, 64, 4, 3, True, False, R)],
        ("dkdv_stash", 128): [(32, 64, 4, 3, False, False, Z), (32, 64, 4, 3, True, False, Z),
                              (32, 128, 8, 3, True, False, Z), (32, 128, 8, 3, False, False, Z),
                              (64, 128, 8, 3, True, False, Z), (32, 64, 4, 2, False, False, Z)],
        ("dq_ds", 128): [(128, 64, 8, 3, True), (128, 64, 8, 4, True), (128, 128, 8, 3, True),
                         (64, 64, 4, 3, True), (128, 64, 4, 3, True), (128, 32, 8, 4, True),
                         (128, 64, 8, 3, False)],
        ("fwd_nosoftmax", 128): [(128, 64, 8, 3, False), (128, 64, 8, 3, False, False, P)],
        ("fwd_nosoftmax", 64): [(128, 64, 8, 4, False)],
        ("fwd", 64): [(128, 64, 8, 4, False), (128, 64, 8, 3, False),
                      (128, 64, 8, 4, False, False, P), (128, 64, 8, 3, False, False, P),
                      (128, 128, 8, 3, False, False, P), (128, 64, 8, 4, False, False, S),
                      (128, 64, 4, 4, False, False, S), (128, 128, 8, 3, False, False, S)],
        ("dkdv", 64): [(32, 128, 4, 3, False), (64, 128, 8, 3, False),
                       (32, 128, 4, 3, False, False, D), (64, 128, 8, 3, False, False, D),
                       (32, 64, 4, 3, False, False, D)],
        ("dq", 64): [(128, 64, 8, 3, False), (128, 64, 8, 4, False),
                     (128, 64, 8, 3, False, False, D), (128, 32, 8, 3, False, False, D)],
        ("dkdv_atomic", 64): [(32, 128, 4, 3, False), (64, 128, 8, 3, False),
                              (32, 64, 4, 3, False), (64, 128, 8, 3, True)],
        ("dkdv_tma", 64): [(32, 128, 4, 3, True, False, R), (64, 128, 8, 3, True, False, R),
                           (32, 64, 4, 3, True, False, R), (64, 128, 8, 2, True, False, R)],
        ("dkdv_stash", 64): [(32, 128, 4, 3, False, False, Z), (64, 128, 8, 3, False, False, Z),
                             (32, 64, 4, 3, False, False, Z), (32, 128, 4, 3, True, False, Z)],
        ("dq_ds", 64): [(128, 64, 8, 3, True), (128, 128, 8, 3, True), (64, 64, 4, 4, True),
                        (128, 64, 4, 4, True), (128, 128, 8, 4, True)],
    }
    return [_cfg(*c) for c in table[(kind, d)]]


class KernelRun:
    """Inputs and intermediates for timing one kernel of one shape with one config."""

    def __init__(self, shape):
        from kernels.attention import attention_forward
        from kernels.attention_bwd import launch_delta

        self.shape = shape
        b, hq, hkv, s, d = shape
        self.q, self.k, self.v, self.do = attention_inputs(b, hq, hkv, s, d)
        self.scale = 1 / math.sqrt(d)
        # A plain pointer-path config for the setup, so a failing candidate fails alone.
        self.o, self.lse = attention_forward(self.q, self.k, self.v, causal=True,
                                             softmax_scale=self.scale,
                                             config=_cfg(64, 64, 4, 3, False))
        self.delta = torch.empty_like(self.lse)
        launch_delta(self.o, self.do, self.delta)
        self.dq = torch.empty_like(self.q)
        self.dk, self.dv = torch.empty_like(self.k), torch.empty_like(self.v)
        self.dq_acc = torch.zeros(self.q.shape, dtype=torch.float32, device="cuda")
        self.ds, self.ds_filled = None, False  # the dS scratch, made on first use (stash)

    def fn(self, kind, cfg):
        from kernels import attention as A
        from kernels.attention_bwd import DQ_STASH, DQ_TMA, launch_dkdv
        from kernels.attention_dq import launch_dq
        from kernels.attention_dq_ds import launch_dq_ds

        if kind in ("fwd", "fwd_nosoftmax"):
            cfg = dict(cfg, NO_SOFTMAX=kind == "fwd_nosoftmax")
            return lambda: A.attention_forward(self.q, self.k, self.v, causal=True,
                                               softmax_scale=self.scale, config=cfg)[0]
        tma = A._use_tma(cfg, self.q, self.k, self.v, self.do)
        common = (self.q, self.k, self.v, self.do, self.lse, self.delta)
        kw = dict(causal=True, softmax_scale=self.scale, config=cfg, use_tma=tma)
        if kind == "dkdv":
            return lambda: launch_dkdv(*common, self.dk, self.dv, **kw)
        if kind == "dq":
            return lambda: launch_dq(*common, self.dq, **kw)

        if kind == "dkdv_stash":
            return lambda: launch_dkdv(*common, self.dk, self.dv, dq_acc=self.stash(),
                                       mode=DQ_STASH, **kw)
        if kind == "dq_ds":
            ds = self.stash(filled=True)
            tma = A._use_tma(cfg, self.q, self.k, ds)
            return lambda: launch_dq_ds(ds, self.k, self.dq, heads=(0, ds.shape[0]),
                                        causal=True, softmax_scale=self.scale, config=cfg,
                                        use_tma=tma)
        if kind == "dkdv_tma" and not tma:
            raise ValueError("dkdv_tma needs a config with tma=True")

        def atomic():  # what deterministic=False runs after the delta kernel
            self.dq_acc.zero_()
            launch_dkdv(*common, self.dk, self.dv, dq_acc=self.dq_acc,
                        mode=DQ_TMA if kind == "dkdv_tma" else None, **kw)
            self.dq.copy_(self.dq_acc.mul_(self.scale))
        return atomic

    def stash(self, filled=False):
        """The dS scratch of all heads; `filled`: by a plain-pointer DQ_STASH dK/dV run."""
        from core.choices import ds_stash_stride
        from kernels.attention_bwd import DQ_STASH, launch_dkdv

        if self.ds is None:
            b, hq, _, s, _ = self.shape
            self.ds = torch.empty((b * hq, s, ds_stash_stride(s)), dtype=self.q.dtype, device="cuda")
        if filled and not self.ds_filled:
            launch_dkdv(self.q, self.k, self.v, self.do, self.lse, self.delta, self.dk, self.dv,
                        causal=True, softmax_scale=self.scale, use_tma=False,
                        config=_cfg(32, 64, 4, 3, False, extra=Z), dq_acc=self.ds, mode=DQ_STASH)
            self.ds_filled = True
        return self.ds

    def outputs(self, kind):
        return {"fwd": [], "fwd_nosoftmax": [], "dkdv": ["dk", "dv"], "dq": ["dq"],
                "dkdv_atomic": ["dk", "dv", "dq"], "dkdv_tma": ["dk", "dv", "dq"],
                "dkdv_stash": ["dk", "dv"], "dq_ds": ["dq"]}[kind]


def _kernel_of(kind):
    from kernels import attention_bwd, attention_dq, attention_dq_ds, attention_fwd

    return {"fwd": attention_fwd._fwd_kernel, "fwd_nosoftmax": attention_fwd._fwd_kernel,
            "dq": attention_dq._dq_kernel,
            "dq_ds": attention_dq_ds._dq_ds_kernel}.get(kind, attention_bwd._dkdv_kernel)


def compile_one(kind, cfg, shape) -> dict:
    """Worker: compile and run one config once; its registers and spills."""
    try:
        run = KernelRun(shape)
        jit = _kernel_of(kind)
        before = {id(k) for cache in jit.device_caches.values() for k in cache[0].values()}
        run.fn(kind, cfg)()
        torch.cuda.synchronize()
        new = [k for cache in jit.device_caches.values() for k in cache[0].values()
               if id(k) not in before]
        return dict(n_regs=max((k.n_regs for k in new), default=None),
                    n_spills=max((k.n_spills for k in new), default=None),
                    shared_bytes=max((k.metadata.shared for k in new), default=None))
    except Exception as e:  # noqa: BLE001 - reported in the sweep table
        return dict(error=error_tail(e))


def _compile_in_subprocess(task):
    kind, cfg, shape = task
    proc = subprocess.run([sys.executable, "-m", "benchmarks.tune_attention", "--compile-one",
                           json.dumps([kind, cfg, shape])], capture_output=True, text=True,
                          timeout=300)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return dict(error=f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-600:]}")
    return json.loads(lines[-1])


def precompile(workers, kinds=KINDS):
    tasks = [(kind, cfg, TUNE_SHAPES[d][0]) for d in TUNE_SHAPES for kind in kinds
             for cfg in candidates(kind, d)]
    t0 = time.time()
    with futures.ThreadPoolExecutor(max_workers=workers) as pool:
        reports = list(pool.map(_compile_in_subprocess, tasks))
    print(f"compiled {len(tasks)} configs in {time.time() - t0:.0f}s", flush=True)
    return {json.dumps([k, c, d]): r for (k, c, (*_, d)), r in zip(tasks, reports)}


def _sdpa_reference(run):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (t.transpose(1, 2).detach().requires_grad_() for t in (run.q, run.k, run.v))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    o.backward(run.do.transpose(1, 2))
    return dict(fwd=o.transpose(1, 2).detach(), dq=q.grad.transpose(1, 2),
                dk=k.grad.transpose(1, 2), dv=v.grad.transpose(1, 2))


def time_configs(compiled, kinds=KINDS):
    """Time every config that compiled; (table, winners {d: {kind: cfg}})."""
    from triton.testing import do_bench

    table, winners = [], {}
    for d, shapes in TUNE_SHAPES.items():
        totals = {}
        runs = [KernelRun(shape) for shape in shapes]
        refs = [_sdpa_reference(run) for run in runs]
        for kind in kinds:
            best = None
            for cfg in candidates(kind, d):
                row = dict(kind=kind, d=d, cfg=cfg, **compiled.get(json.dumps([kind, cfg, d]), {}))
                if "error" not in row:
                    try:
                        total, errs = 0.0, []
                        for run, ref in zip(runs, refs):
                            fn = run.fn(kind, cfg)
                            got = fn()
                            torch.cuda.synchronize()
                            outs = [("fwd", got)] if kind.startswith("fwd") else [
                                (n, getattr(run, n)) for n in run.outputs(kind)]
                            errs += [relerr(x, ref[n]) for n, x in outs]
                            ms = do_bench(fn, warmup=10, rep=40, return_mode="median")
                            b, hq, _, s, _ = run.shape
                            row[f"ms_{b}x{hq}x{s}"] = ms
                            row[f"tflops_{b}x{hq}x{s}"] = (
                                WORK[kind] * attention_flops_fwd(b, hq, s, d) / ms / 1e9)
                            total += ms
                        row.update(max_relerr_vs_sdpa_flash=max(errs), total_ms=total,
                                   ok=max(errs) < 2e-2 and kind not in DIAGNOSTIC)
                        if row["ok"] and (best is None or total < best[0]):
                            best = (total, cfg)
                    except Exception as e:  # noqa: BLE001
                        row["error"] = error_tail(e)
                table.append(row)
                print("tune", json.dumps(row), flush=True)
            if best is not None:
                winners.setdefault(str(d), {})[kind] = best[1]
                totals[kind] = best[0]
        resolve(winners.get(str(d), {}), totals)
        del runs, refs
        torch.cuda.empty_cache()
    return table, winners


def resolve(kinds: dict, totals: dict) -> None:
    """One winner per slot: deterministic=False takes the faster of atomics ("dkdv_atomic")
    and reduce-adds ("dkdv_tma"), left under "dkdv_atomic"; the DQ_STASH pair ("dkdv_stash",
    "dq_ds") stays only if its total beats the dK/dV + dQ pair's (sums of the tune shapes'
    median times). Where the stash was tuned and lost, both become None: install() then
    takes the head dim out of the stash tables, so the dK/dV + dQ pair runs."""
    inf = float("inf")
    if "dkdv_tma" in kinds:
        tma = kinds.pop("dkdv_tma")
        if totals["dkdv_tma"] < totals.get("dkdv_atomic", inf):
            kinds["dkdv_atomic"] = tma
    if "dkdv_stash" not in totals and "dq_ds" not in totals:
        return  # not tuned in this run: the tables keep what they have
    stash = totals.get("dkdv_stash", inf) + totals.get("dq_ds", inf)
    if stash >= totals.get("dkdv", inf) + totals.get("dq", inf):
        kinds["dkdv_stash"] = kinds["dq_ds"] = None


def install(winners: dict) -> None:
    """Make `winners` ({d: {kind: cfg}}, as written by --winners-out) the kernels' configs;
    a None config takes its head dim out of that table (resolve: the stash lost)."""
    from kernels import attention as A

    tables = {"fwd": A.FWD_CONFIGS, "dkdv": A.DKDV_CONFIGS, "dq": A.DQ_CONFIGS,
              "dkdv_atomic": A.DKDV_ATOMIC_CONFIGS, "dkdv_stash": A.DKDV_STASH_CONFIGS,
              "dq_ds": A.DQ_DS_CONFIGS}
    for d, kinds in winners.items():
        for kind, cfg in kinds.items():
            if cfg is None:
                tables[kind].pop(int(d), None)
            else:
                tables[kind][int(d)] = cfg


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/attention_tune.json")
    parser.add_argument("--winners-out", help="write the winners here too")
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--compiled", help="an earlier --compile-only run's --out: skip compiling")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset")
    parser.add_argument("--compile-one", help=argparse.SUPPRESS)  # worker
    args = parser.parse_args()
    if args.compile_one:
        kind, cfg, shape = json.loads(args.compile_one)
        print(json.dumps(compile_one(kind, cfg, tuple(shape))))
        return
    kinds = tuple(args.kinds.split(","))
    if set(kinds) - set(KINDS):
        parser.error(f"--kinds: unknown {sorted(set(kinds) - set(KINDS))}; known: {KINDS}")
    if args.compiled:
        with open(args.compiled) as f:
            compiled = json.load(f)["compiled"]
    else:
        compiled = precompile(args.workers, kinds)
    results = dict(provenance(), compiled=compiled, shapes=TUNE_SHAPES,
                   flops="per kernel: fwd 2*b*hq*s^2*d (causal); dkdv, dq 1.25x; "
                         "dkdv_stash, dq_ds 1.25x; dkdv_atomic, dkdv_tma 2.5x")
    if not args.compile_only:
        results["table"], results["winners"] = time_configs(compiled, kinds)
        print("winners", json.dumps(results["winners"]), flush=True)
        if args.winners_out:
            write_json(args.winners_out, results["winners"])
    write_json(args.out, results)


if __name__ == "__main__":
    main()
