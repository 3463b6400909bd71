"""Fused attention on one GPU: correctness, a block-config sweep, and timings vs torch SDPA.

One device call does everything and writes one JSON file:

    GIT_COMMIT=<sha> python benchmarks/bench_attention.py --check --sweep --bench \
        --out $OUT/attention_h100.json

--check  ours vs a float64 reference on the GPU (odd lengths, GQA, strided views,
         both dtypes, both load paths) and bitwise-repeatable backward.
--sweep  times each candidate block config of the forward, dK/dV and dQ kernels
         separately (bf16, causal) and keeps the fastest correct one per head dim;
         candidates are compiled in parallel worker processes first.
--bench  forward, backward and forward+backward of ours, SDPA-flash and SDPA-cuDNN
         at the issue's shapes, same process, same inputs.

FLOPs, causal: forward 2*b*h*s^2*d (four s*s*d matmuls, 4*b*h*s^2*d, halved by the
mask); backward 2.5x that; forward+backward 3.5x. All times: median of
triton.testing.do_bench (CUDA events, L2 flushed between runs).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import datetime
import json
import math
import subprocess
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BENCH_SHAPES = [  # (b, hq, hkv, s, d)
    (8, 16, 16, 2048, 128),
    (2, 16, 16, 8192, 128),
    (16, 32, 32, 1024, 64),
    (4, 32, 8, 4096, 128),
]
TUNE_SHAPES = {128: [(8, 16, 16, 2048, 128), (2, 16, 16, 8192, 128)],
               64: [(16, 32, 32, 1024, 64)]}


def _cfg(bm, bn, w, s, tma, ws=False):
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, tma=tma, WARP_SPEC=ws)


def candidates(kind, d):
    """Block configs to try. fwd/dq: BLOCK_M query rows held, BLOCK_N key rows streamed;
    dkdv: BLOCK_N key rows held, BLOCK_M query rows streamed. Mostly tensor-descriptor
    loads (fewer registers than pointer arithmetic: the d=128 dK/dV kernel spills
    either way, least with small BLOCK_M); a few pointer-path twins for comparison.
    Warp specialization is left out: Triton's NVGPUWarpSpecialization pass aborted
    (C++ assertion) on several of these kernels when compiled for sm_90 offline."""
    # Second round: the first round's winners (results/attention_h100_sweep1_*.json) and
    # their neighbours.
    if kind == "fwd" and d == 128:
        tma = [(128, 128, 8, 3), (128, 128, 8, 4), (64, 64, 4, 3), (64, 64, 4, 4),
               (128, 64, 8, 3)]
        ptr = [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)]
    elif kind == "fwd":
        tma = [(128, 64, 4, 4)]
        ptr = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (128, 32, 4, 3),
               (64, 64, 4, 3)]
    elif kind == "dkdv" and d == 128:
        tma = [(32, 64, 4, 3), (32, 64, 4, 4), (32, 64, 4, 2), (16, 64, 4, 3),
               (32, 128, 8, 3), (64, 128, 8, 3)]
        ptr = [(32, 64, 4, 3)]
    elif kind == "dkdv":
        tma = [(32, 128, 4, 3), (32, 128, 4, 4), (32, 64, 4, 3), (16, 64, 4, 3),
               (16, 128, 4, 3)]
        ptr = [(32, 128, 4, 3)]
    elif d == 128:
        tma = [(128, 32, 8, 3), (128, 32, 8, 4), (128, 32, 4, 3), (64, 32, 4, 3),
               (128, 64, 8, 3)]
        ptr = [(128, 32, 8, 3)]
    else:
        tma = [(128, 32, 4, 3)]
        ptr = [(128, 64, 8, 3), (128, 32, 8, 3), (128, 64, 8, 4), (128, 32, 4, 3),
               (128, 64, 4, 3)]
    return [_cfg(*c, True) for c in tma] + [_cfg(*c, False) for c in ptr]


def _inputs(b, hq, hkv, s, d, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, s, hq, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype, generator=g)
    do = torch.randn(b, s, hq, d, device="cuda", dtype=dtype, generator=g)
    return q, k, v, do


def _err(e):
    """The end of an exception's message: Triton puts the cause after the source excerpt."""
    return f"{type(e).__name__}: {str(e)[-600:]}"


