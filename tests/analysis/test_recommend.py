"""layout-recommend: its formats, and records it cannot use named one line each."""

import json

import pytest

from analysis.megatron_args import megatron_lm_command
from analysis.recommend import main, record_problem
from core.config import ClusterConfig, Layout, ModelConfig, TrialConfig
from core.records import result_path, write_json_atomic
from core.spec import TrialSpec
from launch.record import trial_record

MODEL = ModelConfig()
CLUSTER = ClusterConfig()  # 2 ranks


def _ok(sweep, step_s, **layout) -> dict:
    layout = Layout(gbs=8, **layout)
    spec = TrialSpec(model=MODEL, cluster=CLUSTER, layout=layout, trial=TrialConfig(warmup_steps=1),
                     trial_dir=str(sweep / layout.name))
    ranks = [{"rank": r, "status": "ok", "step_times_s": [9.0, step_s, step_s], "losses": [7.0, 6.9, 6.8],
              "peak_memory_gb": 1.0} for r in range(2)]
    record = trial_record(spec, ranks, wall_s=3.0)
    write_json_atomic(result_path(spec.trial_dir), record)
    return record


def _write(sweep, name: str, text: str):
    path = sweep / name / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


@pytest.fixture
def damaged_sweep(tmp_path):
    """One good trial, and one of each way a record can be unusable (all 'faster' than it)."""
    good = _ok(tmp_path, 0.5, mbs=2)
    fast = _ok(tmp_path, 0.1, mbs=4)
    bad = {}
    bad["truncated"] = _write(tmp_path, "truncated", json.dumps(fast)[:40])
    bad["a list"] = _write(tmp_path, "a_list", "[1, 2]")
    (tmp_path / "a_dir" / "result.json").mkdir(parents=True)  # unreadable as a file
    bad["a dir"] = tmp_path / "a_dir" / "result.json"
    for name, change in {"tp0": {"layout": {**fast["layout"], "tp": 0}},
                         "no layout": {"layout": None},
                         "mfu list": {"mfu": [0.9]},
                         "mfu text": {"mfu": {"palm": "fast"}},
                         "bad field": {"layout": {**fast["layout"], "tp": "two"}}}.items():
        bad[name] = _write(tmp_path, name.replace(" ", "_"), json.dumps({**fast, **change}))
    (tmp_path / fast["trial"] / "result.json").unlink()
    return tmp_path, good, bad


def test_unusable_records_are_named_once_each_and_never_chosen(damaged_sweep, capsys):
    sweep, good, bad = damaged_sweep
    assert main([str(sweep), "--format", "megatron-lm"]) == 0
    captured = capsys.readouterr()
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == len(bad)
    for name, path in bad.items():
        assert sum(str(path) in line for line in warnings) == 1, name
    assert any("tp must be a positive integer, got 0" in line for line in warnings)
    assert any("mfu is list" in line for line in warnings)
    assert "--tensor-model-parallel-size 0" not in captured.out
    want = megatron_lm_command(MODEL, Layout(**good["layout"]), world_size=2).line()
    assert captured.out.strip().splitlines()[-1] == want


def test_nothing_usable_is_one_line_error(tmp_path, capsys):
    _write(tmp_path, "broken", "{")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: no usable trial records") and "not JSON" in err


def test_json_has_the_same_content_as_text(tmp_path, capsys):
    good = _ok(tmp_path, 0.5, mbs=2, tp=2)
    assert main([str(tmp_path), "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    best = result["best"]
    assert best["name"] == Layout(**good["layout"]).name and result["problems"] == []
    assert best["megatron_lm"]["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"  # tp 2
    assert best["megatron_lm"]["command"] in text
    assert all(line in text for line in best["megatron_core_text"])
    assert f"attention={best['kernels']['attention']}" in text


def test_predicted_megatron_lm_format_is_pasteable_and_names_its_kernels(capsys):
    assert main(["--model", "llama2_7b", "--cluster", "h100_80gb", "--gbs", "256", "--format", "megatron-lm"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert all(line.startswith(("# ", "export ")) for line in lines[:-1])
    assert lines[-1].startswith("pretrain_gpt.py ") and "--spec kernels.megatron_lm_spec" in lines[-1]
    assert any(line.startswith("# kernels: attention=") for line in lines)


@pytest.mark.parametrize("argv", [["--top", "0", "--model", "tiny", "--cluster", "local_cpu"],
                                  ["--model", "tiny", "--cluster", "local_cpu", "--format", "yaml"]])
def test_bad_arguments_exit_nonzero_without_traceback(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own one-line usage error
        code = exc.code
    assert code == 2 and "Traceback" not in capsys.readouterr().err


def test_record_problem_accepts_failed_trials_with_odd_layouts():
    invalid = {"trial": "x", "status": "invalid", "layout": {"tp": 0}, "model": {}}
    assert record_problem(invalid) is None  # an invalid layout is why it is recorded invalid
    assert record_problem({**invalid, "status": 3}) == "status is int, not str"
