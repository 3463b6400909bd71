"""Which layout for my cluster? From measured trials, or predicted without any.

    python -m analysis.recommend sweeps/local_cpu/tiny-local_cpu     # measured
    python -m analysis.recommend --model llama2_13b --cluster h100_80gb --gbs 512

Prints the best layout and the arguments to paste into a Megatron-LM run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from sweeper.config import ConfigError, Layout, cluster_from_dict, layout_from_dict, model_from_dict

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def megatron_args(layout: Layout) -> str:
    """Megatron-LM command-line flags for a layout."""
    args = [
        f"--tensor-model-parallel-size {layout.tp}",
        f"--pipeline-model-parallel-size {layout.pp}",
        f"--context-parallel-size {layout.cp}",
        f"--micro-batch-size {layout.mbs}",
        f"--global-batch-size {layout.gbs}",
    ]
    if layout.vpp > 1:
        args.append(f"--virtual-pipeline-model-parallel-size {layout.vpp}")
    if layout.sequence_parallel:
        args.append("--sequence-parallel")
    if layout.distributed_optimizer:
        args.append("--use-distributed-optimizer")
    if layout.recompute == "selective":
        args.append("--recompute-granularity selective")
    elif layout.recompute == "full":
        args.append(f"--recompute-granularity full --recompute-method {layout.recompute_method} "
                    f"--recompute-num-layers {layout.recompute_num_layers}")
    return " ".join(args)


def megatron_core_kwargs(layout: Layout) -> str:
    """The same layout as megatron-core config arguments."""
    recompute = {"none": "", "selective": ", recompute_granularity='selective'",
                 "full": f", recompute_granularity='full', recompute_method='{layout.recompute_method}', "
                         f"recompute_num_layers={layout.recompute_num_layers}"}[layout.recompute]
    vpp = layout.vpp if layout.vpp > 1 else None
    return (f"TransformerConfig(tensor_model_parallel_size={layout.tp}, pipeline_model_parallel_size={layout.pp}, "
            f"virtual_pipeline_model_parallel_size={vpp}, context_parallel_size={layout.cp}, "
            f"sequence_parallel={layout.sequence_parallel}{recompute}); "
            f"DistributedDataParallelConfig(use_distributed_optimizer={layout.distributed_optimizer})")


def load_preset(group: str, name: str) -> dict:
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))
        raise ConfigError(f"unknown {group} preset {name!r} (known: {known})")
    return yaml.safe_load(path.read_text())


def from_measured(sweep_dir: Path, top: int) -> list[str]:
    from analysis.leaderboard import layout_label, ranked
    from analysis.results import collect, load_records

    rows = collect(sweep_dir)
    if not rows:
        raise ConfigError(f"no trial records under {sweep_dir}")
    best = ranked(rows)
    if not best:
        raise ConfigError(f"no trial under {sweep_dir} finished ok ({len(rows)} recorded)")
    record = next(r for r in load_records(sweep_dir) if r["trial"] == best[0]["trial"])
    layout = layout_from_dict(record["layout"])
    lines = [f"Measured best of {len(best)} ok trials ({len(rows)} recorded) for "
             f"{best[0]['model']} on {best[0]['cluster']}:"]
    for i, row in enumerate(best[:top], 1):
        pred = row["predicted_mfu"]
        note = f" (predicted {100 * pred:.1f}%)" if pred is not None else ""
        lines.append(f"  {i}. {layout_label(row)}: MFU {100 * row['mfu_palm']:.1f}% PaLM, "
                     f"{row['tokens_per_s']:,.0f} tok/s, {row['peak_memory_gb'] or 0:.1f} GiB{note}")
    lines += ["Megatron-LM arguments:", "  " + megatron_args(layout),
              "megatron-core:", "  " + megatron_core_kwargs(layout),
              f"Kernels: attention={layout.attention}, norm={layout.norm}"]
    return lines


def from_prediction(model_name: str, cluster_name: str, gbs: int, top: int) -> list[str]:
    from sweeper.plan import predict
    from sweeper.space import layouts, search_space
    from sweeper.validity import invalid_reason

    model = model_from_dict(load_preset("model", model_name))
    cluster = cluster_from_dict(load_preset("cluster", cluster_name))
    if gbs <= 0:
        raise ConfigError(f"--gbs must be positive, got {gbs}")
    scored = []
    for layout in layouts(search_space(model, cluster, gbs)):
        if invalid_reason(model, layout, cluster.world_size):
            continue
        p = predict(model, cluster, layout)
        if p["fits"]:
            scored.append((p["mfu"], layout, p))
    if not scored:
        raise ConfigError(f"no layout of {model_name} is predicted to fit on {cluster_name}")
    scored.sort(key=lambda s: -s[0])
    lines = [f"Predicted best layouts for {model_name} on {cluster.world_size} GPUs of {cluster_name} "
             f"(gbs {gbs}; {len(scored)} predicted to fit; no trial run):"]
    for i, (mfu, layout, p) in enumerate(scored[:top], 1):
        lines.append(f"  {i}. {layout.name}: MFU {100 * mfu:.1f}% PaLM (predicted), "
                     f"{p['peak_memory_gb']:.1f} GiB, {p['step_time_s']:.2f} s/step")
    lines += ["Megatron-LM arguments:", "  " + megatron_args(scored[0][1]),
              "megatron-core:", "  " + megatron_core_kwargs(scored[0][1])]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", nargs="?", help="a sweep directory with measured trials")
    parser.add_argument("--model", help="model preset (predicted mode)")
    parser.add_argument("--cluster", help="cluster preset (predicted mode)")
    parser.add_argument("--gbs", type=int, default=512, help="global batch size (predicted mode)")
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        if args.sweep_dir:
            if not Path(args.sweep_dir).is_dir():
                raise ConfigError(f"no sweep directory {args.sweep_dir}")
            lines = from_measured(Path(args.sweep_dir), args.top)
        elif args.model and args.cluster:
            lines = from_prediction(args.model, args.cluster, args.gbs, args.top)
        else:
            raise ConfigError("give a sweep directory, or --model and --cluster")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
