"""Bad input: one line on stderr, a non-zero exit, no traceback, nothing written."""

import pytest

from tests.launch.sweeps import run_sweep


@pytest.mark.parametrize("args, message", [
    (["model=llama9_1t"], "error: unknown model preset 'llama9_1t'"),
    (["cluster=tpu"], "error: unknown cluster preset 'tpu'"),
    (["layout.tp=[1,"], "error: malformed override"),
    (["layout.flux=2"], "error: unknown field layout.flux"),
    (["model.hidden_size=-128"], "error: model.hidden_size must be positive, got -128"),
    (["layout.mbs=0"], "error: layout.mbs must be positive, got 0"),
    (["layout.tp=4", "layout.pp=1", "layout.recompute=none", "layout.mbs=1"],
     "error: empty search space: none of 1 layouts can run (first reason: world size 2 is not divisible by tp*pp*cp"),
    (["layout.distributed_optimizer=true", "layout.recompute=none", "layout.pp=1", "layout.tp=1",
      "layout.mbs=1"],
     "error: empty search space: none of 1 layouts can run (first reason: needs CUDA: distributed optimizer)"),
    (["model.num_query_groups=3"], "error: model.num_attention_heads 4 is not divisible by num_query_groups 3"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    sweep_dir = tmp_path / "sweep"
    result = run_sweep(sweep_dir, *args, timeout=120)
    assert result.returncode != 0
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(message), lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not sweep_dir.exists()
