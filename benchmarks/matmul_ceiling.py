"""The device's matmul and copy ceilings, for reading a profiled step against them.

    python -m benchmarks.matmul_ceiling --out DIR [--tokens 32768]

bf16 GEMMs through torch (cuBLAS, as the trials use it): 8192^3, and llama_1b3's own
shapes at `--tokens` tokens per micro-batch (the forward, input-gradient and
weight-gradient GEMM of each linear; the weight gradient accumulates into fp32 like
kernels/wgrad.py). Each is timed with CUDA events, median of 20 after 5 warm-ups;
TFLOP/s = 2*M*N*K / time. The copy ceiling is a device-to-device copy of 1 GiB (bytes
read + written / time). Writes DIR/matmul_ceiling.json with the device, date and commit
(benchmarks.common.provenance).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from benchmarks.common import provenance, write_json

HIDDEN, FFN, VOCAB = 2048, 5632, 32000  # llama_1b3 (conf/model/llama_1b3.yaml)
LINEARS = {"qkv": (HIDDEN, 3 * HIDDEN), "proj": (HIDDEN, HIDDEN), "fc1": (HIDDEN, 2 * FFN),
           "fc2": (FFN, HIDDEN), "output": (HIDDEN, VOCAB)}  # (in, out)


def _median_ms(fn, warmup: int = 5, reps: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gemm_tflops(m: int, n: int, k: int, *, fp32_accumulate: bool = False) -> float:
    """C[m, n] = A[m, k] @ B[k, n] in bf16 (or C += ... into fp32, the wgrad GEMM)."""
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    if fp32_accumulate:
        c = torch.zeros(m, n, device="cuda", dtype=torch.float32)
        ms = _median_ms(lambda: torch.addmm(c, a, b, out_dtype=torch.float32, out=c))
    else:
        ms = _median_ms(lambda: a @ b)
    return 2.0 * m * n * k / ms / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per micro-batch (mbs x seq)")
    args = ap.parse_args()
    t = args.tokens
    result = {**provenance(), "tokens": t, "convention": "TFLOP/s = 2*M*N*K / median CUDA-event time; bf16 inputs",
              "square_8192": gemm_tflops(8192, 8192, 8192), "shapes": {}}
    for name, (k_in, n_out) in LINEARS.items():
        result["shapes"][name] = {
            "forward": gemm_tflops(t, n_out, k_in),  # [t, in] @ [in, out]
            "dgrad": gemm_tflops(t, k_in, n_out),  # [t, out] @ [out, in]
            "wgrad_fp32": gemm_tflops(n_out, k_in, t, fp32_accumulate=True),  # [out, t] @ [t, in]
        }
    x = torch.empty(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    result["copy_tb_s"] = 2 * x.numel() * 2 / _median_ms(lambda: y.copy_(x)) / 1e9
    write_json(args.out / "matmul_ceiling.json", result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
