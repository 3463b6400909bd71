"""Where each step of the best H200 layout goes, step by step, and why steps differ.

    python -m benchmarks.diag_step_phases --out DIR [--variants base,manual_gc,...] [--budget-s 240]

Each variant runs `launch.gpu_trial.run_steps` on llama_1b3 (gbs 16; the H200 sweep's best
layout: cuDNN attention, Triton RMSNorm, CUDA graph, all four fusions) in a fresh process,
with one change, and records for every step (warm-up included):
  * host milliseconds of each phase, named by the point that ends it: `zero_grad` (from the
    clock's start to the schedule's call), `forward_backward` (the schedule: graph replays or
    megatron's), `to_optimizer` (the gap), `optimizer` (the step) and `gpu_wait` (the trial's
    `synchronize` after it: the GPU still working);
  * the GPU's seconds between the same points (CUDA events on the trial's stream);
  * Python garbage collections that started inside the timed step: count, generations, ms;
  * allocator calls in the step (cudaMalloc / cudaFree counts from torch.cuda.memory_stats);
  * the GPU's SM clock, power and temperature over the step (nvidia-smi, sampled every 20 ms
    by the parent process; absent where nvidia-smi is).
"manual_gc" is the trial's own option (`trial.manual_gc`, launch/manual_gc.py). The `adamw`
variant times kernels/adamw.py alone at llama_1b3's parameter sizes for several block sizes
and warp counts, with and without its unmasked whole-block path, beside torch's fused AdamW
and a plain copy. Writes DIR/step_phases.json (provenance, one entry per variant), and
prints every step's figures. `--profile-diff SMALL LARGE` (no GPU) compares two profiled
trial records instead (e.g. mbs 1 against mbs 16): DIR/profile_diff.json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BEST = dict(gbs=16, mbs=16, attention="sdpa_cudnn", norm="triton", cuda_graph=True, swiglu="triton",
            loss="fused", optimizer_step="flat", add_norm="fused")
VARIANTS = {
    "base": {},
    "manual_gc": {"trial": {"manual_gc": True}},
    "qkv_fused": {"trial": {"manual_gc": True}, "layout": {"qkv_grad": "fused"}, "profile": True},
    "adamw": {},
    "mbs1": {"trial": {"manual_gc": True}, "layout": {"qkv_grad": "fused", "mbs": 1}, "profile": True},
    "mbs1_gc_auto": {"layout": {"qkv_grad": "fused", "mbs": 1}},
    "eager": {"layout": {"cuda_graph": False}},
    "eager_manual_gc": {"trial": {"manual_gc": True}, "layout": {"cuda_graph": False}},
}
LLAMA_1B3 = dict(name="llama_1b3", num_layers=24, hidden_size=2048, ffn_hidden_size=5632,
                 num_attention_heads=16, num_query_groups=16, vocab_size=32000, seq_length=2048)
NVSMI_FIELDS = "timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu"


class PhaseClock:
    """Host time and a CUDA event at named points of each step; GC pauses and allocator calls."""

    def __init__(self):
        import torch

        self.torch = torch
        self.steps, self.current, self.gc_events = [], None, []
        self.manual_gc, self.gc_started = False, False  # set where the loop would not do it
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase, info):
        self.gc_events.append((phase, info.get("generation"), time.perf_counter()))

    def mark(self, name: str) -> None:
        if self.current is None:
            return
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        self.current["marks"].append((name, time.perf_counter(), event))

    def begin(self, step: int) -> None:
        stats = self.torch.cuda.memory_stats()
        self.current = {"step": step, "wall_start": time.time(), "marks": [],
                        "alloc0": (stats.get("num_device_alloc", 0), stats.get("num_device_free", 0))}
        self.mark("start")

    def end(self) -> None:
        self.mark("gpu_wait")  # after the trial's own synchronize: the clock has stopped
        stats = self.torch.cuda.memory_stats()
        step, self.current = self.current, None
        step["wall_end"] = time.time()
        step["cuda_malloc"] = stats.get("num_device_alloc", 0) - step["alloc0"][0]
        step["cuda_free"] = stats.get("num_device_free", 0) - step.pop("alloc0")[1]
        self.steps.append(step)

    def summary(self) -> list[dict]:
        self.torch.cuda.synchronize()
        out = []
        for step in self.steps:
            marks = step.pop("marks")
            t0, e0 = marks[0][1], marks[0][2]
            host, gpu = {}, {}
            for (name, t, event), (_, t_prev, e_prev) in zip(marks[1:], marks[:-1]):
                host[name] = round((t - t_prev) * 1e3, 3)
                gpu[name] = round(e_prev.elapsed_time(event), 3)
            t_end = marks[-1][1]
            starts = [(g, t) for phase, g, t in self.gc_events if phase == "start" and t0 <= t <= t_end]
            stops = [t for phase, _, t in self.gc_events if phase == "stop" and t0 <= t <= t_end]
            step.update(host_ms=host, gpu_ms=gpu, wall_ms=round((t_end - t0) * 1e3, 3),
                        gpu_total_ms=round(e0.elapsed_time(marks[-1][2]), 3),
                        gc_count=len(starts), gc_generations=[g for g, _ in starts],
                        gc_ms=round(sum(b - a for (_, a), b in zip(starts, stops)) * 1e3, 3))
            out.append(step)
        return out


def _instrument(gpu_trial, clock: PhaseClock) -> None:
    """Hooks at the schedule, the optimizer and the profiler's begin/end (called right before
    the clock starts and right after it stops), in either layout of launch.gpu_trial."""
    from launch import flat_step
    from launch.profile import StepProfiler

    def wrap(fn, before: str, after: str):
        def wrapped(*args, **kwargs):
            clock.mark(before)
            result = fn(*args, **kwargs)
            clock.mark(after)
            return result
        return wrapped

    begin, end = StepProfiler.begin, StepProfiler.end

    def hooked_begin(self, step):
        begin(self, step)
        if clock.manual_gc and not clock.gc_started:  # a tree whose loop lacks trial.manual_gc
            clock.gc_started = True
            gc.collect()
            gc.freeze()
            gc.disable()
        clock.begin(step)

    def hooked_end(self, step):
        clock.end()
        end(self, step)
        if clock.manual_gc:
            gc.collect()  # between steps, as launch.manual_gc does

    StepProfiler.begin, StepProfiler.end = hooked_begin, hooked_end
    flat_step.step = wrap(flat_step.step, "to_optimizer", "optimizer")
    graph_class = gpu_trial.MicrobatchGraph

    class TimedGraph(graph_class):
        def __call__(self, **kwargs):
            return wrap(super().__call__, "zero_grad", "forward_backward")(**kwargs)

    gpu_trial.MicrobatchGraph = TimedGraph
    schedule = gpu_trial.get_forward_backward_func
    gpu_trial.get_forward_backward_func = lambda: wrap(schedule(), "zero_grad", "forward_backward")


def trial_child(variant: str, out: Path, steps: int) -> dict:
    import torch

    import launch.gpu_trial as gpu_trial
    from core.config import ClusterConfig, Layout, ModelConfig, TrialConfig
    from core.spec import TrialSpec
    from launch import distributed

    change = VARIANTS[variant]
    layout = Layout(**{**BEST, **change.get("layout", {})})
    trial = TrialConfig(**{"warmup_steps": 2, "measure_steps": steps, "profile": bool(change.get("profile")),
                           **change.get("trial", {})})
    spec = TrialSpec(model=ModelConfig(**LLAMA_1B3), layout=layout, trial=trial,
                     cluster=ClusterConfig(name="local_h200", device="cuda", gpus_per_node=1, nodes=1,
                                           gpu_memory_gb=139.8, peak_tflops=989.4),
                     trial_dir=str(out / variant))
    Path(spec.trial_dir).mkdir(parents=True, exist_ok=True)
    clock = PhaseClock()
    clock.manual_gc = trial.manual_gc and not _loop_has_manual_gc()
    _instrument(gpu_trial, clock)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(29500 + os.getpid() % 1000))
    distributed.init(layout, device="cuda", timeout_s=120)
    record = gpu_trial.run_steps(spec, rank=0, world=1)
    distributed.shutdown()
    times = record["step_times_s"][trial.warmup_steps:]
    result = {"variant": variant, "layout": layout.name, "trial": change.get("trial", {}),
              "manual_gc_in_loop": _loop_has_manual_gc(), "manual_gc_by_diag": clock.manual_gc,
              "step_times_s": record["step_times_s"],
              "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
              "even_median_s": statistics.median(times[0::2]), "odd_median_s": statistics.median(times[1::2]),
              "steps": clock.summary(), "peak_memory_gb": record.get("peak_memory_gb"),
              "losses": record.get("losses")}
    if "breakdown" in record:
        result["breakdown"] = record["breakdown"]
    return result


def _loop_has_manual_gc() -> bool:
    """Whether this tree's step loop honours trial.manual_gc (else the variant measures nothing)."""
    import inspect

    import launch.gpu_trial as gpu_trial

    sources = inspect.getsource(gpu_trial)
    try:
        import launch.loop as loop

        sources += inspect.getsource(loop)
    except ImportError:
        pass
    return "ManualGC" in sources


