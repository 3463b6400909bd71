"""Megatron-LM's own trainer running our recommendation, against our own trial of the same layout (one GPU).

    . benchmarks/gpu_env.sh && python3 benchmarks/bench_megatron_lm.py            # the default layout
    python3 benchmarks/bench_megatron_lm.py --set mbs=4 --set cuda_graph=false    # another layout
    python3 benchmarks/bench_megatron_lm.py --dry-run --out /tmp/b                # CPU: commands and JSON only
    # split over two device calls, into one JSON (the second keeps the first's measured runs):
    python3 benchmarks/bench_megatron_lm.py --out $OUT --parts megatron_lm,trial,trial_no_cuda_graph
    python3 benchmarks/bench_megatron_lm.py --out $OUT --merge benchmarks/results/megatron_lm_<date>.json

In one call, in this order (a part starts only while --budget-s allows it; a failed part is
recorded with its error and never loses the others; the JSON is rewritten after every part):
1. megatron_lm: `.peer/megatron_lm/run.sh` (a copy of ../shared/megatron_lm) with the exports and
   the `pretrain_gpt.py` arguments that `layout-recommend --format megatron-lm` prints for this
   layout (analysis.megatron_args.megatron_lm_command, the function it prints from), then
   `--train-iters STEPS`; its --spec NAME carries the weight-gradient fusion and qkv_grad
   (`_wgrad_fusion`, `_fused_qkv_grad`) since commit 364e8f7: megatron_lm_2026-12-01_v3.json
   (555.5 ms) ran the line before, without them (the JSON keeps the command it ran);
2. trial: our trial of the layout, `python3 -m launch.main model=... cluster=...` as
   benchmarks/run_gpu_sweep.sh runs it, warm-up 2 and STEPS - 2 measured steps;
3. trial_no_cuda_graph: the same with layout.cuda_graph=false (when the layout has it on);
4. trial_no_wgrad_fusion: the same trial in one process (launch.gpu_trial.run_steps, as
   benchmarks/diag_step_overhead.py does) without kernels/wgrad.py's linears;
5. trial_unfused_adam: the same with megatron's torch AdamW left on its multi-tensor path, as
   Megatron-LM without Apex/TE steps it (our trials switch it to torch's fused kernel);
6. megatron_lm_cuda_graph_local: Megatron-LM again with `--cuda-graph-impl local`, the nearest
   Megatron-LM setting to our per-micro-batch graph (per-layer graphs), to see what it gives.

Convention: ms per training step (one optimizer step over gbs sequences). Megatron-LM: the
median of its "elapsed time per iteration" from iteration 3 (run.sh's own summary line); our
trial: the median of its CUDA-synchronised measured steps (the record's step_time_s).
`megatron_lm_over_trial` = trial_ms / megatron_lm_ms (1.0: Megatron-LM as fast as our trial;
target >= 0.9). Writes benchmarks/results/megatron_lm_<date>.json with device, date, commit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from analysis.megatron_args import megatron_lm_command  # noqa: E402
from analysis.recommend import load_preset  # noqa: E402
from core.config import (  # noqa: E402
    ConfigError,
    Layout,
    cluster_from_dict,
    layout_from_dict,
    model_from_dict,
)
from core.paths import git_commit  # noqa: E402
from core.records import write_json_atomic  # noqa: E402

# The best layout of the single-GPU sweep (README, H100 2026-11-23): mbs 8, a CUDA graph per
# micro-batch, cuDNN attention, Triton RMSNorm, distributed optimizer.
DEFAULT_LAYOUT = dict(tp=1, pp=1, mbs=8, gbs=16, distributed_optimizer=True, attention="sdpa_cudnn",
                      norm="triton", cuda_graph=True)
RUN_SH = REPO / ".peer" / "megatron_lm" / "run.sh"
MEDIAN_LINE = re.compile(r"median of iterations >= 3: ([\d.]+) ms/iteration, ([\d.]+) TFLOP/s/GPU \(n=(\d+)\)")
PARTS = ("megatron_lm", "trial", "trial_no_cuda_graph", "trial_no_wgrad_fusion", "trial_unfused_adam",
         "megatron_lm_cuda_graph_local")
PART_NEED_S = 90  # a part starts only with this much budget left
TARGET = 0.9


def parse_layout(sets: list[str]) -> Layout:
    """The default layout with `--set field=value` changes; ConfigError names a bad one."""
    values = dict(DEFAULT_LAYOUT)
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes field=value, got {item!r}")
        values[key] = {"true": True, "false": False}.get(raw.lower(), int(raw) if raw.isdigit() else raw)
    return layout_from_dict(values)


def megatron_lm_shell(cmd, steps: int, extra: list[str] = ()) -> str:
    """The printed block, run unchanged but for its program: run.sh stands for pretrain_gpt.py,
    and the benchmark's length goes after the printed arguments (argparse: the last one wins)."""
    exports = [f"export {k}={v}" for k, v in cmd.env.items()]
    run = shlex.join(["bash", str(RUN_SH), *cmd.args, "--train-iters", str(steps), *extra])
    return "\n".join(exports + [run])