def _relerr(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def _flops_fwd(b, hq, s, d):
    return 2.0 * b * hq * s * s * d


# ------------------------------------------------------------------ kernels runs


class KernelRun:
    """Inputs and intermediates for timing one kernel with one config."""

    def __init__(self, shape):
        from kernels.attention import attention_forward

        self.shape = shape
        b, hq, hkv, s, d = shape
        self.q, self.k, self.v, self.do = _inputs(b, hq, hkv, s, d)
        self.scale = 1 / math.sqrt(d)
        # A plain pointer-path config for the setup, so a failing candidate fails alone.
        self.o, self.lse = attention_forward(self.q, self.k, self.v, causal=True,
                                             softmax_scale=self.scale,
                                             config=_cfg(64, 64, 4, 3, False))
        self.delta = torch.empty_like(self.lse)
        from kernels.attention_bwd import launch_delta

        launch_delta(self.o, self.do, self.delta)
        self.dq = torch.empty_like(self.q)
        self.dk, self.dv = torch.empty_like(self.k), torch.empty_like(self.v)

    def fn(self, kind, cfg):
        from kernels import attention as A
        from kernels.attention_bwd import launch_dkdv, launch_dq

        if kind == "fwd":
            return lambda: A.attention_forward(self.q, self.k, self.v, causal=True,
                                               softmax_scale=self.scale, config=cfg)[0]
        tma = A._use_tma(cfg, self.q, self.k, self.v, self.do)
        if kind == "dkdv":
            return lambda: launch_dkdv(self.q, self.k, self.v, self.do, self.lse, self.delta,
                                       self.dk, self.dv, causal=True, softmax_scale=self.scale,
                                       config=cfg, use_tma=tma)
        return lambda: launch_dq(self.q, self.k, self.v, self.do, self.lse, self.delta, self.dq,
                                 causal=True, softmax_scale=self.scale, config=cfg, use_tma=tma)


def _precompile_in_subprocess(task):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--compile-one",
                           json.dumps(task)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-600:]}"
    return proc.stdout.strip().splitlines()[-1] if "ERROR" in proc.stdout else None


def _precompile(task):
    """Worker: compile (and run once) one config so the main process hits Triton's cache."""
    kind, cfg, shape = task
    try:
        run = KernelRun(shape)
        run.fn(kind, cfg)()
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 - reported in the sweep table
        return "ERROR " + _err(e).replace("\n", " ")


# ------------------------------------------------------------------- sections


