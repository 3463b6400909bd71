"""Fused attention on one GPU: timings against flash-attn-4 and torch SDPA.

    GIT_COMMIT=<sha> python -m benchmarks.bench_attention --bench \
        [--configs /tmp/attention_winners.json] --out $OUT/attention_h200.json

--configs  block configs from benchmarks/tune_attention.py's --winners-out, installed
           before anything runs (recorded with each row); default: the hard-coded ones.
(Correctness is tests/kernels/test_attention*.py's: their `cuda` tests run ours against the
float64 reference on the GPU; benchmarks/kernels_device.sh runs them beside the tuner.)
--bench    forward, backward and forward+backward at the issue's four shapes, same process,
           same inputs: ours (deterministic backward, the default, and deterministic=False;
           kernels.attention's impl="auto", plus impl="triton" as ours_triton),
           flash-attn-4 (flash_attn.cute, when installed), SDPA-flash, SDPA-cuDNN (GQA by
           repeating KV heads, inside the timed region, where it refuses enable_gqa).

`summary`: for each peer, ours' time ratio peer_ms / ours_ms (> 1: ours faster), the
minimum over the four shapes, for fwd+bwd, fwd and bwd; the same for deterministic=False
under `summary.nondeterministic`, the Triton-language kernels' under
`summary.triton_language`; each row's ours* entries note which kernels ran.
FLOPs: common.ATTENTION_FLOPS. All times: median of triton.testing.do_bench (CUDA events,
L2 flushed between runs).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.common import attention_inputs, error_tail

PEERS = ("flash_attn_4", "sdpa_cudnn", "sdpa_flash")
# Ours: (label, deterministic backward, kernels.attention impl). "auto" is what every caller
# gets (the Gluon kernels where they run, else Triton-language); "ours_triton" keeps the
# Triton-language kernels' figures beside them.
MINE = (("ours", True, "auto"), ("ours_nondeterministic", False, "auto"),
        ("ours_triton", True, "triton"))
TARGETS = {"fwdbwd_over_flash_attn_4": 1.0, "fwdbwd_over_sdpa_cudnn": 1.0}


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
    for name, det, impl in MINE:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        impls[name] = (lambda leaves=leaves, det=det, impl=impl: A.flash_attention(
            *leaves, deterministic=det, impl=impl), leaves, do)
        notes[name] = "kernels: " + json.dumps(A.attention_impls(q, k, v, deterministic=det,
                                                                  impl=impl))
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
                                dkdv_atomic=A.DKDV_ATOMIC_CONFIGS.get(d),
                                dkdv_stash=A.DKDV_STASH_CONFIGS.get(d),
                                dq_ds=A.DQ_DS_CONFIGS.get(d)))
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
        for mine, _, _ in MINE:
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
                              triton_language=_ratios(rows, "ours_triton"),
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
    sections = [("matmul", matmul_peak, True), ("bench", bench, args.bench)]
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
                           for label in (*(m for m, _, _ in MINE), *PEERS) if label in row)
        print(f"{row['name']:>18} {cells}")
    print("summary", json.dumps(results.get("summary")))


if __name__ == "__main__":
    main()
