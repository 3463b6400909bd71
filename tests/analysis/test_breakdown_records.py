"""The breakdowns in the records of real profiled CPU trials (the shared sweep of conftest.py):
categories that add up, communication where the layout puts it, the Chrome trace."""

import json

import pytest

from analysis.results import load_records
from launch.breakdown import CATEGORIES


def _profiled(sweep_dir):
    records = [r for r in load_records(sweep_dir) if r["status"] == "ok"]
    assert records and all("breakdown" in r for r in records)
    return records


def test_real_cpu_trials_add_up(sweep_dir):
    for record in _profiled(sweep_dir):
        for rank in record["ranks"]:
            b = rank["breakdown"]
            assert list(b["categories"]) == list(CATEGORIES)
            assert all(v >= 0 for v in b["categories"].values())
            assert sum(b["categories"].values()) == pytest.approx(b["step_s"], rel=1e-9)
            for category in ("attention", "matmul", "norm", "elementwise", "optimizer"):
                assert b["categories"][category] > 0, (record["trial"], category)
            assert b["categories"]["pp_comm"] == 0


def test_real_cpu_trials_communicate_where_the_layout_says(sweep_dir):
    for record in _profiled(sweep_dir):
        b = record["breakdown"]["categories"]
        # Groups of one still run (trivial) collectives, so compare rather than expect zero.
        if record["layout"]["tp"] == 2:  # dp 1: TP all-reduces in the model, no gradient all-reduce
            assert b["tp_comm"] > b["dp_comm"]
        else:  # tp 1, dp 2: the gradient all-reduce
            assert b["dp_comm"] > b["tp_comm"]


def test_trace_is_a_chrome_trace(sweep_dir):
    record = _profiled(sweep_dir)[0]
    trace = json.loads((sweep_dir / record["trial"] / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "train_step" in names and "optimizer" in names