def adamw_child() -> dict:
    """kernels/adamw.py alone at llama_1b3's 147 parameter sizes (fp32 p, g, m, v; bf16 w)."""
    import torch

    from benchmarks.common import gpu_ms
    from kernels import adamw

    h, f, v, L = 2048, 5632, 32000, 24
    shapes = [(v, h), (v, h), (h,)] + [s for _ in range(L) for s in ((3 * h, h), (h, h), (2 * f, h), (h, f), (h,), (h,))]
    make = lambda dtype: [torch.rand(s, device="cuda", dtype=dtype) for s in shapes]  # noqa: E731
    p, g, m, w = make(torch.float32), make(torch.float32), make(torch.float32), make(torch.bfloat16)
    sq = make(torch.float32)
    numel = sum(t.numel() for t in p)
    bytes_moved = 30 * numel  # read p, g, m, v (16 B), write p, m, v (12 B) and w (2 B)
    scale = torch.ones((), device="cuda")
    hyper = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)

    def timed(fn) -> float:
        return gpu_ms(fn, reps=8)  # 16 ms a call: launch latency and L2 do not matter here

    rows = []
    configs = [(2048, 8, False)] + [(b, n, True) for b in (2048, 4096, 8192) for n in (4, 8, 16)]
    for block, warps, whole in configs:  # the first: the kernel as it was (every block masked)
        table = adamw.TensorTable(p, g, m, sq, w, block=block, num_warps=warps, whole_blocks=whole)
        ms = timed(lambda: adamw.step(table, step_count=3, scale=scale, **hyper))  # noqa: B023
        rows.append({"block": block, "num_warps": warps, "whole_blocks": whole, "ms": round(ms, 3),
                     "tb_s": round(bytes_moved / ms / 1e9, 3)})
        print(f"adamw block {block} warps {warps} whole {whole}: {ms:.2f} ms {rows[-1]['tb_s']:.2f} TB/s",
              flush=True)
    steps = [torch.tensor(3.0, device="cuda") for _ in p]
    try:
        fused = timed(lambda: torch._fused_adamw_(p, g, m, sq, [], steps, lr=1e-4, beta1=0.9, beta2=0.999,
                                                  weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False))
    except (RuntimeError, TypeError) as exc:  # a peer figure, not the measurement
        print(f"torch fused AdamW failed: {exc}", flush=True)
        fused = float("nan")
    copy = timed(lambda: torch._foreach_copy_(w, p))
    big = torch.empty(2**30, device="cuda")
    big2 = torch.empty_like(big)
    plain = timed(lambda: big2.copy_(big))
    return {"variant": "adamw", "params": numel, "bytes_per_param": 30, "rows": rows,
            "torch_fused_adamw_ms": round(fused, 3), "bf16_copy_ms": round(copy, 3),
            "torch_fused_plus_copy_tb_s": round(bytes_moved / (fused + copy) / 1e9, 3),
            "copy_4gib_tb_s": round(2 * big.numel() * 4 / plain / 1e9, 3),
            "convention": "TB/s = 30 bytes/param x params / kernel time (1e12 bytes); copy: read+write"}


