"""Assemble the GPU sweep's report: leaderboard JSON/markdown plus the loss-parity check.

    python benchmarks/gpu_sweep_report.py --sweep SWEEP_DIR [--parity PARITY_DIR] --out DIR --tag NAME

Writes DIR/NAME.json (the leaderboard's `summary` and `rows`, the summary extended
with `loss_parity`) and DIR/NAME.md. Loss parity (analysis/parity.py): every trial of
a parity sweep trains the same seed on the same tokens (launch/data.py), so per-step
losses must agree with the stock spec's within bounds set by the variants' measured
spread; a negative control (`trial.plant=non_causal`) must FAIL. Exits 1 when a parity
check fails (a --parity folder that does not exist is a failed check).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


from analysis.parity import markdown as parity_markdown  # noqa: E402
from analysis.parity import parity  # noqa: E402
from analysis.results import load_records, to_row  # noqa: E402


def peer_comparison(probe: dict, records: list[dict], best_step_s: float) -> dict:
    """The anchors' megatron-core local-spec runs (gpu_probe.py's JSON) beside this sweep.

    Step times compare directly (same model, global batch and device kind); the peer's MFU
    is recomputed here under this project's PaLM convention, from its step time.
    """
    from core.config import cluster_from_dict, model_from_dict
    from core.flops import mfu

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
    checks = {str(d): parity(load_records(d)) if d.is_dir() else
              {"passed": False, "reason": f"parity folder {d} does not exist", "trials": []}
              for d in args.parity}
    summary["loss_parity"] = {d: {k: v for k, v in r.items() if k != "trials"} for d, r in checks.items()}
    if args.peer:
        best = min((r["step_time_s"] for r in board["rows"] if r.get("status") == "ok"), default=None)
        summary["peer"] = peer_comparison(json.loads(args.peer.read_text()), load_records(args.sweep), best)
    summary.update(headline(summary, load_records(args.sweep)))
    board["summary"] = summary
    board["loss_parity"] = checks
    board["parity_rows"] = {d: [to_row(r) for r in load_records(d)] for d in checks if Path(d).is_dir()}
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
    return 0 if all(c["passed"] for c in checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
