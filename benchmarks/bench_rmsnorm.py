"""RMSNorm on one GPU: our Triton kernels vs. torch and liger-kernel, in one run.

    python -m benchmarks.bench_rmsnorm [--out benchmarks/results/rmsnorm_<date>.json] [--quick]

Needs CUDA (through the device tool: carry `.whl` with liger-kernel). GIT_COMMIT in the
environment names the commit measured (.git may not travel with the tree).

What it does, all in one process so the numbers compare:
  1. a device copy at each shape (dst.copy_(src), same bytes as x) and one of 1 GiB;
  2. a small sweep of our launch configurations (forward, backward; which ones:
     benchmarks/rmsnorm_sweep.py), timed on the launchers alone, each row with the compiled kernel's registers and spills (Triton's
     n_regs, n_spills), reported next to the defaults `rms_norm` uses;
  3. forward and forward+backward through autograd for: ours (defaults),
     torch.nn.functional.rms_norm, torch.compile of the eager formula, liger-kernel
     (in_place=True, its default, writing dx into dy; and in_place=False), each under
     benchmarks.common's three timings: `gpu` (the GPU's own time), `do_bench` (host
     launch latency included where it exceeds the GPU work) and `cpu_us` (host time);
  4. `host_us`: host time per call of the pieces an eager fwd+bwd pays (an allocation,
     our launchers alone, an autograd Function that launches nothing, F.rms_norm);
  5. a torch.profiler kernel table of our forward+backward at the first shape;
  6. `hidden_2048` (first, before the shapes above): llama_1b3's hidden size, the fused
     add+norm forward and backward sweep (benchmarks/add_rmsnorm_sweep.py) at 32768 and
     2048 rows, and the launch sweep of the plain norm at NORM_2048, each with the
     configuration in use when the run started ("old"/"default") timed beside the others.

Effective bandwidth counts the bytes a fused kernel must move, in bf16:
  forward  = read x + write y                      = 2 * M * H * 2 bytes
  backward = read x, dy + write dx                 = 3 * M * H * 2 bytes
  fwd+bwd  = (forward + backward bytes) / (time of forward and backward together).
Weight and dw partials are left uncounted (under 2% at these shapes).
Every GPU timing flushes L2 (a 256 MB write) before each rep. The summary holds the ratios
for both the `gpu` and the `do_bench` timings (`summary` and `summary_do_bench`); `summary`
also holds fwdbwd_over_torch_rms_norm_host: ours against torch's F.rms_norm under do_bench
(host time included), the issue's eager-step figure. Each summary value is the minimum over
SHAPES; `per_shape` holds each shape's figures and `short_by` how far a missed target is.
--quick leaves out the launch sweep at the SWEEP_ONLY hidden sizes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch
import torch.nn.functional as F
import triton

from benchmarks import add_rmsnorm_sweep as add_norm
from benchmarks.common import commit, cpu_us, kernel_table, relerr, time_all, write_json
from benchmarks.rmsnorm_sweep import (BACKWARD_CACHES, DTYPE, EPS, FORWARD_CACHES, blocks,
                                      inputs, precompile, resources, sweep_shape)
from kernels import rmsnorm as ours
from kernels import rmsnorm_configs as configs

SHAPES = ((16384, 4096), (32768, 8192), (8192, 5120))
SWEEP_ONLY = ((8192, 16384), (16384, 6656))
NORM_2048 = ((32768, 2048),)  # llama_1b3's input and final norms at mbs 16: launch sweep only
TARGETS = {"fwd_over_copy": 0.95, "fwdbwd_over_copy": 0.90, "fwdbwd_over_best_peer": 1.2}
HOST_TARGET = {"fwdbwd_over_torch_rms_norm_host": 1.0}  # do_bench timing


def eager_formula(x, w, eps=EPS):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


# --------------------------------------------------------------------------- peers


def implementations(n):
    impls = {
        "ours": lambda x, w: ours.rms_norm(x, w, eps=EPS),
        "torch_rms_norm": lambda x, w: F.rms_norm(x, (n,), w, EPS),
        "torch_compile": torch.compile(eager_formula, dynamic=False),
    }
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        impls["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", True)
        impls["liger_not_in_place"] = lambda x, w: LigerRMSNormFunction.apply(
            x, w, EPS, 0.0, "llama", False)
    except Exception as e:  # noqa: BLE001 - reported; the run goes on without it
        print("liger-kernel unavailable:", repr(e)[:200], flush=True)
    return impls




def _ratios(out, timing):
    """Our ratios to the copy and to the peers, under one timing ('gpu' or 'do_bench')."""
    key = f"{timing}_tbs"
    mine = out["impls"]["ours"]
    peers = {k: v for k, v in out["impls"].items() if not k.startswith("ours") and "fwd" in v}
    best_peer = max(peers, key=lambda k: peers[k]["fwdbwd"][key])
    copy = out["copy"][key]
    return dict(
        fwd_over_copy=mine["fwd"][key] / copy,
        fwdbwd_over_copy=mine["fwdbwd"][key] / copy,
        best_peer=best_peer,
        fwdbwd_over_best_peer=mine["fwdbwd"][key] / peers[best_peer]["fwdbwd"][key],
        fwd_over_best_peer=mine["fwd"][key] / max(v["fwd"][key] for v in peers.values()),
        **{f"fwdbwd_over_{k}": mine["fwdbwd"][key] / v["fwdbwd"][key] for k, v in peers.items()},
    )


def measure_shape(m, n, *, profile=False, tune=False):
    x, w, dy = inputs(m, n)
    fwd_bytes, bwd_bytes = 2 * m * n * 2, 3 * m * n * 2
    out = {"rows": m, "hidden": n, "fwd_bytes": fwd_bytes, "bwd_bytes": bwd_bytes}

    dst = torch.empty_like(x)
    out["copy"] = time_all(lambda: dst.copy_(x), fwd_bytes)
    del dst

    rows, best = sweep_shape(m, n)
    out["sweep"] = rows
    out["sweep_best"] = {k: v["config"] for k, v in best.items()}

    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = ours.reference(x64, w64, EPS)
    y64.backward(dy.double())
    impls = implementations(n)
    fwd_best = ours.ForwardConfig(**best["forward"]["config"])
    bwd_best = ours.BackwardConfig(**best["backward"]["config"])
    if tune:  # the sweep's best become the defaults `rms_norm` runs with from here on
        configs.FORWARD_TABLE[n], configs.BACKWARD_TABLE[n] = fwd_best, bwd_best
        configs.forward_config.cache_clear()
        configs.backward_config.cache_clear()
        ours.DW_REDUCE_ROWS = best["dw_reduce"]["config"]["rows"]  # read by dw_reduce_plan
        ours.dw_reduce_plan.cache_clear()
        out["tuned"] = dict(forward=fwd_best._asdict(), backward=bwd_best._asdict(),
                            dw_reduce_rows=ours.DW_REDUCE_ROWS)
    else:  # ours with the sweep's best launch configs: what the defaults leave behind
        impls["ours_swept_best"] = lambda x, w: ours.RMSNormFunction.apply(
            x, w, EPS, fwd_best, bwd_best)
    out["impls"] = {}
    for name, fn in impls.items():
        t = time.time()
        try:
            y = fn(x, w)
            y.backward(dy.clone())
            errs = dict(y=relerr(y, y64), dx=relerr(x.grad, x64.grad), dw=relerr(w.grad, w64.grad))
            x.grad, w.grad = None, None
            dy_run = dy.clone()  # liger in_place overwrites it; keep the original for others

            def fwd_bwd():
                fn(x, w).backward(dy_run)

            res = out["impls"][name] = dict(
                fwd=time_all(lambda: fn(x, w), fwd_bytes),
                fwdbwd=time_all(fwd_bwd, fwd_bytes + bwd_bytes, grad_to_none=[x, w]),
                relerr=errs)
            print(f"{m}x{n} {name:19s} fwd gpu {res['fwd']['gpu_tbs']:.2f} do_bench "
                  f"{res['fwd']['do_bench_tbs']:.2f} TB/s cpu {res['fwd']['cpu_us']:.0f} us | "
                  f"fwd+bwd gpu {res['fwdbwd']['gpu_tbs']:.2f} do_bench "
                  f"{res['fwdbwd']['do_bench_tbs']:.2f} TB/s cpu {res['fwdbwd']['cpu_us']:.0f} us"
                  f" | err {max(errs.values()):.1e} ({time.time() - t:.0f}s)", flush=True)
            if profile and name == "ours":
                out["profile_ours_fwdbwd"] = kernel_table(fwd_bwd, [x, w])
                print(out["profile_ours_fwdbwd"], flush=True)
        except Exception as e:  # noqa: BLE001
            out["impls"][name] = dict(error=repr(e)[:300])
            print(f"{m}x{n} {name} failed: {e!r}"[:400], flush=True)
        x.grad, w.grad = None, None

    out["ratios"] = {t: _ratios(out, t) for t in ("gpu", "do_bench")}
    fwd_cfg, bwd_cfg = ours.forward_config(n), ours.backward_config(n)
    out["default_configs"] = dict(
        forward=dict(fwd_cfg._asdict(), blocks=blocks(n, fwd_cfg),
                     **resources(FORWARD_CACHES, fwd_cfg)),
        backward=dict(bwd_cfg._asdict(), blocks=blocks(n, bwd_cfg),
                      **resources(BACKWARD_CACHES, bwd_cfg)))
    return out


class _Identity(torch.autograd.Function):
    """The autograd floor: a Python Function that launches nothing (returns views)."""

    @staticmethod
    def forward(ctx, x, w):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        return dy, None


def host_costs(m, n) -> dict:
    """Host microseconds per call (GPU kept busy) of the pieces an eager fwd+bwd pays."""
    x, w, dy = inputs(m, n)
    xd, wd = x.detach(), w.detach()

    def fwd_bwd(fn):
        return lambda: fn(x, w).backward(dy)

    pieces = {
        "empty_like": lambda: torch.empty_like(xd),
        "copy": lambda: torch.empty_like(xd).copy_(xd),
        "ours_forward_launcher": lambda: ours.forward(xd, wd, EPS),
        "ours_backward_launchers": lambda: ours.backward(dy, xd, wd, EPS),
        "ours_fwdbwd": fwd_bwd(lambda x, w: ours.rms_norm(x, w, eps=EPS)),
        "torch_rms_norm_fwdbwd": fwd_bwd(lambda x, w: F.rms_norm(x, (n,), w, EPS)),
        "autograd_identity_fwdbwd": fwd_bwd(_Identity.apply),
    }
    out = {}
    for name, fn in pieces.items():
        grads = [x, w] if name.endswith("fwdbwd") else None
        fn()
        out[name] = min(cpu_us(fn, grad_to_none=grads) for _ in range(3))
        print(f"host {m}x{n} {name:26s} {out[name]:6.1f} us", flush=True)
        x.grad, w.grad = None, None
    return out



def _per_shape(s, timing) -> dict:
    """One shape's ratios and what bounds them: our and torch's fwd+bwd GPU time and host
    time per call, the default kernels' registers and spills."""
    r = s["ratios"][timing]
    impls = s["impls"]
    row = {k: r[k] for k in (*TARGETS, "best_peer")}
    row["fwdbwd_over_torch_rms_norm_host"] = s["ratios"]["do_bench"]["fwdbwd_over_torch_rms_norm"]
    for name in ("ours", "torch_rms_norm"):
        if "fwdbwd" in impls.get(name, {}):
            row[f"{name}_fwdbwd_gpu_us"] = impls[name]["fwdbwd"]["gpu_ms"] * 1e3
            row[f"{name}_fwdbwd_do_bench_us"] = impls[name]["fwdbwd"]["do_bench_ms"] * 1e3
            row[f"{name}_fwdbwd_host_us"] = impls[name]["fwdbwd"]["cpu_us"]
    row["registers"] = {k: {f: v.get(f) for f in ("n_regs", "n_spills")}
                        for k, v in s["default_configs"].items()}
    return row


