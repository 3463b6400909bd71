"""Rank a sweep's trials by MFU and render the leaderboard as markdown.

Ranking is by PaLM-convention MFU (Hagemann et al.'s), the same order as
tokens/s for one model and cluster; both conventions are shown.
"""

from __future__ import annotations

from collections import Counter

from analysis.rerun import COMMAND, short_commit
from core.choices import FUSION_DEFAULTS, FUSION_TAGS


def ranked(rows: list[dict]) -> list[dict]:
    ok = [r for r in rows if r["status"] == "ok" and r["mfu_palm"] is not None]
    return sorted(ok, key=lambda r: -r["mfu_palm"])


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def _num(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def layout_label(row: dict) -> str:
    parts = [f"tp{row['tp']} pp{row['pp']}"]
    if row["vpp"] and row["vpp"] > 1:
        parts.append(f"vpp{row['vpp']}")
    parts.append(f"dp{row['dp']} mbs{row['mbs']}")
    if row["recompute"] != "none":
        parts.append(f"rc={row['recompute']}")
    if row["sequence_parallel"]:
        parts.append("sp")
    if row["distributed_optimizer"]:
        parts.append("distopt")
    if row.get("cuda_graph"):
        parts.append("cudagraph")
    parts.append(f"{row['attention']}/{row['norm']}")
    # The fusion axes that are on (records from before them have none).
    fused = [FUSION_TAGS[axis] for axis, default in FUSION_DEFAULTS.items()
             if row.get(axis) not in (None, default)]
    if fused:
        parts.append("fused:" + ",".join(fused))
    return " ".join(parts)


def markdown(rows: list[dict], *, top: int | None = None, group_unlaunched: bool = False,
             rerun: bool = False) -> str:
    """The ranked table, then every trial that did not end ok with its reason.

    With `group_unlaunched`, invalid and skipped layouts are counted per reason instead
    of listed one by one (a large sweep's console output stays readable); trials that
    ran and failed are always listed. With `rerun`, each ranked row's short commit and
    overrides follow the table, numbered as its rows (rows need `command` and `commit`:
    analysis.summary.with_rerun).
    """
    best = ranked(rows)
    shown = best[:top] if top else best
    lines = [
        "| # | layout | step s | tokens/s | TFLOP/s/GPU | MFU (PaLM) | MFU (Megatron) | peak GiB | predicted GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(shown, 1):
        lines.append(
            f"| {i} | {layout_label(r)} | {_num(r['step_time_s'], '.3f')} | {_num(r['tokens_per_s'], ',.0f')} "
            f"| {_num(r['tflops_per_gpu'], '.2f')} | {_pct(r['mfu_palm'])} | {_pct(r['mfu_megatron'])} "
            f"| {_num(r['peak_memory_gb'], '.2f')} | {_num(r['predicted_memory_gb'], '.2f')} |"
        )
    if rerun and shown:
        lines += rerun_lines(shown)
    counts = Counter(r["status"] for r in rows)
    lines.append("")
    lines.append("Trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    unlaunched = ("invalid", "skipped") if group_unlaunched else ()
    failed = [r for r in rows if r["status"] != "ok" and r["status"] not in unlaunched]
    if failed:
        lines += ["", "| trial | status | reason |", "|---|---|---|"]
        for r in sorted(failed, key=lambda r: (r["status"], r["trial"])):
            lines.append(f"| {r['trial']} | {r['status']} | {_reason(r)} |")
    grouped = Counter((r["status"], _reason_group(_reason(r))) for r in rows if r["status"] in unlaunched)
    if grouped:
        lines += ["", "| not run | layouts | reason |", "|---|---|---|"]
        for (status, reason), n in sorted(grouped.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {status} | {n} | {reason} |")
    lines.append("")
    lines.append("MFU (PaLM) = tokens/s x (6N + 12*L*H*T) / (peak x GPUs); MFU (Megatron) halves causal "
                 "attention. Recompute FLOPs are excluded from both; peak is the cluster preset's.")
    return "\n".join(lines)


def rerun_lines(shown: list[dict]) -> list[str]:
    """Footnotes to the ranked table: row number, short commit, and the overrides that rerun it."""
    lines = ["", f"To rerun row N: check out its commit, then `{COMMAND} OVERRIDES`."]
    for i, r in enumerate(shown, 1):
        overrides = (r.get("command") or "").removeprefix(COMMAND).strip() or "(not known)"
        lines.append(f"{i}. `{short_commit(r.get('commit'))}` `{overrides}`")
    return lines


def _reason_group(reason: str) -> str:
    """Reasons that differ only in per-layout numbers count as one."""
    if reason.startswith("predicted OOM:") and ">" in reason:
        return "predicted OOM: > " + reason.split(">", 1)[1].strip()
    return reason.split(" (rank ")[0]


def _reason(row: dict) -> str:
    return (row["reason"] or "").replace("|", "/").replace("\n", " ")[:160]
