"""The report command on a real sweep: its files exist and hold the leaderboard rows."""

import subprocess
import sys
from pathlib import Path

import pytest

from analysis.leaderboard import layout_label, ranked
from analysis.plots import reason_keys
from analysis.results import collect

REPO = Path(__file__).resolve().parents[2]
PNGS = ("mfu_heatmaps", "mfu_by_kernel", "memory", "failures", "time_breakdown")


def _report(*args):
    return subprocess.run([sys.executable, "-m", "analysis.report", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def report_dir(sweep_dir):
    done = _report(sweep_dir)
    assert done.returncode == 0, done.stderr
    return sweep_dir / "report"


def test_files_exist(report_dir):
    for name in PNGS:
        png = report_dir / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (report_dir / "report.md").stat().st_size > 0
    assert (report_dir / "report.html").stat().st_size > 0


def test_report_holds_the_leaderboard_and_failures(report_dir, sweep_dir):
    rows = collect(sweep_dir)
    ok = ranked(rows)
    assert len(ok) == 3
    text = (report_dir / "report.md").read_text()
    page = (report_dir / "report.html").read_text()
    for rank, row in enumerate(ok, 1):
        assert f"| {rank} | {layout_label(row)} |" in text
        assert layout_label(row) in page
    for row in rows:
        if row["status"] in ("error", "invalid", "skipped"):
            assert row["trial"] in text
    for name in PNGS:
        assert f"({name}.png)" in text and f'src="{name}.png"' in page


def test_report_links_traces(report_dir, sweep_dir):
    text = (report_dir / "report.md").read_text()
    best = ranked(collect(sweep_dir))[0]["trial"]
    assert f"(../{best}/trace.json)" in text
    for link in text.split("](../")[1:]:
        assert (report_dir / ".." / link.split(")")[0]).exists()


def test_missing_or_empty_dir_is_one_line_and_exit_2(tmp_path):
    for target in (tmp_path / "absent", tmp_path):
        done = _report(target)
        assert done.returncode == 2
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


def test_reason_keys():
    assert reason_keys("skipped", "needs CUDA: pipeline schedules (pp > 1), selective recompute") == [
        "needs CUDA: pipeline schedules (pp > 1)", "needs CUDA: selective recompute"]
    assert reason_keys("invalid", "world size 2 is not divisible by tp*pp*cp = 4*1*1 = 4") == [
        "world size 2 is not divisible by tp*pp*cp"]
    assert reason_keys("error", "rank 1: RuntimeError: boom") == ["RuntimeError: boom"]
    assert reason_keys("timeout", None) == ["timeout"]


def test_top_kernels_table_is_the_mean_over_ranks():
    from analysis.report import _mean_breakdown, _md_table_html, kernels_table

    def rank(gemm_s, copy_s):
        return {"breakdown": {"step_s": 1.0, "categories": {}, "top_kernels": [
            {"name": "nvjet_tst_a|b", "category": "matmul", "count": 4, "total_s": gemm_s, "share": gemm_s},
            {"name": "_forward_kernel", "category": "norm", "count": 2, "total_s": copy_s, "share": copy_s}]}}

    mean = _mean_breakdown({"ranks": [rank(0.4, 0.1), rank(0.2, 0.3)]})
    assert [(k["name"], k["total_s"], k["count"]) for k in mean["top_kernels"]] == [
        ("nvjet_tst_a|b", pytest.approx(0.3), 4), ("_forward_kernel", pytest.approx(0.2), 2)]
    table = kernels_table(mean["top_kernels"], n=1)
    assert table.splitlines()[2] == "| `nvjet_tst_a/b` | matmul | 4 | 300.00 | 30.0 |"
    assert "<td><code>nvjet_tst_a/b</code></td>" in "".join(_md_table_html(table.splitlines()))
    assert _mean_breakdown({"ranks": [{"breakdown": {"step_s": 1.0, "categories": {}}}]})["top_kernels"] == []
