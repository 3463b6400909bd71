"""Which layout for my cluster? From measured trials, or predicted without any.

    python -m analysis.recommend sweeps/local_cpu/tiny-local_cpu     # measured
    python -m analysis.recommend --model llama2_13b --cluster h100_80gb --gbs 512
    ... --format megatron-lm   # only the Megatron-LM run: export lines, then `pretrain_gpt.py ARGS`
    ... --format json          # the same content for scripts

Prints the best layouts, the Megatron-LM command and megatron-core configs of the best
(analysis/megatron_args.py, the one mapping), and its kernels. A record that cannot be read
or has the wrong shape is named on stderr, one line each, and left out of the ranking.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import yaml

from analysis.megatron_args import megatron_core_kwargs, megatron_core_text, megatron_lm_command
from core.config import ConfigError, Layout, ModelConfig, cluster_from_dict, layout_from_dict, model_from_dict
from core.paths import CONF_DIR
from sweeper.validity import invalid_reason

FORMATS = ("text", "megatron-lm", "json")
OPTIONAL_OBJECTS = ("mfu", "prediction", "cluster", "env", "tflops_per_gpu")  # to_row reads them with .get


def load_preset(group: str, name: str) -> dict:
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))
        raise ConfigError(f"unknown {group} preset {name!r} (known: {known})")
    return yaml.safe_load(path.read_text())


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def record_problem(record) -> str | None:
    """What is wrong with one result.json's content, or None: a record the ranking can use."""
    if not isinstance(record, dict):
        return f"not a JSON object ({type(record).__name__})"
    for key, kind in (("trial", str), ("status", str), ("layout", dict), ("model", dict)):
        if not isinstance(record.get(key), kind):
            return f"{key} is {'missing' if key not in record else type(record[key]).__name__}, not {kind.__name__}"
    for key in OPTIONAL_OBJECTS:
        if record.get(key) is not None and not isinstance(record[key], dict):
            return f"{key} is {type(record[key]).__name__}, not an object"
    if record["status"] != "ok":
        return None  # failed trials are ranked out anyway; their layout may be the reason
    try:
        layout = layout_from_dict(record["layout"])
        model = model_from_dict(record["model"])
    except ConfigError as exc:
        return str(exc)
    world = record.get("world_size")
    if not isinstance(world, int) or isinstance(world, bool) or world <= 0:
        return f"world_size is {world!r}, not a positive integer"
    reason = invalid_reason(model, layout, world)
    if reason:
        return f"layout cannot run: {reason}"
    for key, value in (("mfu.palm", (record.get("mfu") or {}).get("palm")),
                       ("tokens_per_s", record.get("tokens_per_s"))):
        if not _number(value):
            return f"status ok but {key} is {value!r}, not a number"
    return None


