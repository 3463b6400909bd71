"""What the GPU benchmarks share: the run's provenance, error tails, relative errors, and the
attention inputs and FLOP convention of bench_attention.py and tune_attention.py.

Run the benchmarks from the repository root as modules (`python -m benchmarks.bench_attention`)
or with the root on PYTHONPATH (benchmarks/gpu_env.sh sets it), so `kernels` and this module
import without path edits.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch

# The four attention shapes (b, hq, hkv, s, d): causal, bf16.
ATTENTION_SHAPES = [
    (8, 16, 16, 2048, 128),
    (2, 16, 16, 8192, 128),
    (16, 32, 32, 1024, 64),
    (4, 32, 8, 4096, 128),
]
ATTENTION_FLOPS = "causal: fwd 2*b*hq*s^2*d (4 s*s*d matmuls, halved by the mask); bwd 2.5x, fwd+bwd 3.5x"


def provenance(argv=None) -> dict:
    """Device, versions, date (UTC) and commit of this run; GIT_COMMIT names the commit
    (the device copy of the tree has no .git)."""
    import triton

    props = torch.cuda.get_device_properties(0)
    return dict(
        device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
        triton=triton.__version__, python=sys.version.split()[0],
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=os.environ.get("GIT_COMMIT", "unknown"),
        command=" ".join(argv if argv is not None else sys.argv),
    )


def error_tail(e: BaseException) -> str:
    """The end of an exception's message: Triton puts the cause after the source excerpt."""
    return f"{type(e).__name__}: {str(e)[-600:]}".replace("\n", " ")


def relerr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Normwise relative error ||x - ref|| / ||ref|| in float64."""
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def attention_flops_fwd(b, hq, s, d) -> float:
    return 2.0 * b * hq * s * s * d


def attention_inputs(b, hq, hkv, s, d, dtype=torch.bfloat16, seed=0):
    """q [b, s, hq, d], k, v [b, s, hkv, d], do [b, s, hq, d]: standard normal, on CUDA."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, s, hq, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype, generator=g)
    do = torch.randn(b, s, hq, d, device="cuda", dtype=dtype, generator=g)
    return q, k, v, do


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)
