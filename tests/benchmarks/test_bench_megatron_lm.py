"""benchmarks/bench_megatron_lm.py on CPU: its commands, its parsing and its JSON (the GPU runs are the lead's)."""

import importlib.util
import json
import shlex
from pathlib import Path

import pytest

from analysis.megatron_args import megatron_lm_command
from core.config import Layout, ModelConfig

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_megatron_lm.py"
_spec = importlib.util.spec_from_file_location("bench_megatron_lm", PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

RUN_SH_TAIL = """[run.sh] per-iteration lines (iteration 1 includes start-up and torch.compile):
  iter 3: 1114.2 ms, 247.0 TFLOP/s/GPU, lm loss 1.03E+01
[run.sh] median of iterations >= 3: 1114.0 ms/iteration, 247.1 TFLOP/s/GPU (n=10)
"""


def test_parse_megatron_lm_reads_run_sh_summary():
    assert bench.parse_megatron_lm(RUN_SH_TAIL) == {"ms": 1114.0, "megatron_tflops_per_gpu": 247.1, "iterations": 10}
    with pytest.raises(ValueError, match="median of iterations"):
        bench.parse_megatron_lm(RUN_SH_TAIL.splitlines()[1])


def test_summary_keeps_every_number_a_part_gave():
    runs = {"megatron_lm": {"ms": 600.0}, "trial": {"ms": 534.0}, "trial_no_cuda_graph": {"ms": 580.0},
            "trial_no_wgrad_fusion": {"ms": 560.0}, "trial_unfused_adam": {"ms": 550.0},
            "megatron_lm_cuda_graph_local": {"error": "boom"}}
    s = bench.summarize(runs, "NVIDIA H200")
    assert s["megatron_lm_over_trial"] == pytest.approx(534 / 600, abs=1e-3) and s["meets_target"] is False
    assert s["gap_ms"] == 66.0 and s["gap_ms_from_cuda_graph"] == 46.0 and s["gap_ms_from_wgrad_fusion"] == 26.0
    assert s["gap_ms_from_unfused_adam"] == 16.0
    assert s["megatron_lm_over_trial_no_cuda_graph"] == pytest.approx(580 / 600, abs=1e-3)
    assert s["megatron_lm_cuda_graph_local_ms"] is None
    broken = bench.summarize({"megatron_lm": {"error": "x"}, "trial": {"ms": 534.0}}, "NVIDIA H200")
    assert broken["trial_ms"] == 534.0 and broken["megatron_lm_over_trial"] is None and broken["meets_target"] is None


def test_dry_run_runs_the_printed_line_unchanged(tmp_path):
    assert bench.main(["--dry-run", "--out", str(tmp_path), "--tag", "t", "--set", "mbs=4"]) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    layout = Layout(**result["layout"])
    assert layout.mbs == 4 and layout.attention == "sdpa_cudnn" and layout.cuda_graph
    assert {"device", "megatron_lm_ms", "trial_ms", "megatron_lm_over_trial"} <= set(result["summary"])
    model = ModelConfig(name="llama_1b3", num_layers=24, hidden_size=2048, ffn_hidden_size=5632,
                        num_attention_heads=16, num_query_groups=16, vocab_size=32000, seq_length=2048)
    printed = megatron_lm_command(model, layout, world_size=1)
    script = shlex.split(result["runs"]["megatron_lm"]["dry_run"])[2]
    assert script.splitlines()[-1].endswith(shlex.join(printed.args) + " --train-iters 12")
    assert all(f"export {k}={v}" in script for k, v in printed.env.items())
    trial = result["runs"]["trial"]["dry_run"]
    assert "layout.mbs=4" in trial and "layout.cuda_graph=true" in trial and "trial.measure_steps=10" in trial
    assert "layout.cuda_graph=false" in result["runs"]["trial_no_cuda_graph"]["dry_run"]
    assert set(result["runs"]) == set(bench.PARTS)
    assert bench.main(["--dry-run", "--out", str(tmp_path), "--tag", "u", "--parts", "trial"]) == 0
    assert set(json.loads((tmp_path / "u.json").read_text())["runs"]) == {"trial"}


def test_merge_keeps_measured_runs_and_runs_only_the_rest(tmp_path):
    assert bench.main(["--dry-run", "--out", str(tmp_path), "--tag", "a", "--parts", "trial"]) == 0
    first = json.loads((tmp_path / "a.json").read_text())
    first["runs"] = {"megatron_lm": {"ms": 600.0}, "trial": {"error": "timed out"}}
    (tmp_path / "a.json").write_text(json.dumps(first))
    assert bench.main(["--dry-run", "--out", str(tmp_path), "--tag", "b", "--merge", str(tmp_path / "a.json")]) == 0
    merged = json.loads((tmp_path / "b.json").read_text())
    assert merged["runs"]["megatron_lm"] == {"ms": 600.0} and merged["summary"]["megatron_lm_ms"] == 600.0
    assert "dry_run" in merged["runs"]["trial"]  # a failed part runs again
    assert bench.main(["--dry-run", "--out", str(tmp_path), "--merge", str(tmp_path / "a.json"),
                       "--set", "mbs=2"]) == 2  # another layout's runs are never merged


@pytest.mark.parametrize("argv", [["--set", "mbs"], ["--set", "tp=0"], ["--steps", "2"], ["--model", "nope"],
                                  ["--parts", "trial,warp"]])
def test_bad_arguments_are_one_line_errors(argv, tmp_path, capsys):
    assert bench.main([*argv, "--dry-run", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