def check(results):
    """Ours vs float64 on the GPU; repeatable backward."""
    from kernels import attention as A
    from kernels.attention import attention_reference, flash_attention

    tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 3e-3}
    cases = [  # b, s, hq, hkv, d, dtype, causal, layout, also force the pointer path
        (2, 1000, 8, 2, 128, torch.bfloat16, True, "bshd", True),
        (1, 777, 4, 4, 64, torch.float16, False, "bshd", True),
        (2, 513, 8, 1, 64, torch.bfloat16, True, "bshd", False),
        (2, 640, 8, 2, 128, torch.bfloat16, True, "fused_qkv", True),
        (1, 300, 2, 2, 128, torch.float16, True, "bshd", False),
        (1, 200, 2, 2, 32, torch.bfloat16, True, "bshd", False),
    ]
    out = []
    for b, s, hq, hkv, d, dtype, causal, layout, pointers in cases:
        g = torch.Generator(device="cuda").manual_seed(s)
        if layout == "fused_qkv":  # megatron's [s, b, hkv, (group + 2) d] buffer
            group = hq // hkv
            qkv = torch.randn(s, b, hkv, (group + 2) * d, device="cuda", generator=g).to(dtype)
            q = qkv[..., : group * d].reshape(s, b, hq, d).permute(1, 0, 2, 3)
            k = qkv[..., group * d: (group + 1) * d].permute(1, 0, 2, 3)
            v = qkv[..., (group + 1) * d:].permute(1, 0, 2, 3)
        else:
            q = torch.randn(b, s, hq, d, device="cuda", generator=g).to(dtype)
            k = torch.randn(b, s, hkv, d, device="cuda", generator=g).to(dtype)
            v = torch.randn(b, s, hkv, d, device="cuda", generator=g).to(dtype)
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        do = torch.randn(b, s, hq, d, device="cuda", generator=g).to(dtype)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = attention_reference(q64, k64, v64, causal=causal)
        ref.backward(do.double())
        row = dict(case=f"b{b} s{s} hq{hq} hkv{hkv} d{d} {str(dtype)[6:]} "
                        f"{'causal' if causal else 'full'} {layout}")
        for variant in ("tuned", "pointers") if pointers else ("tuned",):
            try:
                for t in (q, k, v):
                    t.grad = None
                if variant == "pointers":  # the same blocks without tensor descriptors
                    cfgs = A.kernel_configs(d, q.device)
                    scale = 1 / math.sqrt(d)
                    o, lse = A.attention_forward(q, k, v, causal=causal, softmax_scale=scale,
                                                 config=dict(cfgs[0], tma=False))
                    dq, dk, dv = A.attention_backward(do, q, k, v, o, lse, causal=causal,
                                                      softmax_scale=scale,
                                                      dkdv_config=dict(cfgs[1], tma=False),
                                                      dq_config=dict(cfgs[2], tma=False))
                else:
                    o = A.flash_attention(q, k, v, causal=causal)
                    o.backward(do)
                    dq, dk, dv = q.grad, k.grad, v.grad
                errs = {n: _relerr(x, r) for n, x, r in [("o", o, ref), ("dq", dq, q64.grad),
                                                           ("dk", dk, k64.grad),
                                                           ("dv", dv, v64.grad)]}
                row[variant] = errs
                row[variant + "_ok"] = all(e < tol[dtype] for e in errs.values())
            except Exception as e:  # noqa: BLE001
                row[variant + "_ok"] = False
                row[variant + "_error"] = _err(e)
        out.append(row)
        print("check", row, flush=True)
    # Repeatable backward: three runs, bitwise equal gradients.
    q, k, v, do = _inputs(2, 8, 2, 2048, 128, seed=5)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grads = []
    for _ in range(3):
        for t in (q, k, v):
            t.grad = None
        flash_attention(q, k, v).backward(do)
        grads.append([t.grad.clone() for t in (q, k, v)])
    deterministic = all(torch.equal(a, c) for run in grads[1:] for a, c in zip(grads[0], run))
    results["check"] = dict(cases=out, deterministic_backward=deterministic,
                            all_ok=all(r.get("tuned_ok") and r.get("pointers_ok", True)
                                       for r in out) and deterministic)
    print("check all_ok", results["check"]["all_ok"], "deterministic", deterministic, flush=True)