def parse_megatron_lm(text: str) -> dict:
    """run.sh's summary: median ms and Megatron-LM's TFLOP/s/GPU of iterations >= 3."""
    match = MEDIAN_LINE.search(text)
    if not match:
        raise ValueError("no 'median of iterations >= 3' line in run.sh's output")
    return {"ms": float(match.group(1)), "megatron_tflops_per_gpu": float(match.group(2)),
            "iterations": int(match.group(3))}


def parse_trial_record(path: Path) -> dict:
    record = json.loads(path.read_text())
    if record.get("status") != "ok":
        raise ValueError(f"trial {record.get('status')}: {str(record.get('reason'))[:300]}")
    steps = record["step_times_s"]
    return {"ms": 1000 * record["step_time_s"], "steps_ms": [round(1000 * s, 2) for s in steps],
            "mfu_palm": (record.get("mfu") or {}).get("palm"), "peak_memory_gb": record.get("peak_memory_gb_max"),
            "wgrad_fusion": (record.get("ranks") or [{}])[0].get("wgrad_fusion")}


def trial_overrides(model: str, cluster: str, layout: Layout, steps: int, sweep_dir: Path) -> list[str]:
    """launch.main's arguments for exactly this layout: one grid point, nothing pruned."""
    fields = {f"layout.{k}": v for k, v in dataclasses.asdict(layout).items()}
    return [f"model={model}", f"cluster={cluster}", "sweep=h100_smoke", f"hydra.sweep.dir={sweep_dir}",
            "sweep.name=bench_megatron_lm", "sweep.prune_predicted_oom=false",
            "trial.warmup_steps=2", f"trial.measure_steps={steps - 2}", "trial.timeout_s=400",
            *(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in fields.items())]


CHILD_VARIANTS = ("no_wgrad_fusion", "unfused_adam")


def child(variant: str, model_name: str, cluster_name: str, layout: Layout, steps: int, out: Path) -> None:
    """One process, one rank: our trial with one of its own speed-ups taken out, patched in
    this process only (diag_step_overhead's way)."""
    import launch.gpu_trial as gpu_trial
    from core.config import TrialConfig
    from core.spec import TrialSpec
    from launch import distributed

    if variant == "no_wgrad_fusion":
        gpu_trial.wgrad.available = lambda device: False  # megatron's own linears, unfused
    elif variant == "unfused_adam":
        gpu_trial._use_fused_adam = lambda optimizer: None
    else:
        raise ValueError(f"unknown child variant {variant!r} (known: {', '.join(CHILD_VARIANTS)})")
    spec = TrialSpec(model=model_from_dict(load_preset("model", model_name)),
                     cluster=cluster_from_dict(load_preset("cluster", cluster_name)), layout=layout,
                     trial=TrialConfig(warmup_steps=2, measure_steps=steps - 2), trial_dir=str(out))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(29500 + os.getpid() % 1000))
    distributed.init(layout, device="cuda", timeout_s=120)
    record = gpu_trial.run_steps(spec, rank=0, world=1)
    distributed.shutdown()
    measured = record["step_times_s"][2:]
    (out / f"{variant}.json").write_text(json.dumps({
        "ms": 1000 * statistics.median(measured), "steps_ms": [round(1000 * s, 2) for s in measured],
        "wgrad_fusion": record.get("wgrad_fusion")}))