def read_records(sweep_dir: Path) -> tuple[list[dict], list[str]]:
    """Every trial record under a sweep directory, and one 'path: what is wrong' per bad one."""
    records, problems = [], []
    for path in sorted(sweep_dir.glob("*/result.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{path}: unreadable ({type(exc).__name__}: {exc})")
            continue
        except ValueError as exc:
            problems.append(f"{path}: not JSON ({exc})")
            continue
        problem = record_problem(record)
        if problem:
            problems.append(f"{path}: {problem}")
        else:
            records.append(record)
    return records, problems


def best_of(model: ModelConfig, layout: Layout, world_size: int) -> dict:
    """What the recommendation says about its best layout, in every format."""
    return {
        "layout": asdict(layout),
        "name": layout.name,
        "world_size": world_size,
        "kernels": {"attention": layout.attention, "norm": layout.norm, "cuda_graph": layout.cuda_graph},
        "megatron_lm": megatron_lm_command(model, layout, world_size=world_size).as_dict(),
        "megatron_core": megatron_core_kwargs(model, layout, world_size=world_size),
        "megatron_core_text": megatron_core_text(model, layout, world_size=world_size),
    }


def measured(sweep_dir: Path, top: int) -> dict:
    from analysis.leaderboard import layout_label, ranked
    from analysis.results import to_row

    records, problems = read_records(sweep_dir)
    if not records:
        raise ConfigError(f"no usable trial records under {sweep_dir}"
                          + (f" ({len(problems)} unusable, first: {problems[0]})" if problems else ""))
    by_trial = {r["trial"]: r for r in records}
    rows = [to_row(r) for r in records]
    best = ranked(rows)
    if not best:
        raise ConfigError(f"no trial under {sweep_dir} finished ok ({len(rows)} recorded)")
    record = by_trial[best[0]["trial"]]
    layout, model = layout_from_dict(record["layout"]), model_from_dict(record["model"])
    return {
        "source": "measured", "sweep_dir": str(sweep_dir), "model": model.name,
        "cluster": best[0]["cluster"], "world_size": record["world_size"],
        "header": f"Measured best of {len(best)} ok trials ({len(rows)} recorded) for "
                  f"{best[0]['model']} on {best[0]['cluster']}:",
        "ranked": [{"rank": i, "label": layout_label(row), "trial": row["trial"],
                    "mfu_palm": row["mfu_palm"], "tokens_per_s": row["tokens_per_s"],
                    "peak_memory_gb": row["peak_memory_gb"], "predicted_mfu": row["predicted_mfu"]}
                   for i, row in enumerate(best[:top], 1)],
        "best": best_of(model, layout, record["world_size"]),
        "problems": problems,
    }


def predicted(model_name: str, cluster_name: str, gbs: int, top: int) -> dict:
    from sweeper.plan import prediction_for
    from sweeper.space import layouts, search_space

    model = model_from_dict(load_preset("model", model_name))
    cluster = cluster_from_dict(load_preset("cluster", cluster_name))
    if gbs <= 0:
        raise ConfigError(f"--gbs must be positive, got {gbs}")
    scored = []
    for layout in layouts(search_space(model, cluster, gbs)):
        if invalid_reason(model, layout, cluster.world_size):
            continue
        p = prediction_for(model, cluster, layout)
        if p.fits:
            scored.append((p.mfu, layout, p))
    if not scored:
        raise ConfigError(f"no layout of {model_name} is predicted to fit on {cluster_name}")
    scored.sort(key=lambda s: -s[0])
    return {
        "source": "predicted", "model": model_name, "cluster": cluster_name,
        "world_size": cluster.world_size, "gbs": gbs,
        "header": f"Predicted best layouts for {model_name} on {cluster.world_size} GPUs of {cluster_name} "
                  f"(gbs {gbs}; {len(scored)} predicted to fit; no trial run):",
        "ranked": [{"rank": i, "label": layout.name, "mfu_palm": mfu,
                    "peak_memory_gb": p.peak_memory_gb, "step_time_s": p.step_time_s}
                   for i, (mfu, layout, p) in enumerate(scored[:top], 1)],
        "best": best_of(model, scored[0][1], cluster.world_size),
        "problems": [],
    }


def _ranked_line(row: dict, measured: bool) -> str:
    if measured:
        pred = row["predicted_mfu"]
        note = f" (predicted {100 * pred:.1f}%)" if _number(pred) else ""
        return (f"  {row['rank']}. {row['label']}: MFU {100 * row['mfu_palm']:.1f}% PaLM, "
                f"{row['tokens_per_s']:,.0f} tok/s, {row['peak_memory_gb'] or 0:.1f} GiB{note}")
    return (f"  {row['rank']}. {row['label']}: MFU {100 * row['mfu_palm']:.1f}% PaLM (predicted), "
            f"{row['peak_memory_gb']:.1f} GiB, {row['step_time_s']:.2f} s/step")


def _kernels_line(best: dict) -> str:
    k = best["kernels"]
    return f"attention={k['attention']}, norm={k['norm']}, cuda_graph={str(k['cuda_graph']).lower()}"


def render(result: dict, fmt: str) -> str:
    best = result["best"]
    shell = [f"# {note}" for note in best["megatron_lm"]["notes"]]
    shell += [f"export {k}={v}" for k, v in best["megatron_lm"]["env"].items()]
    shell.append(best["megatron_lm"]["command"])
    if fmt == "json":
        return json.dumps(result, indent=1)
    if fmt == "megatron-lm":
        head = [f"# layout-recommend ({result['source']}): {best['name']} on {best['world_size']} GPUs",
                f"# kernels: {_kernels_line(best)}"]
        return "\n".join(head + shell)
    lines = [result["header"]] + [_ranked_line(r, result["source"] == "measured") for r in result["ranked"]]
    lines += ["Megatron-LM (pretrain_gpt.py; --format megatron-lm prints only this):"]
    lines += ["  " + line for line in shell]
    lines += ["megatron-core:"] + ["  " + line for line in best["megatron_core_text"]]
    lines.append(f"Kernels: {_kernels_line(best)}")
    return "\n".join(lines)


def from_measured(sweep_dir: Path, top: int) -> list[str]:
    """The text recommendation of a sweep as lines (the sweep's summary prints them),
    records that could not be used named after it."""
    result = measured(Path(sweep_dir), top)
    return render(result, "text").splitlines() + [f"Skipped {p}" for p in result["problems"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", nargs="?", help="a sweep directory with measured trials")
    parser.add_argument("--model", help="model preset (predicted mode)")
    parser.add_argument("--cluster", help="cluster preset (predicted mode)")
    parser.add_argument("--gbs", type=int, default=512, help="global batch size (predicted mode)")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--format", choices=FORMATS, default="text",
                        help="text (default), megatron-lm (export lines and the pretrain_gpt.py line), json")
    args = parser.parse_args(argv)
    try:
        if args.top <= 0:
            raise ConfigError(f"--top must be positive, got {args.top}")
        if args.sweep_dir:
            if not Path(args.sweep_dir).is_dir():
                raise ConfigError(f"no sweep directory {args.sweep_dir}")
            result = measured(Path(args.sweep_dir), args.top)
        elif args.model and args.cluster:
            result = predicted(args.model, args.cluster, args.gbs, args.top)
        else:
            raise ConfigError("give a sweep directory, or --model and --cluster")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in result["problems"]:
        print(f"warning: skipped {problem}", file=sys.stderr)
    print(render(result, args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