def sweep(results, workers):
    """Time every candidate of every kernel; keep the fastest correct one per head dim."""
    from triton.testing import do_bench

    from kernels import attention as A

    tasks = [(kind, cfg, TUNE_SHAPES[d][0]) for d in TUNE_SHAPES
             for kind in ("fwd", "dkdv", "dq") for cfg in candidates(kind, d)]
    t0 = time.time()
    # One process per config: a compiler abort then costs that config only, and only
    # configs that compiled are ever launched in this process (from Triton's cache).
    with futures.ThreadPoolExecutor(max_workers=workers) as pool:
        compile_errors = list(pool.map(_precompile_in_subprocess, tasks))
    print(f"precompiled {len(tasks)} configs in {time.time() - t0:.0f}s", flush=True)
    failed = {json.dumps([k, c, s]): e for (k, c, s), e in zip(tasks, compile_errors) if e}

    table, winners = [], {}
    for d, shapes in TUNE_SHAPES.items():
        runs = [KernelRun(shape) for shape in shapes]
        refs = []
        for run in runs:  # SDPA-flash's output and gradients as the correctness yardstick
            q, k, v = (t.transpose(1, 2).detach().requires_grad_() for t in (run.q, run.k, run.v))
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            o.backward(run.do.transpose(1, 2))
            refs.append(dict(fwd=o.transpose(1, 2).detach(), dq=q.grad.transpose(1, 2),
                             dk=k.grad.transpose(1, 2), dv=v.grad.transpose(1, 2)))
        for kind in ("fwd", "dkdv", "dq"):
            best = None
            for cfg in candidates(kind, d):
                key = json.dumps([kind, cfg, shapes[0]])
                row = dict(kind=kind, d=d, cfg=cfg)
                if key in failed:
                    row["error"] = failed[key]
                    table.append(row)
                    continue
                try:
                    total, errs = 0.0, []
                    for run, ref in zip(runs, refs):
                        fn = run.fn(kind, cfg)
                        got = fn()
                        torch.cuda.synchronize()
                        if kind == "fwd":
                            errs.append(_relerr(got, ref["fwd"]))
                        elif kind == "dkdv":
                            errs += [_relerr(run.dk, ref["dk"]), _relerr(run.dv, ref["dv"])]
                        else:
                            errs.append(_relerr(run.dq, ref["dq"]))
                        ms = do_bench(fn, warmup=10, rep=40, return_mode="median")
                        b, hq, hkv, s, dd = run.shape
                        work = _flops_fwd(b, hq, s, dd) * (1.0 if kind == "fwd" else 1.25)
                        row[f"ms_{b}x{hq}x{s}"] = ms
                        row[f"tflops_{b}x{hq}x{s}"] = work / ms / 1e9
                        total += ms
                    row["max_relerr_vs_sdpa_flash"] = max(errs)
                    row["ok"] = max(errs) < 2e-2
                    row["total_ms"] = total
                    if row["ok"] and (best is None or total < best[0]):
                        best = (total, cfg)
                except Exception as e:  # noqa: BLE001
                    row["error"] = _err(e)
                table.append(row)
                print("sweep", row, flush=True)
            if best is not None:
                winners.setdefault(str(d), {})[kind] = best[1]
                {"fwd": A.FWD_CONFIGS, "dkdv": A.DKDV_CONFIGS, "dq": A.DQ_CONFIGS}[kind][d] = \
                    best[1]
        del runs, refs
        torch.cuda.empty_cache()
    results["sweep"] = dict(table=table, winners=winners,
                            note="dkdv/dq TFLOP/s count half the backward's 2.5x each")
    print("winners", json.dumps(winners), flush=True)


def _time_impl(fwd, inputs, do):
    from triton.testing import do_bench

    def fwdbwd():
        fwd().backward(do)

    ms_f = do_bench(fwd, warmup=25, rep=100, return_mode="median")
    ms_fb = do_bench(fwdbwd, warmup=25, rep=100, grad_to_none=list(inputs),
                     return_mode="median")
    out = fwd()
    ms_b = do_bench(lambda: out.backward(do, retain_graph=True), warmup=25, rep=100,
                    grad_to_none=list(inputs), return_mode="median")
    return ms_f, ms_b, ms_fb