def _kernel_class(kernel: dict) -> str:
    """A profiled kernel's class: its breakdown category, with the GEMMs split by whether they
    add into their output (cuBLAS's nvjet names say `badd`: the weight-gradient GEMMs that
    accumulate into the fp32 main_grad, kernels/wgrad.py) or overwrite it (`bz`)."""
    if kernel["category"] == "matmul":
        return "matmul_accumulate" if "badd" in kernel["name"] else "matmul_overwrite"
    return kernel["category"]


def profile_diff(small_path: Path, large_path: Path) -> dict:
    """Where a profiled trial (e.g. mbs 1) spends more GPU time than another (e.g. mbs 16): the
    breakdown's categories, the GEMMs split as `_kernel_class` says, and the kernels that
    differ most; milliseconds per step, from the two records' `breakdown` as written."""
    records = [json.loads(Path(p).read_text()) for p in (small_path, large_path)]
    breakdowns = [next(r["breakdown"] for r in [rec, *rec.get("ranks", [])] if r.get("breakdown"))
                  for rec in records]
    classes, kernels = [{}, {}], [{}, {}]
    for side, bd in enumerate(breakdowns):
        for k in bd["top_kernels"]:
            cls = _kernel_class(k)
            classes[side][cls] = classes[side].get(cls, 0.0) + k["total_s"] * 1e3
            kernels[side][k["name"]] = (k["count"], k["total_s"] * 1e3)
    names = sorted(set(kernels[0]) | set(kernels[1]),
                   key=lambda n: -abs(kernels[0].get(n, (0, 0))[1] - kernels[1].get(n, (0, 0))[1]))
    ms = lambda d: {k: round(v * 1e3, 2) for k, v in d.items()}  # noqa: E731
    return {
        "trials": [r["trial"] for r in records], "git_commits": [r.get("git_commit") for r in records],
        "devices": [bd.get("device") for bd in breakdowns], "recorded_at": [r.get("recorded_at") for r in records],
        "step_s": [bd["step_s"] for bd in breakdowns],
        "categories_ms": [ms(bd["categories"]) for bd in breakdowns],
        "top_kernel_classes_ms": [{k: round(v, 2) for k, v in c.items()} for c in classes],
        "kernels_differing_most": [
            {"name": n, "ms": [round(kernels[i].get(n, (0, 0.0))[1], 2) for i in (0, 1)],
             "count": [kernels[i].get(n, (0, 0))[0] for i in (0, 1)]} for n in names[:20]],
        "convention": "GPU ms per step in the profiled (extra, untimed) step; top_kernels only "
                      "(the breakdown's list), categories complete and summing to step_s",
    }