def _earlier_runs(path: Path, model: str, layout: Layout) -> dict:
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--merge {path}: {exc}") from exc
    if not isinstance(earlier, dict) or (earlier.get("model"), earlier.get("layout_name")) != (model, layout.name):
        raise ConfigError(f"--merge {path} is not a run of {model} {layout.name}")
    return earlier.get("runs") or {}


def summarize(runs: dict, device: str) -> dict:
    ms = {name: run.get("ms") for name, run in runs.items()}
    mlm, trial = ms.get("megatron_lm"), ms.get("trial")
    summary = {"device": device, "megatron_lm_ms": mlm, "trial_ms": trial,
               "megatron_lm_over_trial": round(trial / mlm, 3) if mlm and trial else None, "target": TARGET}
    for variant in ("trial_no_cuda_graph", "trial_no_wgrad_fusion", "trial_unfused_adam"):
        summary[f"{variant}_ms"] = ms.get(variant)
        summary[f"megatron_lm_over_{variant}"] = round(ms[variant] / mlm, 3) if mlm and ms.get(variant) else None
        # The part of Megatron-LM's gap to our trial that this feature explains (ms per step).
        summary[f"gap_ms_from_{variant.removeprefix('trial_').removeprefix('no_')}"] = (
            round(ms[variant] - trial, 1) if trial and ms.get(variant) else None)
    summary["megatron_lm_cuda_graph_local_ms"] = ms.get("megatron_lm_cuda_graph_local")
    summary["gap_ms"] = round(mlm - trial, 1) if mlm and trial else None
    summary["meets_target"] = (summary["megatron_lm_over_trial"] >= TARGET
                               if summary["megatron_lm_over_trial"] is not None else None)
    return summary


def _device() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "unknown"


