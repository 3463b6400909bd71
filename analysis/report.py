"""A sweep's report for people: `python -m analysis.report SWEEP_DIR`.

SWEEP_DIR is the directory holding one sub-directory per trial (each with its
result.json), e.g. sweeps/local_cpu/tiny-local_cpu. Writes SWEEP_DIR/report/:

    report.md, report.html    the same report: leaderboard, figures, failures, traces
    mfu_heatmaps.png          best MFU over TP x PP per micro-batch size and recompute
    mfu_by_kernel.png         MFU per attention / norm kernel variant
    memory.png                predicted vs. measured peak memory
    failures.png              trials not run or failed, by reason
    time_breakdown.png        per profiled layout, where the step went (trial.profile=true)

The notebook analysis/sweep_report.ipynb shows the same from the same functions.
"""

from __future__ import annotations

import argparse
import html
import re
import sys
from pathlib import Path

from launch.breakdown import CATEGORIES
from analysis.leaderboard import layout_label, markdown, ranked
from analysis.ranking import quality_markdown, quality_summary
from analysis.rerun import COMMAND, rerun_overrides
from analysis.results import collect, load_records

REPORT_DIR = "report"
TRACE_FILE = "trace.json"
FIGURES = {
    "mfu_heatmaps": "Best MFU over TP x PP",
    "mfu_by_kernel": "MFU by kernel variant",
    "memory": "Predicted vs. measured memory",
    "failures": "Failures by reason",
    "time_breakdown": "Where the step time went",
}


def load(sweep_dir) -> tuple[list[dict], list[dict]]:
    """(rows, records) of a sweep; rows as in analysis.results.collect."""
    records = load_records(sweep_dir)
    return collect(sweep_dir), records


def _mean_breakdown(record: dict) -> dict | None:
    per_rank = [r["breakdown"] for r in record.get("ranks", []) if r.get("breakdown")]
    if not per_rank and record.get("breakdown"):
        per_rank = [record["breakdown"]]
    if not per_rank:
        return None
    n = len(per_rank)
    return {
        "step_s": sum(b["step_s"] for b in per_rank) / n,
        "categories": {c: sum(b["categories"].get(c, 0.0) for b in per_rank) / n for c in CATEGORIES},
        "top_kernels": _mean_top_kernels(per_rank),
        "ranks": n,
    }


def _mean_top_kernels(per_rank: list[dict]) -> list[dict]:
    """The ranks' top_kernels merged per (name, category), mean per rank, most time first."""
    merged: dict[tuple[str, str], dict] = {}
    for b in per_rank:
        for k in b.get("top_kernels", []):
            m = merged.setdefault((k["name"], k["category"]), {**k, "count": 0, "total_s": 0.0, "share": 0.0})
            for field in ("count", "total_s", "share"):
                m[field] += k[field] / len(per_rank)
    return sorted(merged.values(), key=lambda k: -k["total_s"])


def breakdowns(rows: list[dict], records: list[dict]) -> list[dict]:
    """Profiled ok trials, best MFU first: label, step_s and seconds per category (mean over ranks)."""
    by_trial = {r.get("trial"): r for r in records}
    out = []
    for row in ranked(rows):
        mean = _mean_breakdown(by_trial.get(row["trial"], {}))
        if mean:
            out.append({"trial": row["trial"], "label": layout_label(row), **mean})
    return out


def traces(sweep_dir) -> list[Path]:
    """Chrome traces under the sweep: <trial>/trace.json and <rerun dir>/<trial>/trace.json."""
    root = Path(sweep_dir)
    return sorted(root.glob(f"*/{TRACE_FILE}")) + sorted(root.glob(f"*/*/{TRACE_FILE}"))


def trace_command(sweep_dir, records: list[dict], best_trial: str) -> str | None:
    """The command that re-runs the best layout alone with its trace on."""
    record = next((r for r in records if r.get("trial") == best_trial), None)
    if not record:
        return None
    args = [o for o in rerun_overrides(record) if not o.startswith(("trial.profile=", "trial.trace=", "sweep.name="))]
    args += ["trial.profile=true", "trial.trace=true", f"hydra.sweep.dir={Path(sweep_dir) / 'trace-best'}"]
    return " ".join([COMMAND, *args])


def figures(rows: list[dict], entries: list[dict]) -> dict:
    """name -> matplotlib Figure (or None when there is nothing to show)."""
    from analysis import plots

    return {
        "mfu_heatmaps": plots.mfu_heatmaps(rows),
        "mfu_by_kernel": plots.mfu_by_kernel(rows),
        "memory": plots.memory(rows),
        "failures": plots.failures(rows),
        "time_breakdown": plots.time_breakdown(entries),
    }


