"""The sweep report's figures (matplotlib, Agg backend: no display needed).

Each function takes rows from `analysis.results.collect` (or the breakdowns from
`analysis.report.breakdowns`) and returns a Figure, or None when the sweep has
nothing to show for it. `analysis.report` saves them as PNG; the notebook shows them.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from launch.breakdown import CATEGORIES  # noqa: E402

STATUS_COLORS = {"ok": "#2a9d8f", "invalid": "#8d99ae", "skipped": "#e9c46a", "oom": "#e76f51",
                 "error": "#d62828", "timeout": "#6a4c93", "diverged": "#000000"}
CATEGORY_COLORS = {
    "attention": "#1f77b4", "matmul": "#2ca02c", "norm": "#9467bd", "elementwise": "#bcbd22",
    "optimizer": "#8c564b", "tp_comm": "#d62728", "dp_comm": "#ff7f0e", "pp_comm": "#e377c2",
    "other": "#7f7f7f", "idle": "#d9d9d9",
}
SHORT_STATUS = {"invalid": "invalid", "skipped": "skipped", "oom": "OOM", "error": "error",
                "timeout": "timeout", "diverged": "diverged"}


def _best(rows: list[dict], key) -> dict:
    """key -> the ok row with the highest PaLM MFU."""
    best: dict = {}
    for r in rows:
        if r["status"] == "ok" and r["mfu_palm"] is not None:
            k = key(r)
            if k not in best or r["mfu_palm"] > best[k]["mfu_palm"]:
                best[k] = r
    return best


def mfu_heatmaps(rows: list[dict]):
    """Best MFU over TP x PP: one panel per micro-batch size (columns) and recompute (rows)."""
    if not rows:
        return None
    tps = sorted({r["tp"] for r in rows if r["tp"]})
    pps = sorted({r["pp"] for r in rows if r["pp"]})
    mbss = sorted({r["mbs"] for r in rows if r["mbs"]})
    recomputes = [c for c in ("none", "selective", "full") if any(r["recompute"] == c for r in rows)]
    if not (tps and pps and mbss and recomputes):
        return None
    best = _best(rows, lambda r: (r["tp"], r["pp"], r["mbs"], r["recompute"]))
    statuses: dict = {}
    for r in rows:
        statuses.setdefault((r["tp"], r["pp"], r["mbs"], r["recompute"]), Counter())[r["status"]] += 1
    top = max((r["mfu_palm"] for r in best.values()), default=0.0) * 100 or 1.0

    ncols, nrows = len(mbss), len(recomputes)
    cell = 0.55
    width = max(4.0, ncols * (1.2 + cell * len(tps))) + 1.2
    height = max(3.0, nrows * (1.1 + cell * len(pps))) + 0.6
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False,
                             constrained_layout=True)
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("#f2f2f2")
    image = None
    for i, recompute in enumerate(recomputes):
        for j, mbs in enumerate(mbss):
            ax = axes[i][j]
            grid = np.full((len(pps), len(tps)), np.nan)
            for a, pp in enumerate(pps):
                for b, tp in enumerate(tps):
                    row = best.get((tp, pp, mbs, recompute))
                    if row:
                        grid[a, b] = 100 * row["mfu_palm"]
            image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=top, origin="lower", aspect="auto")
            for a, pp in enumerate(pps):
                for b, tp in enumerate(tps):
                    value = grid[a, b]
                    if not math.isnan(value):
                        color = "white" if value < 0.6 * top else "black"
                        ax.text(b, a, f"{value:.1f}", ha="center", va="center", fontsize=9, color=color)
                    else:
                        counts = statuses.get((tp, pp, mbs, recompute))
                        label = SHORT_STATUS.get(counts.most_common(1)[0][0], "") if counts else "-"
                        ax.text(b, a, label, ha="center", va="center", fontsize=7, color="#555555")
            ax.set_xticks(range(len(tps)), [str(t) for t in tps])
            ax.set_yticks(range(len(pps)), [str(p) for p in pps])
            ax.set_xlabel("TP")
            ax.set_ylabel("PP")
            ax.set_title(f"mbs {mbs}, recompute {recompute}", fontsize=10)
    fig.colorbar(image, ax=axes, label="best MFU, PaLM (%)", shrink=0.9)
    fig.suptitle("Best MFU over TP x PP (grey: no ok trial; the label says why)", fontsize=11)
    return fig


def mfu_by_kernel(rows: list[dict]):
    """Best and median MFU per kernel variant (attention / norm)."""
    variants: dict = {}
    for r in rows:
        if r["status"] == "ok" and r["mfu_palm"] is not None:
            variants.setdefault(f"{r['attention']} / {r['norm']}", []).append(100 * r["mfu_palm"])
    if not variants:
        return None
    names = sorted(variants, key=lambda v: max(variants[v]))
    fig, ax = plt.subplots(figsize=(8, 2.2 + 0.55 * len(names)), constrained_layout=True)
    y = np.arange(len(names))
    best = [max(variants[n]) for n in names]
    median = [float(np.median(variants[n])) for n in names]
    ax.barh(y, best, height=0.6, color="#2a9d8f", label="best layout")
    ax.scatter(median, y, color="black", marker="|", s=300, zorder=3, label="median over layouts")
    for k, n in enumerate(names):
        ax.text(best[k], k, f" {best[k]:.1f}%  ({len(variants[n])} layouts)", va="center", fontsize=9)
    ax.set_yticks(y, names)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.set_xlim(0, max(best) * 1.4)
    ax.set_xlabel("MFU, PaLM (%)")
    ax.set_title("MFU by kernel variant (attention / norm), ok trials")
    fig.legend(ncols=2, fontsize=8, loc="outside lower center")
    return fig


def memory(rows: list[dict]):
    """Predicted vs. measured peak memory per trial (GiB), with the y = x line."""
    points = [r for r in rows if r["predicted_memory_gb"] is not None and r["peak_memory_gb"] is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 5.6), constrained_layout=True)
    for status in STATUS_COLORS:
        sel = [r for r in points if r["status"] == status]
        if sel:
            ax.scatter([r["predicted_memory_gb"] for r in sel], [r["peak_memory_gb"] for r in sel],
                       color=STATUS_COLORS[status], label=f"{status} ({len(sel)})", s=40,
                       edgecolor="black", linewidth=0.4)
    values = [r["predicted_memory_gb"] for r in points] + [r["peak_memory_gb"] for r in points]
    low, high = min(values), max(values)
    pad = 0.1 * (high - low) or 0.1 * high or 0.1
    line = [max(0.0, low - pad), high + pad]
    ax.plot(line, line, "--", color="grey", linewidth=1, label="measured = predicted")
    ax.set_xlim(line)
    ax.set_ylim(line)
    ax.set_xlabel("predicted peak memory per rank (GiB)")
    ax.set_ylabel("measured peak memory per rank (GiB)")
    ax.set_title("Memory model: predicted vs. measured")
    fig.legend(fontsize=8, loc="outside lower center", ncols=4)
    return fig


def reason_keys(status: str, reason: str | None) -> list[str]:
    """Short, groupable reasons; a layout skipped for several missing features counts for each."""
    if not reason:
        return [status]
    if reason.startswith("needs CUDA: "):
        return [f"needs CUDA: {need.strip()}" for need in reason[len("needs CUDA: "):].split(", ")]
    if reason.startswith("predicted OOM"):
        return ["predicted OOM"]
    text = re.sub(r"^rank \d+: ", "", reason).split("\n")[0]
    text = text.split(" = ")[0]
    return [text if len(text) <= 70 else text[:67] + "..."]


def failures(rows: list[dict]):
    """Trials that did not run or did not finish, counted by status and reason."""
    counts = Counter()
    for r in rows:
        if r["status"] != "ok":
            for key in reason_keys(r["status"], r["reason"]):
                counts[(r["status"], key)] += 1
    if not counts:
        return None
    items = sorted(counts.items(), key=lambda kv: (kv[0][0], kv[1]))
    labels = [f"{key}" for (status, key), _ in items]
    fig, ax = plt.subplots(figsize=(9, 1.3 + 0.42 * len(items)), constrained_layout=True)
    y = np.arange(len(items))
    ax.barh(y, [n for _, n in items], color=[STATUS_COLORS.get(s, "grey") for (s, _), _ in items])
    for k, (_, n) in enumerate(items):
        ax.text(n, k, f" {n}", va="center", fontsize=9)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlim(0, max(counts.values()) * 1.15)
    ax.set_xlabel("trials (a layout skipped for several reasons counts once for each)")
    ax.set_title("Trials not run or failed, by reason")
    present = sorted({s for (s, _), _ in items})
    ax.legend(handles=[Patch(color=STATUS_COLORS.get(s, "grey"), label=s) for s in present],
              fontsize=8, loc="lower right")
    return fig


def time_breakdown(entries: list[dict]):
    """Stacked bar per profiled layout: where one step's time went (ms).

    entries: [{"label": str, "step_s": float, "categories": {name: seconds}}], best first.
    """
    if not entries:
        return None
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.5 * len(entries)), constrained_layout=True)
    y = np.arange(len(entries))[::-1]
    left = np.zeros(len(entries))
    used = [c for c in CATEGORIES if any(e["categories"].get(c, 0) > 0 for e in entries)]
    for category in used:
        widths = np.array([1e3 * e["categories"].get(category, 0.0) for e in entries])
        ax.barh(y, widths, left=left, height=0.6, color=CATEGORY_COLORS[category], label=category,
                edgecolor="white", linewidth=0.5)
        left += widths
    for k, e in enumerate(entries):
        ax.text(left[k], y[k], f" {1e3 * e['step_s']:.0f} ms", va="center", fontsize=8)
    ax.set_yticks(y, [e["label"] for e in entries], fontsize=8)
    ax.set_xlim(0, left.max() * 1.12)
    ax.set_xlabel("time in the profiled step (ms)")
    ax.set_title("Where the step time went (profiled step, mean over ranks)")
    fig.legend(ncols=min(len(used), 5), fontsize=8, loc="outside lower center")
    return fig
