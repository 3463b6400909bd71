"""Where a GPU step's time goes when it is host-bound: one process per variant.

    python benchmarks/diag_step_overhead.py --out DIR [--mbs 1 --variants ours,no_fusions,...]

DIAG_CUDA_GRAPH=1 runs every variant with the layout's CUDA graph (launch/step_graph.py).

Each variant runs `launch.gpu_trial` on llama_1b3 (gbs 16) in a fresh process, with one
change to the trial's configuration, and reports the median step time and the host
time of a step (the wall time until `optimizer.step()` returns, before synchronising:
when that equals the step time, Python, not the GPU, sets the pace). One variant also
runs cProfile over the measured steps and lists the functions with the most own time.
Writes DIR/step_overhead.json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path


VARIANTS = {
    "ours": {},
    "no_swiglu_fusion": {"config": {"bias_activation_fusion": False}},
    "no_ce_fusion": {"config": {"cross_entropy_loss_fusion": False}},
    "no_fusions": {"config": {"bias_activation_fusion": False, "cross_entropy_loss_fusion": False}},
    "torch_norm": {"layout": {"norm": "torch"}},
    "plain_rng": {"plain_rng": True},
    "no_wgrad_fusion": {"no_wgrad_fusion": True},  # kernels/wgrad.py's linears left out
    # The fusions of issue 17, one at a time and together.
    "swiglu_triton": {"layout": {"swiglu": "triton"}},
    "loss_fused": {"layout": {"loss": "fused"}},
    "opt_flat": {"layout": {"optimizer_step": "flat"}},
    "fusions": {"layout": {"swiglu": "triton", "loss": "fused", "optimizer_step": "flat"}},
    "anchor_like": {"config": {"bias_activation_fusion": False, "cross_entropy_loss_fusion": False},
                    "layout": {"norm": "torch"}, "plain_rng": True, "unfused_adam": True},
}


def child(variant: str, mbs: int, profile: bool, out: Path) -> None:
    import torch

    import launch.gpu_trial as gpu_trial
    from core.config import ClusterConfig, Layout, ModelConfig, TrialConfig
    from core.spec import TrialSpec
    from launch import distributed

    change = VARIANTS[variant]
    model = ModelConfig(name="llama_1b3", num_layers=24, hidden_size=2048, ffn_hidden_size=5632,
                        num_attention_heads=16, num_query_groups=16, vocab_size=32000, seq_length=2048)
    cluster = ClusterConfig(name="local_gpu", device="cuda", gpus_per_node=1, nodes=1,
                            gpu_memory_gb=79.1, peak_tflops=989.4)
    layout = Layout(**{"mbs": mbs, "gbs": 16, "attention": "sdpa_cudnn", "norm": "triton",
                       "cuda_graph": os.environ.get("DIAG_CUDA_GRAPH") == "1", **change.get("layout", {})})
    spec = TrialSpec(model=model, cluster=cluster, layout=layout,
                     trial=TrialConfig(warmup_steps=2, measure_steps=4), trial_dir=str(out / variant))

    base_config = gpu_trial.transformer_config

    def config(*args, **kwargs):
        cfg = base_config(*args, **kwargs)
        for key, value in change.get("config", {}).items():
            setattr(cfg, key, value)
        return cfg

    gpu_trial.transformer_config = config
    if change.get("plain_rng"):
        seed = gpu_trial.model_parallel_cuda_manual_seed
        gpu_trial.model_parallel_cuda_manual_seed = lambda s, **_: seed(s)
    if change.get("no_wgrad_fusion"):
        gpu_trial.wgrad.available = lambda device: False  # megatron's own linears, unfused
    if change.get("unfused_adam"):
        gpu_trial._use_fused_adam = lambda optimizer: None

    # Host time of a step: from the profiler's begin hook to optimizer.step()'s return.
    host, marks, prof = [], {}, cProfile.Profile()
    warmup = spec.trial.warmup_steps

    def begin(self, step):
        marks["start"], marks["step"] = time.perf_counter(), step
        if profile and step >= warmup:
            prof.enable()

    def timed(step_fn):
        def timed_step(*a, **k):
            result = step_fn(*a, **k)
            if profile and marks["step"] >= warmup:
                prof.disable()
            host.append(time.perf_counter() - marks["start"])
            return result

        return timed_step

    def wrap_optimizer(optimizer):
        optimizer.step = timed(optimizer.step)
        return optimizer

    gpu_trial.flat_step.step = timed(gpu_trial.flat_step.step)  # optimizer_step=flat
    gpu_trial.StepProfiler.begin = begin
    base_get = gpu_trial.get_megatron_optimizer
    gpu_trial.get_megatron_optimizer = lambda *a, **k: wrap_optimizer(base_get(*a, **k))

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(29500 + os.getpid() % 1000))
    distributed.init(layout, device="cuda", timeout_s=120)
    record = gpu_trial.run_steps(spec, rank=0, world=1)
    distributed.shutdown()
    steps = record["step_times_s"][warmup:]
    result = {"variant": variant, "mbs": mbs, "step_s": statistics.median(steps),
              "host_s": statistics.median(host[warmup:]), "steps": steps,
              "peak_memory_gb": record["peak_memory_gb"], "setup_s": record["setup_s"],
              "device": torch.cuda.get_device_name()}
    if profile:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(45)
        result["cprofile_tottime"] = text.getvalue()[-12000:]
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(45)
        result["cprofile_cumulative"] = text.getvalue()[-12000:]
    (out / f"{variant}_mbs{mbs}.json").write_text(json.dumps(result, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mbs", default="1")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--profile", default="ours")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "MBS", "PROFILE"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2] == "1", args.out)
        return 0
    results = []
    for mbs in args.mbs.split(","):
        for variant in args.variants.split(","):
            profile = "1" if variant in args.profile.split(",") and mbs == args.mbs.split(",")[0] else "0"
            t = time.time()
            proc = subprocess.run([sys.executable, __file__, "--out", str(args.out),
                                   "--child", variant, mbs, profile], capture_output=True, text=True)
            path = args.out / f"{variant}_mbs{mbs}.json"
            if proc.returncode or not path.exists():
                results.append({"variant": variant, "mbs": int(mbs), "error": proc.stderr[-3000:]})
            else:
                results.append(json.loads(path.read_text()))
            r = results[-1]
            print(f"{variant:18s} mbs{mbs} step {r.get('step_s', float('nan')):.3f}s "
                  f"host {r.get('host_s', float('nan')):.3f}s ({time.time() - t:.0f}s wall)"
                  + (f" ERROR {r['error'][-400:]}" if "error" in r else ""), flush=True)
    (args.out / "step_overhead.json").write_text(json.dumps(results, indent=1))
    for r in results:
        if "cprofile_tottime" in r:
            print(r["cprofile_tottime"][:7000])
            print(r["cprofile_cumulative"][:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