def _run(name: str, argv: list[str], *, timeout_s: float, log: Path, env=None) -> tuple[int, str]:
    print(f"== {name}: {shlex.join(argv)[:600]}", flush=True)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=REPO, env=env)
        text, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        text, rc = f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {timeout_s:.0f} s", 124
    log.write_text(text if isinstance(text, str) else text.decode(errors="replace"))
    return rc, text if isinstance(text, str) else text.decode(errors="replace")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_1b3")
    parser.add_argument("--cluster", default="local_h200", help="our trial's cluster preset (one GPU)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change the default layout (tp=1 pp=1 mbs=8 gbs=16 distributed optimizer, "
                             "sdpa_cudnn + triton, cuda_graph)")
    parser.add_argument("--steps", type=int, default=12, help="iterations/steps per run (>= 4)")
    parser.add_argument("--budget-s", type=float, default=540)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tag", default=f"megatron_lm_{time.strftime('%Y-%m-%d')}")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and write the JSON, run nothing")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"which parts to run, comma-separated (default all: {','.join(PARTS)})")
    parser.add_argument("--merge", type=Path, help="an earlier JSON of this layout: keep its runs, "
                        "run only the --parts it lacks (a benchmark split over two device calls)")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        layout = parse_layout(args.set)
        if args.steps < 4:
            raise ConfigError(f"--steps must be >= 4 (2 warm-up), got {args.steps}")
        model = model_from_dict(load_preset("model", args.model))
        load_preset("cluster", args.cluster)
        cmd = megatron_lm_command(model, layout, world_size=1)
        parts = [p for p in args.parts.split(",") if p]
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise ConfigError(f"unknown part {unknown[0]!r} (known: {', '.join(PARTS)})")
        earlier = _earlier_runs(args.merge, args.model, layout) if args.merge else {}
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.child:
        child(args.child[0], args.model, args.cluster, layout, args.steps, Path(args.child[1]))
        return 0
    start = time.time()
    work = args.out / f"{args.tag}_work"
    work.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "benchmarks/bench_megatron_lm.py", "device": "dry run" if args.dry_run else _device(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": git_commit(), "model": args.model,
              "cluster": args.cluster, "layout": dataclasses.asdict(layout), "layout_name": layout.name,
              "steps": args.steps, "megatron_lm_command": cmd.as_dict(), "runs": dict(earlier),
              "convention": __doc__.split("Convention: ", 1)[1].split("\n\n")[0].replace("\n", " ")}
    path = args.out / f"{args.tag}.json"

    def part(name: str, argv: list[str], parse, *, env=None) -> None:
        left = args.budget_s - (time.time() - start)
        if name not in parts or "ms" in result["runs"].get(name, {}):
            return  # not asked for, or measured already (--merge)
        if args.dry_run:
            result["runs"][name] = {"dry_run": shlex.join(argv)}
        elif left < PART_NEED_S:
            result["runs"][name] = {"error": f"skipped: {left:.0f} s of the budget left"}
        else:
            t0 = time.time()
            rc, text = _run(name, argv, timeout_s=min(left, 420), log=work / f"{name}.log", env=env)
            try:
                if rc:
                    raise RuntimeError(f"exit status {rc}: {text[-1500:]}")
                result["runs"][name] = {**parse(text), "wall_s": round(time.time() - t0, 1)}
            except Exception as exc:  # noqa: BLE001 - one failed part must not lose the others
                result["runs"][name] = {"error": f"{type(exc).__name__}: {exc}"[-2000:], "rc": rc}
            print(f"== {name}: {result['runs'][name].get('ms', result['runs'][name].get('error', '')[:300])}",
                  flush=True)
        result["summary"] = summarize(result["runs"], result["device"])
        write_json_atomic(path, result)

    env = {**os.environ, "PYTHON": sys.executable, "NPROC": "1", "LOG": str(work / "megatron_lm_run.log")}
    part("megatron_lm", ["bash", "-c", megatron_lm_shell(cmd, args.steps)], parse_megatron_lm, env=env)
    sweep_dir = work / "trial"
    part("trial", [sys.executable, "-m", "launch.main",
                   *trial_overrides(args.model, args.cluster, layout, args.steps, sweep_dir)],
         lambda _: parse_trial_record(sweep_dir / layout.name / "result.json"))
    if layout.cuda_graph:
        eager = dataclasses.replace(layout, cuda_graph=False)
        eager_dir = work / "trial_no_cuda_graph"
        part("trial_no_cuda_graph", [sys.executable, "-m", "launch.main",
                                     *trial_overrides(args.model, args.cluster, eager, args.steps, eager_dir)],
             lambda _: parse_trial_record(eager_dir / eager.name / "result.json"))
    for variant in CHILD_VARIANTS:
        name = f"trial_{variant}"
        child_dir = work / name
        child_dir.mkdir(exist_ok=True)
        part(name, [sys.executable, str(Path(__file__).resolve()), "--model", args.model,
                    "--cluster", args.cluster, "--steps", str(args.steps),
                    *(f"--set={s}" for s in args.set), "--child", variant, str(child_dir)],
             lambda _, d=child_dir, v=variant: json.loads((d / f"{v}.json").read_text()))
    env_graph = {**env, "LOG": str(work / "megatron_lm_cuda_graph_local_run.log")}
    part("megatron_lm_cuda_graph_local",
         ["bash", "-c", megatron_lm_shell(cmd, args.steps, ["--cuda-graph-impl", "local"])],
         parse_megatron_lm, env=env_graph)
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