def bench(results):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels import attention as A

    rows, summary_ratios = [], []
    for b, hq, hkv, s, d in BENCH_SHAPES:
        q, k, v, do = _inputs(b, hq, hkv, s, d, seed=1)
        flops = _flops_fwd(b, hq, s, d)
        name = f"{b}x{hq}" + (f"/{hkv}" if hkv != hq else "") + f"x{s}x{d}"
        row = dict(shape=dict(b=b, hq=hq, hkv=hkv, s=s, d=d), name=name,
                   configs=dict(fwd=A.FWD_CONFIGS[d], dkdv=A.DKDV_CONFIGS[d],
                                dq=A.DQ_CONFIGS[d]))
        ours_in = [t.clone().requires_grad_() for t in (q, k, v)]
        impls = {"ours": (lambda: A.flash_attention(*ours_in), ours_in, do)}
        sd_in = [t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
        sd_do = do.transpose(1, 2).contiguous()
        repeat_kv = {}
        for label, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                               ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            def fwd(backend=backend, label=label):
                qq, kk, vv = sd_in
                kw = {}
                if hkv != hq:
                    if repeat_kv.get(label):
                        kk = kk.repeat_interleave(hq // hkv, dim=1)
                        vv = vv.repeat_interleave(hq // hkv, dim=1)
                    else:
                        kw["enable_gqa"] = True
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, **kw)
            if hkv != hq:
                try:  # does this backend take enable_gqa? else repeat the KV heads
                    fwd().sum().backward()
                except Exception:  # noqa: BLE001
                    repeat_kv[label] = True
            impls[label] = (fwd, sd_in, sd_do)
        for label, (fwd, inputs, g) in impls.items():
            try:
                ms_f, ms_b, ms_fb = _time_impl(fwd, inputs, g)
                row[label] = dict(fwd_ms=ms_f, bwd_ms=ms_b, fwdbwd_ms=ms_fb,
                                  fwd_tflops=flops / ms_f / 1e9,
                                  bwd_tflops=2.5 * flops / ms_b / 1e9,
                                  fwdbwd_tflops=3.5 * flops / ms_fb / 1e9)
                if repeat_kv.get(label):
                    row[label]["note"] = "no enable_gqa: KV heads repeated in the timed region"
            except Exception as e:  # noqa: BLE001
                row[label] = dict(error=_err(e))
            print("bench", name, label, row[label], flush=True)
        for peer in ("sdpa_flash", "sdpa_cudnn"):
            if "fwdbwd_ms" in row[peer] and "fwdbwd_ms" in row["ours"]:
                row[f"over_{peer}"] = {m: row[peer][f"{m}_ms"] / row["ours"][f"{m}_ms"]
                                       for m in ("fwd", "bwd", "fwdbwd")}
        if "over_sdpa_flash" in row:
            summary_ratios.append(row["over_sdpa_flash"]["fwdbwd"])
        rows.append(row)
    results["bench"] = rows
    head = rows[0]
    results["summary"] = dict(
        device=torch.cuda.get_device_name(),
        fwdbwd_over_sdpa_flash=min(summary_ratios) if summary_ratios else None,
        fwdbwd_over_sdpa_cudnn_8x16x2048x128=head.get("over_sdpa_cudnn", {}).get("fwdbwd"),
        target_fwdbwd_over_sdpa_flash=1.3,
        target_fwdbwd_over_sdpa_cudnn_8x16x2048x128=1.0,
    )


def matmul_peak(results):
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    ms = do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median")
    results["matmul_bf16_8192_tflops"] = 2 * 8192 ** 3 / ms / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--bench", action="store_true")
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--out", default="benchmarks/results/attention.json")
    parser.add_argument("--compile-one", help=argparse.SUPPRESS)  # sweep worker
    args = parser.parse_args()
    if args.compile_one:
        kind, cfg, shape = json.loads(args.compile_one)
        error = _precompile((kind, cfg, tuple(shape)))
        print(error or "compiled")
        return
    import triton

    results = dict(
        env=dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                 triton=triton.__version__, python=sys.version.split()[0],
                 sms=torch.cuda.get_device_properties(0).multi_processor_count),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=os.environ.get("GIT_COMMIT", "unknown"),
        command=" ".join(sys.argv),
        flops="causal: fwd 2*b*h*s^2*d, bwd 2.5x, fwd+bwd 3.5x",
    )
    # The sweep goes first: it launches only configs that compiled in a worker, then
    # installs its winners, which the check and the benchmark then use.
    sections = [("matmul", matmul_peak, True),
                ("sweep", lambda r: sweep(r, args.workers), args.sweep),
                ("check", check, args.check), ("bench", bench, args.bench)]
    for name, fn, wanted in sections:
        if not wanted:
            continue
        t0 = time.time()
        try:
            fn(results)
        except Exception:  # noqa: BLE001 - keep the other sections' results
            results[f"{name}_error"] = traceback.format_exc()
            print(results[f"{name}_error"], flush=True)
        print(f"[{name}] {time.time() - t0:.0f}s", flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    for row in results.get("bench", []):
        ours = row["ours"]
        print(f"{row['name']:>18} ours fwd {ours.get('fwd_tflops', 0):5.0f} bwd "
              f"{ours.get('bwd_tflops', 0):5.0f} f+b {ours.get('fwdbwd_tflops', 0):5.0f} | "
              f"flash f+b {row['sdpa_flash'].get('fwdbwd_tflops', 0):5.0f} "
              f"cudnn f+b {row['sdpa_cudnn'].get('fwdbwd_tflops', 0):5.0f} | "
              f"x flash {row.get('over_sdpa_flash', {}).get('fwdbwd', 0):.2f} "
              f"x cudnn {row.get('over_sdpa_cudnn', {}).get('fwdbwd', 0):.2f}")
    print("summary", json.dumps(results.get("summary")))


if __name__ == "__main__":
    main()
