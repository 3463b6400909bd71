"""What the GPU benchmarks share: the run's provenance, the JSON writer, the timings of the
memory-bound kernels (bench_rmsnorm.py, bench_rope.py), error tails, relative errors, and
the attention inputs and FLOP convention of bench_attention.py and tune_attention.py.

The benchmarks are modules of the `benchmarks` package: run them from the repository root
as `python -m benchmarks.<name>` (benchmarks/gpu_env.sh also puts the root on PYTHONPATH),
so `core`, `kernels` and this module import without path edits.

Timings (bandwidth kernels; every number a median over repetitions):
  * `gpu_ms`: CUDA events around the call after the GPU was kept busy ~2 ms, so the host
    has queued every launch before the start event: the GPU's own time, launch latency
    hidden as in a training step where the host runs ahead; L2 flushed (a 256 MB write)
    before each repetition;
  * `do_bench_ms`: triton.testing.do_bench: host launch latency shows when it exceeds the
    GPU work, as an eager step pays it;
  * `cpu_us`: host microseconds per call while the GPU is busy (the launch overhead itself).
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import torch

from core.paths import git_commit
from core.records import write_json_atomic

# The four attention shapes (b, hq, hkv, s, d): causal, bf16.
ATTENTION_SHAPES = [
    (8, 16, 16, 2048, 128),
    (2, 16, 16, 8192, 128),
    (16, 32, 32, 1024, 64),
    (4, 32, 8, 4096, 128),
]
ATTENTION_FLOPS = "causal: fwd 2*b*hq*s^2*d (4 s*s*d matmuls, halved by the mask); bwd 2.5x, fwd+bwd 3.5x"
SLEEP_CYCLES = 4_000_000  # ~2 ms at H100/H200 clocks: longer than any host path timed here
_FLUSH = []  # the L2 flush buffer, allocated on first use


def commit() -> str:
    """GIT_COMMIT from the environment (the device copy of the tree has no .git), else HEAD."""
    return os.environ.get("GIT_COMMIT") or git_commit() or "unknown"


def provenance(argv=None) -> dict:
    """Device, versions, date (UTC) and commit of this run."""
    import triton

    props = torch.cuda.get_device_properties(0)
    return dict(
        device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
        triton=triton.__version__, python=sys.version.split()[0],
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=commit(), command=" ".join(argv if argv is not None else sys.argv),
    )


def write_json(path, data: dict) -> None:
    """The results file, written atomically (a killed run leaves the previous one whole)."""
    write_json_atomic(path, data)


def error_tail(e: BaseException) -> str:
    """The end of an exception's message: Triton puts the cause after the source excerpt."""
    return f"{type(e).__name__}: {str(e)[-600:]}".replace("\n", " ")


def relerr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Normwise relative error ||x - ref|| / ||ref|| in float64."""
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def tbs(nbytes: float, ms: float) -> float:
    """Effective bandwidth in TB/s (10^12 bytes per second) of nbytes moved in ms."""
    return nbytes / ms / 1e9


def gpu_ms(fn, *, grad_to_none=None, reps: int = 40) -> float:
    """Median GPU time of fn in ms, the host's launch latency hidden (module docstring)."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.int8, device="cuda"))
    fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        for t in grad_to_none or ():
            t.grad = None
        _FLUSH[0].zero_()
        torch.cuda._sleep(SLEEP_CYCLES)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]


def cpu_us(fn, *, grad_to_none=None, calls: int = 20) -> float:
    """Host microseconds per call while the GPU is busy (so the host never waits on it)."""
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES * 20)
    t0 = time.perf_counter()
    for _ in range(calls):
        for t in grad_to_none or ():
            t.grad = None
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def time_all(fn, nbytes: float, grad_to_none=None) -> dict:
    """ms and TB/s under the three timings of the module docstring."""
    from triton.testing import do_bench

    d_ms = do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    g_ms = gpu_ms(fn, grad_to_none=grad_to_none)
    return dict(do_bench_ms=d_ms, do_bench_tbs=tbs(nbytes, d_ms), gpu_ms=g_ms,
                gpu_tbs=tbs(nbytes, g_ms), cpu_us=cpu_us(fn, grad_to_none=grad_to_none))


def kernel_table(fn, grad_to_none) -> str:
    """The kernels one call launches and their device time (torch.profiler, 3 calls)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            for t in grad_to_none:
                t.grad = None
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=10,
                                     max_name_column_width=60)


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