def _nvsmi_samples(path: Path) -> list[tuple]:
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = [x.strip() for x in line.split(",")]
        try:
            stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            rows.append((stamp, *(float(x) for x in parts[1:5])))
        except (ValueError, IndexError):
            continue
    return rows


def _attach_clocks(result: dict, samples: list[tuple]) -> None:
    for step in result.get("steps", []):
        inside = [s for s in samples if step["wall_start"] <= s[0] <= step["wall_end"]]
        if inside:
            step["sm_mhz"] = round(statistics.mean(s[1] for s in inside))
            step["mem_mhz"] = round(statistics.mean(s[2] for s in inside))
            step["power_w"] = round(statistics.mean(s[3] for s in inside), 1)
            step["temp_c"] = max(s[4] for s in inside)
            step["clock_samples"] = len(inside)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default="base,manual_gc,qkv_fused,adamw,mbs1")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per variant")
    parser.add_argument("--budget-s", type=float, default=300.0, help="start no variant after this")
    parser.add_argument("--child")
    parser.add_argument("--work", type=Path, help="(child) where its JSON and trial files go")
    parser.add_argument("--profile-diff", nargs=2, type=Path, metavar=("SMALL", "LARGE"),
                        help="two profiled result.json files: write DIR/profile_diff.json, run nothing")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile_diff:
        missing = [p for p in args.profile_diff if not p.is_file()]
        if missing:
            print(f"no such result.json: {missing[0]}", file=sys.stderr)
            return 2
        diff = profile_diff(*args.profile_diff)
        (args.out / "profile_diff.json").write_text(json.dumps(diff, indent=1))
        print(json.dumps(diff["top_kernel_classes_ms"]), json.dumps(diff["categories_ms"]))
        return 0
    if args.child:
        result = adamw_child() if args.child == "adamw" else trial_child(args.child, args.work, args.steps)
        (args.work / f"{args.child}.json").write_text(json.dumps(result, indent=1))
        return 0
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        print(f"unknown variant {unknown[0]} (known: {', '.join(VARIANTS)})", file=sys.stderr)
        return 2
    from benchmarks.common import provenance, write_json

    # Children's files and the clock samples stay out of --out: the device tool brings back
    # only a few files, so --out holds one JSON, rewritten after every variant.
    work = Path(tempfile.mkdtemp(prefix="step_phases_"))
    started, results, header = time.time(), [], provenance()
    for variant in args.variants.split(","):
        if time.time() - started > args.budget_s:
            results.append({"variant": variant, "skipped": f"budget of {args.budget_s:.0f} s spent"})
            continue
        smi_path = work / f"{variant}_nvsmi.csv"
        try:
            smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={NVSMI_FIELDS}", "--format=csv,noheader,nounits",
                                    "-lms", "20"], stdout=smi_path.open("w"), stderr=subprocess.DEVNULL)
        except OSError:
            smi = None
        t = time.time()
        proc = subprocess.run([sys.executable, "-m", "benchmarks.diag_step_phases", "--out", str(args.out),
                               "--work", str(work), "--steps", str(args.steps), "--child", variant],
                              capture_output=True, text=True)
        if smi:
            smi.terminate()
            smi.wait()
        path = work / f"{variant}.json"
        if proc.returncode or not path.exists():
            results.append({"variant": variant, "error": (proc.stdout + proc.stderr)[-3000:]})
        else:
            results.append(json.loads(path.read_text()))
            _attach_clocks(results[-1], _nvsmi_samples(smi_path))
        r = results[-1]
        r["wall_s"] = round(time.time() - t, 1)
        print(f"== {variant}: {r.get('median_s', float('nan')):.4f} s/step median, even {r.get('even_median_s', 0):.4f} "
              f"odd {r.get('odd_median_s', 0):.4f} ({r['wall_s']} s wall)"
              + (f" ERROR {r['error'][-1500:]}" if "error" in r else ""), flush=True)
        for step in r.get("steps", []):
            print(f"   step {step['step']}: wall {step['wall_ms']:.1f} gpu {step['gpu_total_ms']:.1f} host {step['host_ms']} "
                  f"gpu {step['gpu_ms']} gc {step['gc_count']}x{step['gc_ms']}ms malloc {step['cuda_malloc']}/"
                  f"{step['cuda_free']} sm {step.get('sm_mhz')} MHz {step.get('power_w')} W", flush=True)
        write_json(args.out / "step_phases.json", {**header, "best_layout": BEST, "variants": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