def breakdown_table(entries: list[dict]) -> str:
    """Markdown: per profiled layout, ms per category and the step."""
    used = [c for c in CATEGORIES if any(e["categories"][c] > 0 for e in entries)]
    lines = ["| layout | step ms | " + " | ".join(used) + " |", "|---" * (len(used) + 2) + "|"]
    for e in entries:
        cells = [f"{1e3 * e['categories'][c]:.1f}" for c in used]
        lines.append(f"| {e['label']} | {1e3 * e['step_s']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kernels_table(kernels: list[dict], n: int = 10) -> str:
    """Markdown: the n kernels with the most device time in the profiled step."""
    lines = ["| kernel | category | calls | ms | % of step |", "|---|---|---|---|---|"]
    for k in kernels[:n]:
        name = k["name"].replace("|", "/").replace("`", "'")
        lines.append(f"| `{name}` | {k['category']} | {k['count']:g} | {1e3 * k['total_s']:.2f} "
                     f"| {100 * k['share']:.1f} |")
    return "\n".join(lines)


def summary_lines(rows: list[dict]) -> list[str]:
    first = rows[0]
    best = ranked(rows)
    lines = [f"Model **{first['model']}** on **{first['cluster']}** ({first['world_size']} ranks, "
             f"device: {first['device'] or 'n/a'}), {len(rows)} trials, {len(best)} ok."]
    if best:
        b = best[0]
        lines.append(f"Best: **{layout_label(b)}**: MFU {100 * b['mfu_palm']:.1f}% (PaLM), "
                     f"{b['tokens_per_s']:,.0f} tokens/s, {b['step_time_s']:.3f} s/step.")
    return lines


def report_markdown(sweep_dir, rows, records, entries, images: dict) -> str:
    sweep_dir = Path(sweep_dir)
    best = ranked(rows)
    out = [f"# Sweep report: {sweep_dir.name}", "", *summary_lines(rows), "", "## Leaderboard", "", markdown(rows), ""]
    out += ["## Prediction quality", "", *quality_markdown(quality_summary(records)), ""]
    for name, title in FIGURES.items():
        out += [f"## {title}", ""]
        if name == "time_breakdown":
            out += ["Per layout profiled with `trial.profile=true`: one extra step after the measured "
                    "ones, mean over ranks. Categories add up to the step; see launch/breakdown.py "
                    "for the method.", ""]
        out.append(f"![{title}]({images[name]})" if images.get(name) else "_Nothing to show in this sweep._")
        if name == "time_breakdown" and entries:
            out += ["", "Milliseconds per category:", "", breakdown_table(entries)]
            top = next((e for e in entries if e.get("top_kernels")), None)
            if top:
                out += ["", f"Kernels with the most device time, {top['label']} (mean over ranks; "
                        "kernels on several streams overlap, so shares need not add up):", "",
                        kernels_table(top["top_kernels"])]
        out.append("")
    out += ["## Traces", ""]
    found = traces(sweep_dir)
    for path in found:
        out.append(f"- [{path.parent.name}](../{path.relative_to(sweep_dir)}) (Chrome trace: open in "
                   "ui.perfetto.dev or chrome://tracing)")
    if not found:
        out.append("_No trial of this sweep wrote a trace._")
    best_trace = sweep_dir / best[0]["trial"] / TRACE_FILE if best else None
    command = trace_command(sweep_dir, records, best[0]["trial"]) if best else None
    if best_trace and best_trace.exists():
        out += ["", f"The best layout's trace: [{best_trace.relative_to(sweep_dir)}](../{best_trace.relative_to(sweep_dir)})"]
    elif command:
        out += ["", "To get the best layout's trace, re-run that one trial with `trial.trace=true` "
                "(into its own directory: a sweep directory skips trials it has finished):", "",
                f"    {command}"]
    return "\n".join(out) + "\n"


def _md_table_html(lines: list[str]) -> list[str]:
    cells = [[re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(c.strip()))
              for c in line.strip().strip("|").split("|")] for line in lines]
    out = ["<table>", "<tr>" + "".join(f"<th>{c}</th>" for c in cells[0]) + "</tr>"]
    for row in cells[2:]:
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return out + ["</table>"]


def png_bytes(fig) -> bytes:
    """A figure as PNG bytes (the notebook displays these, whatever its backend)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def markdown_to_html(text: str, title: str) -> str:
    """Just enough markdown for this report: headings, tables, images, links, code, bold."""

    def inline(s: str) -> str:
        s = html.escape(s, quote=False)
        s = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2">', s)
        s = re.sub(r"\[([^\]]*)\]\(([^)]+)\)", r'<a href="\2">\1</a>', s)
        s = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)
        s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
        return re.sub(r"_([^_]+)_$", r"<i>\1</i>", s)

    body, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            body += _md_table_html(block)
            continue
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("    "):
            body.append(f"<pre>{html.escape(line.strip())}</pre>")
        elif line.startswith("- "):
            body.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f0f0f0}"
             "img{max-width:100%}pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}")
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(sweep_dir) -> Path:
    """Write SWEEP_DIR/report/ (markdown, HTML, PNGs); return the markdown's path."""
    import matplotlib.pyplot as plt

    sweep_dir = Path(sweep_dir)
    rows, records = load(sweep_dir)
    entries = breakdowns(rows, records)
    out_dir = sweep_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    images = {}
    for name, fig in figures(rows, entries).items():
        path = out_dir / f"{name}.png"
        if fig is None:
            path.unlink(missing_ok=True)
            continue
        fig.savefig(path, dpi=120)
        plt.close(fig)
        images[name] = path.name
    text = report_markdown(sweep_dir, rows, records, entries, images)
    (out_dir / "report.md").write_text(text)
    (out_dir / "report.html").write_text(markdown_to_html(text, f"Sweep report: {sweep_dir.name}"))
    return out_dir / "report.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="directory with one sub-directory per trial (result.json)")
    args = parser.parse_args(argv)
    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        print(f"error: no such sweep directory: {sweep_dir}", file=sys.stderr)
        return 2
    if not any(sweep_dir.glob("*/result.json")):
        print(f"error: no trial results (*/result.json) in {sweep_dir}", file=sys.stderr)
        return 2
    path = write_report(sweep_dir)
    print(f"Report: {path} and {path.with_suffix('.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
