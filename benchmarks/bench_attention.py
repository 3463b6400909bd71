"""Fused attention on one GPU: correctness, and timings against flash-attn-4 and torch SDPA.

    GIT_COMMIT=<sha> python -m benchmarks.bench_attention --check --bench \
        [--configs /tmp/attention_winners.json] --out $OUT/attention_h200.json

--configs  block configs from benchmarks/tune_attention.py's --winners-out, installed
           before anything runs (recorded with each row); default: the hard-coded ones.
--check    ours vs a float64 reference on the GPU (odd lengths, GQA, strided views, both
           dtypes, both load paths, both backward modes) and a bitwise-repeatable
           deterministic backward.
--bench    forward, backward and forward+backward at the issue's four shapes, same process,
           same inputs: ours (deterministic backward, the default, and deterministic=False),
           flash-attn-4 (flash_attn.cute, when installed), SDPA-flash, SDPA-cuDNN (GQA by
           repeating KV heads, inside the timed region, where it refuses enable_gqa).

`summary`: for each peer, ours' time ratio peer_ms / ours_ms (> 1: ours faster), the
minimum over the four shapes, for fwd+bwd, fwd and bwd; the same for deterministic=False
under `summary.nondeterministic`. FLOPs: common.ATTENTION_FLOPS. All times: median of
triton.testing.do_bench (CUDA events, L2 flushed between runs).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.common import attention_inputs, error_tail, relerr

PEERS = ("flash_attn_4", "sdpa_cudnn", "sdpa_flash")
TARGETS = {"fwdbwd_over_flash_attn_4": 1.0, "fwdbwd_over_sdpa_cudnn": 1.0}
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 3e-3}  # as tests/kernels


def _case_inputs(b, s, hq, hkv, d, dtype, layout):
    g = torch.Generator(device="cuda").manual_seed(s)
    if layout == "fused_qkv":  # megatron's [s, b, hkv, (group + 2) d] buffer
        group = hq // hkv
        qkv = torch.randn(s, b, hkv, (group + 2) * d, device="cuda", generator=g).to(dtype)
        q = qkv[..., : group * d].reshape(s, b, hq, d).permute(1, 0, 2, 3)
        k = qkv[..., group * d: (group + 1) * d].permute(1, 0, 2, 3)
        v = qkv[..., (group + 1) * d:].permute(1, 0, 2, 3)
    else:
        q, k, v = (torch.randn(b, s, h, d, device="cuda", generator=g).to(dtype)
                   for h in (hq, hkv, hkv))
    do = torch.randn(b, s, hq, d, device="cuda", generator=g).to(dtype)
    return [t.detach().requires_grad_() for t in (q, k, v)], do


def check(results):
    """Ours vs float64 on the GPU; a repeatable deterministic backward."""
    from kernels import attention as A

    cases = [  # b, s, hq, hkv, d, dtype, causal, layout
        (2, 1000, 8, 2, 128, torch.bfloat16, True, "bshd"),
        (1, 777, 4, 4, 64, torch.float16, False, "bshd"),
        (2, 513, 8, 1, 64, torch.bfloat16, True, "bshd"),
        (2, 640, 8, 2, 128, torch.bfloat16, True, "fused_qkv"),
        (1, 300, 2, 2, 128, torch.float16, True, "bshd"),
        (1, 200, 2, 2, 32, torch.bfloat16, True, "bshd"),
    ]
    rows = []
    for b, s, hq, hkv, d, dtype, causal, layout in cases:
        (q, k, v), do = _case_inputs(b, s, hq, hkv, d, dtype, layout)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = A.attention_reference(q64, k64, v64, causal=causal)
        ref.backward(do.double())
        row = dict(case=f"b{b} s{s} hq{hq} hkv{hkv} d{d} {str(dtype)[6:]} "
                        f"{'causal' if causal else 'full'} {layout}")
        cfgs = A.kernel_configs(d, q.device)
        for variant in ("tuned", "pointers", "atomic_dq"):
            try:
                for t in (q, k, v):
                    t.grad = None
                if variant == "pointers":  # the same blocks without tensor descriptors
                    scale = 1 / math.sqrt(d)
                    o, lse = A.attention_forward(q, k, v, causal=causal, softmax_scale=scale,
                                                 config=dict(cfgs[0], tma=False))
                    dq, dk, dv = A.attention_backward(do, q, k, v, o, lse, causal=causal,
                                                      softmax_scale=scale,
                                                      dkdv_config=dict(cfgs[1], tma=False),
                                                      dq_config=dict(cfgs[2], tma=False))
                else:
                    o = A.flash_attention(q, k, v, causal=causal,
                                          deterministic=variant == "tuned")
                    o.backward(do)
                    dq, dk, dv = q.grad, k.grad, v.grad
                errs = {n: relerr(x, r) for n, x, r in [("o", o, ref), ("dq", dq, q64.grad),
                                                          ("dk", dk, k64.grad),
                                                          ("dv", dv, v64.grad)]}
                row[variant] = errs
                row[variant + "_ok"] = all(e < TOL[dtype] for e in errs.values())
            except Exception as e:  # noqa: BLE001
                row[variant + "_ok"] = False
                row[variant + "_error"] = error_tail(e)
        rows.append(row)
        print("check", row, flush=True)
    q, k, v, do = attention_inputs(2, 8, 2, 2048, 128, seed=5)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grads = []
    for _ in range(3):
        for t in (q, k, v):
            t.grad = None
        A.flash_attention(q, k, v).backward(do)
        grads.append([t.grad.clone() for t in (q, k, v)])
    deterministic = all(torch.equal(a, c) for run in grads[1:] for a, c in zip(grads[0], run))
    results["check"] = dict(
        cases=rows, deterministic_backward=deterministic,
        all_ok=deterministic and all(r[v + "_ok"] for r in rows
                                     for v in ("tuned", "pointers", "atomic_dq")))
    print("check all_ok", results["check"]["all_ok"], "deterministic", deterministic, flush=True)


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


def _impls(q, k, v, do, hq, hkv):
    """name -> (forward closure, its leaf inputs, its output gradient)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels import attention as A
    from kernels import attention_fa4

    impls, notes = {}, {}
    for name, det in (("ours", True), ("ours_nondeterministic", False)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        impls[name] = (lambda leaves=leaves, det=det: A.flash_attention(
            *leaves, deterministic=det), leaves, do)
    if attention_fa4.installed():
        func = attention_fa4.flash_attn_func()
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        impls["flash_attn_4"] = (lambda: func(*leaves, causal=True)[0], leaves, do)
    else:
        notes["flash_attn_4"] = attention_fa4.NOT_INSTALLED
    sd_in = [t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
    sd_do = do.transpose(1, 2).contiguous()
    for label, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                           ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        repeat = [False]

        def fwd(backend=backend, repeat=repeat):
            qq, kk, vv = sd_in
            kw = {}
            if hkv != hq:
                if repeat[0]:
                    kk, vv = (t.repeat_interleave(hq // hkv, dim=1) for t in (kk, vv))
                else:
                    kw["enable_gqa"] = True
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, **kw)
        if hkv != hq:
            try:  # does this backend take enable_gqa? else repeat the KV heads
                fwd().sum().backward()
            except Exception:  # noqa: BLE001
                repeat[0] = True
                notes[label] = "no enable_gqa: KV heads repeated in the timed region"
        impls[label] = (fwd, sd_in, sd_do)
    return impls, notes


def bench(results):
    from kernels import attention as A

    rows = []
    for b, hq, hkv, s, d in common.ATTENTION_SHAPES:
        q, k, v, do = attention_inputs(b, hq, hkv, s, d, seed=1)
        flops = common.attention_flops_fwd(b, hq, s, d)
        name = f"{b}x{hq}/{hkv}x{s}x{d}"
        row = dict(shape=dict(b=b, hq=hq, hkv=hkv, s=s, d=d), name=name,
                   configs=dict(fwd=A.FWD_CONFIGS.get(d), dkdv=A.DKDV_CONFIGS.get(d),
                                dq=A.DQ_CONFIGS.get(d),
                                dkdv_atomic=A.DKDV_ATOMIC_CONFIGS.get(d)))
        impls, notes = _impls(q, k, v, do, hq, hkv)
        for label, (fwd, inputs, g) in impls.items():
            try:
                ms_f, ms_b, ms_fb = _time_impl(fwd, inputs, g)
                row[label] = dict(fwd_ms=ms_f, bwd_ms=ms_b, fwdbwd_ms=ms_fb,
                                  fwd_tflops=flops / ms_f / 1e9,
                                  bwd_tflops=2.5 * flops / ms_b / 1e9,
                                  fwdbwd_tflops=3.5 * flops / ms_fb / 1e9)
            except Exception as e:  # noqa: BLE001
                row[label] = dict(error=error_tail(e))
            if label in notes:
                row[label]["note"] = notes[label]
            print("bench", name, label, json.dumps(row[label]), flush=True)
        for label in set(notes) - set(impls):
            row[label] = dict(note=notes[label])
        for mine in ("ours", "ours_nondeterministic"):
            for peer in PEERS:
                if "fwdbwd_ms" in row.get(peer, {}) and "fwdbwd_ms" in row[mine]:
                    row[f"{mine}_over_{peer}"] = {m: row[peer][f"{m}_ms"] / row[mine][f"{m}_ms"]
                                                  for m in ("fwd", "bwd", "fwdbwd")}
        rows.append(row)
        del impls
        torch.cuda.empty_cache()
    results["bench"] = rows
    results["summary"] = dict(device=torch.cuda.get_device_name(), **_ratios(rows, "ours"),
                              nondeterministic=_ratios(rows, "ours_nondeterministic"),
                              targets=TARGETS)
    results["summary"]["met"] = {k: (results["summary"].get(k) or 0) >= v
                                 for k, v in TARGETS.items()}


def _ratios(rows, mine):
    """{mode}_over_{peer}: min over shapes of peer_ms / ours_ms; None if a shape lacks it."""
    out = {}
    for peer in PEERS:
        for mode in ("fwdbwd", "fwd", "bwd"):
            vals = [r.get(f"{mine}_over_{peer}", {}).get(mode) for r in rows]
            out[f"{mode}_over_{peer}"] = min(vals) if vals and None not in vals else None
    return out


def matmul_peak(results):
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    ms = do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median")
    results["matmul_bf16_8192_tflops"] = 2 * 8192 ** 3 / ms / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--bench", action="store_true")
    parser.add_argument("--configs", help="winners JSON from tune_attention.py --winners-out")
    parser.add_argument("--out", default="benchmarks/results/attention.json")
    args = parser.parse_args()
    results = dict(common.provenance(), flops=common.ATTENTION_FLOPS)
    if args.configs:
        from benchmarks.tune_attention import install

        with open(args.configs) as f:
            results["installed_configs"] = json.load(f)
        install(results["installed_configs"])
    sections = [("matmul", matmul_peak, True), ("check", check, args.check),
                ("bench", bench, args.bench)]
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
        common.write_json(args.out, results)
    for row in results.get("bench", []):
        cells = " | ".join(f"{label} f+b {row[label].get('fwdbwd_tflops', 0):4.0f}"
                           for label in ("ours", "ours_nondeterministic", *PEERS) if label in row)
        print(f"{row['name']:>18} {cells}")
    print("summary", json.dumps(results.get("summary")))


if __name__ == "__main__":
    main()
