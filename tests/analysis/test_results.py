"""Collecting records into a table, ranking them, and recommending from them."""

import json

import pytest

from analysis.leaderboard import markdown, ranked
from analysis.megatron_args import megatron_lm_command
from analysis.recommend import from_measured, main as recommend_main
from analysis.results import collect, write_csv
from core.config import ClusterConfig, Layout, ModelConfig, TrialConfig
from core.records import result_path, write_json_atomic
from core.spec import TrialSpec
from launch.record import base_record, trial_record

MODEL = ModelConfig()
CLUSTER = ClusterConfig()


def _spec(tmp_path, **layout):
    layout = Layout(gbs=8, **layout)
    return TrialSpec(model=MODEL, cluster=CLUSTER, layout=layout, trial=TrialConfig(warmup_steps=1),
                     trial_dir=str(tmp_path / layout.name))


def _ok(tmp_path, step_s, **layout):
    spec = _spec(tmp_path, **layout)
    ranks = [{"rank": r, "status": "ok", "step_times_s": [9.0, step_s, step_s + r * 0.01],
              "losses": [7.0, 6.9, 6.8], "peak_memory_gb": 1.0 + r} for r in range(2)]
    write_json_atomic(result_path(spec.trial_dir), trial_record(spec, ranks, wall_s=3.0))
    return spec


def _sweep(tmp_path):
    fast = _ok(tmp_path, 0.5, tp=1, mbs=2)
    slow = _ok(tmp_path, 1.0, tp=2, mbs=2)
    spec = _spec(tmp_path, tp=2, mbs=1)
    ranks = [{"rank": 0, "status": "oom", "error": "OutOfMemoryError: CUDA out of memory"},
             {"rank": 1, "status": "error", "secondary": True, "error": "stopped after rank 0 failed"}]
    write_json_atomic(result_path(spec.trial_dir), trial_record(spec, ranks, wall_s=1.0))
    bad = _spec(tmp_path, tp=3)
    write_json_atomic(result_path(bad.trial_dir), base_record(bad, "invalid", "world size 2 is not divisible"))
    return fast, slow, spec, bad


def test_trial_record_takes_the_slowest_rank_and_the_median_after_warmup(tmp_path):
    spec = _ok(tmp_path, 0.5, tp=1, mbs=2)
    record = json.loads(result_path(spec.trial_dir).read_text())
    assert record["step_times_s"] == [9.0, 0.5, 0.51]  # per step, the slowest rank
    assert record["step_time_s"] == pytest.approx(0.505)  # median of the measured steps (warm-up 1)
    assert record["tokens_per_s"] == pytest.approx(8 * MODEL.seq_length / 0.505)
    assert record["peak_memory_gb"] == [1.0, 2.0] and record["peak_memory_gb_max"] == 2.0


def test_failed_ranks_give_the_primary_cause(tmp_path):
    _, _, oom, _ = _sweep(tmp_path)
    record = json.loads(result_path(oom.trial_dir).read_text())
    assert record["status"] == "oom"
    assert record["reason"].startswith("rank 0: OutOfMemoryError")


def test_collect_rank_and_render(tmp_path):
    fast, slow, oom, bad = _sweep(tmp_path)
    rows = collect(tmp_path)
    assert {r["trial"]: r["status"] for r in rows} == {
        fast.name: "ok", slow.name: "ok", oom.name: "oom", bad.name: "invalid"}
    order = [r["trial"] for r in ranked(rows)]
    assert order == [fast.name, slow.name]
    board = markdown(rows)
    assert board.index("tp1 pp1 dp2 mbs2") < board.index("tp2 pp1 dp1 mbs2")
    assert oom.name in board and bad.name in board and "world size 2 is not divisible" in board
    assert "2 ok" in board and "1 oom" in board and "1 invalid" in board
    write_csv(rows, tmp_path / "results.csv")
    assert (tmp_path / "results.csv").read_text().count("\n") == 5


def test_recommend_from_measurements(tmp_path, capsys):
    fast, *_ = _sweep(tmp_path)
    lines = "\n".join(from_measured(tmp_path, top=3))
    assert "tp1 pp1 dp2 mbs2" in lines.splitlines()[1]
    assert megatron_lm_command(MODEL, fast.layout, world_size=2).line() in lines
    assert recommend_main([str(tmp_path)]) == 0
    assert recommend_main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: no sweep directory {tmp_path / 'missing'}"


def test_recommend_predicts_without_runs(capsys):
    assert recommend_main(["--model", "llama2_7b", "--cluster", "h100_80gb", "--gbs", "256", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "Predicted best layouts for llama2_7b on 32 GPUs" in out and "--micro-batch-size" in out
    assert "Kernels: attention=" in out  # the predicted mode names its kernels too
    assert recommend_main(["--model", "llama2_7b", "--cluster", "tpu_v5"]) == 2


def test_console_leaderboard_groups_layouts_that_never_ran(tmp_path):
    fast, slow, oom, bad = _sweep(tmp_path)
    other = _spec(tmp_path, tp=3, mbs=2)
    write_json_atomic(result_path(other.trial_dir), base_record(other, "invalid", "world size 2 is not divisible"))
    board = markdown(collect(tmp_path), group_unlaunched=True)
    assert oom.name in board  # a trial that ran and failed is always named
    assert bad.name not in board and "| invalid | 2 | world size 2 is not divisible |" in board