def summarize(result: dict) -> None:
    """result's `summary` (GPU time) and `summary_do_bench`: each ratio the minimum over the
    shapes measured so far (`shapes` says which: a run cut short keeps a partial one)."""
    for timing, name in (("gpu", "summary"), ("do_bench", "summary_do_bench")):
        ratios = [s["ratios"][timing] for s in result["shapes"].values()]
        summary = dict(device=result["device"], date=result["date"], git_commit=result["git_commit"],
                       timing=timing, shapes=list(result["shapes"]))
        for key in TARGETS:
            summary[key] = min(r[key] for r in ratios)
        targets = dict(TARGETS)
        if timing == "gpu":  # the host-inclusive figure beside the GPU-time ones
            summary["fwdbwd_over_torch_rms_norm_host"] = min(
                s["ratios"]["do_bench"]["fwdbwd_over_torch_rms_norm"]
                for s in result["shapes"].values())
            targets.update(HOST_TARGET)
        summary["targets"] = targets
        summary["met"] = {k: summary[k] >= v for k, v in targets.items()}
        summary["short_by"] = {k: v - summary[k] for k, v in targets.items() if summary[k] < v}
        summary["per_shape"] = {key: _per_shape(s, timing) for key, s in result["shapes"].items()}
        result[name] = summary


