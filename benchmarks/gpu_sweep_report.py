"""Assemble the GPU sweep's report: leaderboard JSON/markdown plus the loss-parity check.

    python benchmarks/gpu_sweep_report.py --sweep SWEEP_DIR [--parity PARITY_DIR] --out DIR --tag NAME

Writes DIR/NAME.json (the leaderboard's `summary` and `rows`, the summary extended
with `loss_parity`) and DIR/NAME.md. Loss parity: every trial of the parity sweep
trains the same seed on the same tokens (launch/data.py), so per-step losses must
agree across kernel variants, recompute and CUDA graphs up to bf16 rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.results import load_records, to_row  # noqa: E402

# bf16 keeps 8 significant bits (unit roundoff 2^-9 relative): activations differ by
# that much between kernels, and the mean loss over a step's 2^15 tokens averages it
# down. A relative gap past one unit roundoff means different arithmetic, not rounding.
PARITY_RTOL = 2.0**-9
# After the first update the runs no longer share weights: Adam normalises each update,
# so a rounding-level gradient difference becomes a difference of a whole lr-sized step,
# and the gap compounds. Over 20 steps we hold it to bf16's machine epsilon (2^-7).
TRAINED_RTOL = 2.0**-7


def _is_stock(layout: dict) -> bool:
    return layout.get("attention") == "megatron" and layout.get("norm") == "megatron"


def parity(records: list[dict], rtol: float = PARITY_RTOL, trained_rtol: float = TRAINED_RTOL) -> dict:
    """Largest per-step loss gap of each trial against a reference trial (the stock spec if run)."""
    runs = [r for r in records if r.get("status") == "ok" and r.get("losses")]
    if len(runs) < 2:
        return {"trials": len(runs), "passed": None, "reason": "fewer than two trials with losses"}
    plain = [r for r in runs if _is_stock(r["layout"]) and r["layout"].get("recompute") == "none"
             and not r["layout"].get("cuda_graph")]
    reference = (plain or runs)[0]
    ref = reference["losses"]
    rows = []
    for r in runs:
        steps = min(len(ref), len(r["losses"]))
        gaps = [abs(a - b) for a, b in zip(ref[:steps], r["losses"][:steps])]
        worst = max(gaps) if gaps else None
        rows.append({"trial": r["trial"], "steps": steps, "max_abs_diff": worst,
                     "max_rel_diff": max(g / abs(a) for g, a in zip(gaps, ref)) if gaps else None,
                     "step0_rel_diff": gaps[0] / abs(ref[0]) if gaps else None,
                     "first_loss": r["losses"][0], "last_loss": r["losses"][steps - 1]})
    passed = all(row["max_rel_diff"] is not None and row["step0_rel_diff"] <= rtol
                 and row["max_rel_diff"] <= trained_rtol for row in rows)
    return {"reference": reference["trial"], "rtol": rtol, "trained_rtol": trained_rtol,
            "min_steps": min(row["steps"] for row in rows),
            "passed": passed, "trials": rows}


def parity_markdown(result: dict) -> str:
    if not result.get("reference"):
        return f"Loss parity: not measured ({result.get('reason')})."
    lines = [f"Loss parity against `{result['reference']}` over {result['min_steps']} steps "
             f"(step 0 within {result['rtol']:.2e}, every step within {result.get('trained_rtol', result['rtol']):.2e}): "
             f"{'PASS' if result['passed'] else 'FAIL'}", "",
             "| trial | steps | step-0 rel diff | max abs diff | max rel diff | first loss | last loss |",
             "|---|---|---|---|---|---|---|"]
    for row in result["trials"]:
        lines.append(f"| {row['trial']} | {row['steps']} | {row.get('step0_rel_diff') or 0:.2e} "
                     f"| {row['max_abs_diff']:.2e} | {row['max_rel_diff']:.2e} "
                     f"| {row['first_loss']:.4f} | {row['last_loss']:.4f} |")
    return "\n".join(lines)


def peer_comparison(probe: dict, records: list[dict], best_step_s: float) -> dict:
    """The anchors' megatron-core local-spec runs (gpu_probe.py's JSON) beside this sweep.

    Step times compare directly (same model, global batch and device kind); the peer's MFU
    is recomputed here under this project's PaLM convention, from its step time.
    """
    from analysis.flops import mfu
    from sweeper.config import cluster_from_dict, model_from_dict

    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        return {}
    model, cluster = model_from_dict(ok[0]["model"]), cluster_from_dict(ok[0]["cluster"])
    gbs = ok[0]["layout"]["gbs"]
    runs = []
    for run in probe.get("mcore", []):
        if run.get("step_s") and run.get("gbs") == gbs and run.get("seq") == model.seq_length:
            tokens_per_s = gbs * model.seq_length / run["step_s"]
            runs.append({"mbs": run["mbs"], "recompute": run.get("recompute"), "step_s": run["step_s"],
                         "mfu_palm": mfu(model, tokens_per_s, cluster.peak_tflops, cluster.world_size)["palm"],
                         "peak_memory_gb": run.get("peak_mem_gb")})
    if not runs:
        return {}
    best = min(runs, key=lambda r: r["step_s"])
    return {"runs": runs, "best_step_s": best["step_s"], "best_mfu_palm": best["mfu_palm"],
            "best_mbs": best["mbs"], "speedup_of_best": best["step_s"] / best_step_s,
            "env": probe.get("env")}


def headline(summary: dict, records: list[dict]) -> dict:
    """The single-GPU MFU issue's figures beside the summary (which already holds the
    prediction quality, analysis/summary.py): flash-attn-4 trials that ran, the best over
    the peer (PaLM MFU ratio = step-time ratio, same gbs and device), and the commit the
    device ran (GIT_COMMIT: the device's copy of the tree has no .git)."""
    out = {"flash_attn_ok_trials": sum(1 for r in records if r.get("status") == "ok"
                                       and (r.get("layout") or {}).get("attention") == "flash_attn"),
           "commit": os.environ.get("GIT_COMMIT")}
    peer = summary.get("peer") or {}
    if peer.get("best_mfu_palm") and summary.get("best_mfu_palm"):
        out["peer_mfu_palm"] = peer["best_mfu_palm"]
        out["best_over_peer"] = summary["best_mfu_palm"] / peer["best_mfu_palm"]
    return out


def main(argv=None) -> int:
    from analysis.summary import finish_sweep

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", required=True, type=Path)
    ap.add_argument("--parity", type=Path, action="append", default=[],
                    help="a sweep directory whose trials share seed and tokens (repeatable)")
    ap.add_argument("--peer", type=Path, help="gpu_probe.py's JSON (the anchors' megatron-core runs)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tag", required=True)
    args = ap.parse_args(argv)

    summary = finish_sweep(args.sweep, echo=lambda *_: None)
    board = json.loads((args.sweep / "leaderboard.json").read_text())
    checks = {str(d): parity(load_records(d)) for d in args.parity if d.exists()}
    summary["loss_parity"] = {d: {k: v for k, v in r.items() if k != "trials"} for d, r in checks.items()}
    if args.peer:
        best = min((r["step_time_s"] for r in board["rows"] if r.get("status") == "ok"), default=None)
        summary["peer"] = peer_comparison(json.loads(args.peer.read_text()), load_records(args.sweep), best)
    summary.update(headline(summary, load_records(args.sweep)))
    board["summary"] = summary
    board["loss_parity"] = checks
    board["parity_rows"] = {d: [to_row(r) for r in load_records(d)] for d in checks}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.json").write_text(json.dumps(board, indent=1, default=str) + "\n")
    md = (args.sweep / "leaderboard.md").read_text()
    head = [f"# {args.tag}", "", "| summary | value |", "|---|---|"]
    for key in ("device", "trials", "ok", "best_trial", "best_mfu_palm", "best_mfu_megatron",
                "baseline_trial", "baseline_mfu_palm", "best_mbs1_trial", "mbs1_over_best",
                "peer_mfu_palm", "best_over_peer", "flash_attn_ok_trials", "commit"):
        head.append(f"| {key} | {summary.get(key)} |")
    parts = [f"## Loss parity: {d}\n\n" + parity_markdown(r) for d, r in checks.items()]
    (args.out / f"{args.tag}.md").write_text("\n".join(head) + "\n\n" + md + "\n" + "\n\n".join(parts) + "\n")
    print(json.dumps(summary, indent=1, default=str))
    print("\n\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