def hidden_2048() -> dict:
    """llama_1b3's hidden size (issue 17): the add+norm sweep, the plain norm's launch sweep
    with the defaults' rows picked out."""
    out = {"add_rmsnorm": {f"{m}x{n}": add_norm.measure(m, n) for m, n in add_norm.SHAPES},
           "rmsnorm": {}}
    for m, n in NORM_2048:
        rows, best = sweep_shape(m, n)
        defaults = dict(forward=ours.forward_config(n)._asdict(), backward=ours.backward_config(n)._asdict())
        out["rmsnorm"][f"{m}x{n}"] = dict(
            sweep=rows, sweep_best={k: v["config"] for k, v in best.items()},
            best={k: {f: v.get(f) for f in ("ms", "tbs")} for k, v in best.items()},
            default={k: next((r for r in rows[k] if r["config"] == defaults[k]), None) for k in defaults})
    torch.cuda.empty_cache()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    today = datetime.date.today().isoformat()
    parser.add_argument("--out", default=f"benchmarks/results/rmsnorm_{today}.json")
    parser.add_argument("--quick", action="store_true", help="skip the SWEEP_ONLY sizes")
    parser.add_argument("--tune", action="store_true",
                        help="install each shape's sweep winners as the defaults before timing")
    parser.add_argument("--precompile", metavar="I/N",
                        help="only compile sweep part I of N (for parallel workers), no timing")
    args = parser.parse_args()
    if args.precompile:
        part, _, parts = args.precompile.partition("/")
        if not (part.isdigit() and parts.isdigit() and int(part) < int(parts)):
            parser.error(f"--precompile takes I/N with 0 <= I < N, got {args.precompile!r}")
        part, parts = int(part), int(parts)
        add_norm.precompile(part, parts)
        return precompile(part, parts, SHAPES + NORM_2048 + (() if args.quick else SWEEP_ONLY))
    props = torch.cuda.get_device_properties(0)
    result = dict(
        benchmark="rmsnorm", date=today, git_commit=commit(),
        device=props.name, sm_count=props.multi_processor_count,
        torch=torch.__version__, triton=triton.__version__, dtype="bfloat16", eps=EPS,
        method=__doc__.split("What it does")[1].strip(), tuned_in_run=args.tune,
        inductor_compile_threads=os.environ.get("TORCHINDUCTOR_COMPILE_THREADS"),
        copy_basis="ratios use the copy of the same tensor (M*H bf16) timed in the same run",
    )
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version

        result["liger_kernel"] = version("liger-kernel")
    except Exception:  # noqa: BLE001
        result["liger_kernel"] = None
    print({k: result[k] for k in ("device", "sm_count", "torch", "triton", "liger_kernel")}, flush=True)

    big = torch.empty(1 << 29, device="cuda", dtype=DTYPE).normal_()
    big_dst = torch.empty_like(big)
    result["copy_1gib"] = time_all(lambda: big_dst.copy_(big), 2 * big.numel() * 2)
    result["copy_1gib_tbs"] = result["copy_1gib"]["do_bench_tbs"]
    del big, big_dst
    print(f"copy 1 GiB: {result['copy_1gib_tbs']:.2f} TB/s", flush=True)

    result["host_us"] = host_costs(*SHAPES[0])
    result["hidden_2048"] = hidden_2048()
    write_json(args.out, result)
    result["shapes"] = {}
    # The shape furthest from its targets first (v6: 32768x8192, the best-peer ratio): a run
    # cut short by its time limit keeps it.
    for m, n in sorted(SHAPES, key=lambda shape: shape != (32768, 8192)):
        result["shapes"][f"{m}x{n}"] = measure_shape(m, n, profile=(m, n) == SHAPES[0],
                                                     tune=args.tune)
        summarize(result)
        write_json(args.out, result)  # what a run cut short by its time limit keeps
        torch.cuda.empty_cache()
    result["host_us_end"] = host_costs(*SHAPES[0])  # drift of the host over the run
    # hidden sizes outside the target shapes: launch sweep only, to check the heuristics
    result["sweep_only"] = {}
    for m, n in () if args.quick else SWEEP_ONLY:
        rows, best = sweep_shape(m, n)
        result["sweep_only"][f"{m}x{n}"] = dict(sweep=rows, sweep_best={k: v["config"] for k, v in best.items()})

    summarize(result)
    write_json(args.out, result)

    for timing in ("gpu", "do_bench"):
        print(f"\n[{timing}] shape     impl                 fwd TB/s  fwd+bwd TB/s  host us (fwd, fwd+bwd)")
        for key, s in result["shapes"].items():
            print(f"{key:14s} {'copy':20s} {s['copy'][timing + '_tbs']:9.2f}")
            for name, v in s["impls"].items():
                if "fwd" in v:
                    print(f"{key:14s} {name:20s} {v['fwd'][timing + '_tbs']:9.2f} "
                          f"{v['fwdbwd'][timing + '_tbs']:12.2f}   "
                          f"{v['fwd']['cpu_us']:5.0f} {v['fwdbwd']['cpu_us']:5.0f}")
            print(f"{key:14s} ratios {json.dumps(s['ratios'][timing], default=str)}")
    for key, s in list(result["shapes"].items()) + list(result["sweep_only"].items()):
        print(f"{key:14s} sweep best {s['sweep_best']}")
    if args.tune:  # the tables to paste into kernels/rmsnorm.py
        print("FORWARD_TABLE", {int(k.split("x")[1]): ours.ForwardConfig(**s["tuned"]["forward"])
                                for k, s in result["shapes"].items()})
        print("BACKWARD_TABLE", {int(k.split("x")[1]): ours.BackwardConfig(**s["tuned"]["backward"])
                                 for k, s in result["shapes"].items()})
        print("DW_REDUCE_ROWS", {k: s["tuned"]["dw_reduce_rows"] for k, s in result["shapes"].items()})
    print("summary", json.dumps(result["summary"]))
    print("summary_do_bench", json.dumps(result["summary_do_bench"]))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
