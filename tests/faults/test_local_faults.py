"""Faults that need no cluster, injected into the real sweep command (issue 13).

Bad input (malformed overrides, names that would become paths outside sweeps/,
infinite numbers), damaged records, interrupts, host OOM under `ulimit -v`, a
read-only or full sweep directory, and a re-run of failed trials. Each test bounds
its own time and runs at most one or two short real trials.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from analysis.results import load_records
from core.config import ConfigError
from launch.capacity import check_names
from tests.faults.helpers import (
    NAME, ONE, RANKS, REPO, error_lines, interrupt, processes_mentioning, records, run_sweep, start_sweep,
    trial_name, wait_for,
)


@pytest.mark.parametrize("override, message", [
    ("layout.mbs=abc", "error: layout.mbs must be an integer, got 'abc'"),
    ("layout.tp=1.5", "error: layout.tp must be an integer, got 1.5"),
    ("layout.tp=", "error: layout.tp must be an integer, got ''"),
    ("cluster.peak_tflops=inf", "error: cluster.peak_tflops must be a finite number, got inf"),
    ("sweep.name=../../etc", "error: sweep.name must be a plain name"),
    ("sweep.name=a/b", "error: sweep.name must be a plain name"),
    ("model.name=..", "error: model.name must be a plain name"),
    ("foo=bar", "error: unknown config key 'foo'"),
    ("layout.attention=../../../tmp/x", "error: layout.attention must be one of triton, "),  # a Literal
    ("layout=3", "error: layout is a section, not a value: set its fields (layout.FIELD=VALUE), got layout=3"),
    # Hydra's own errors, after composition: its report shortened to one line
    ("+layout.tp=2", "error: Could not append to config. An item is already at 'layout.tp'."),
    ("hydra/launcher=bogus", "error: In 'hydra/config': Could not find 'hydra/launcher/bogus'; "
                             "available: basic, submitit_local, submitit_slurm"),
])
def test_bad_override_is_one_line_and_writes_nothing(tmp_path, override, message):
    result = run_sweep(tmp_path / "s", *ONE, override, timeout=60)
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert not (tmp_path / "s").exists()


def test_a_name_from_a_preset_is_checked_too():
    """Not only the command line: a preset or site file could set a name that becomes the path."""
    with pytest.raises(ConfigError, match=r"cluster.name must be a plain name .* got '../x'"):
        check_names({"sweep": {"name": "ok"}, "model": {"name": "tiny"}, "cluster": {"name": "../x"}})
    check_names({"sweep": {"name": "local_cpu"}, "model": {"name": "llama2_7b"}, "cluster": {"name": "h100_80gb"}})


def test_local_launcher_refuses_more_than_one_node(tmp_path):
    result = run_sweep(tmp_path / "s", *ONE, "cluster.nodes=100000", timeout=60)
    assert result.returncode == 2
    assert error_lines(result.stderr) == ["error: cluster.nodes=100000, but the local launcher runs every rank "
                                          "on this machine: use hydra/launcher=submitit_slurm for more than one node"]


def test_damaged_records_are_reported_set_aside_and_the_trials_run_again(tmp_path):
    sweep_dir = tmp_path / "s"
    mbs1 = trial_name(tp=1, mbs=1, gbs=4)
    for name, text in ((NAME, "[1, 2]"), (mbs1, '{"status": "ok"}')):
        (sweep_dir / name).mkdir(parents=True)
        (sweep_dir / name / "result.json").write_text(text)
    both = [a for a in ONE if not a.startswith("layout.mbs")] + ["layout.mbs=1,2"]
    plan = run_sweep(sweep_dir, *both, "sweep.dry_run=true", timeout=60)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert f"damaged record {sweep_dir / NAME / 'result.json'}: not a JSON object but list" in plan.stdout
    assert f"damaged record {sweep_dir / mbs1 / 'result.json'}: field 'trial' missing" in plan.stdout
    assert "would launch 2 trials" in plan.stdout
    assert (sweep_dir / NAME / "result.json").read_text() == "[1, 2]"  # a dry run moves nothing

    # Only mbs 2 runs now; mbs 1's damaged record stays in the directory the summary reads.
    result = run_sweep(sweep_dir, *ONE, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    kept = list((sweep_dir / NAME).glob("result.json.damaged-*"))
    assert [p.read_text() for p in kept] == ["[1, 2]"]  # renamed, never deleted
    assert json.loads((sweep_dir / NAME / "result.json").read_text())["status"] == "ok"
    assert f"warning: skipping damaged record {sweep_dir / mbs1 / 'result.json'}" in result.stderr
    board = (sweep_dir / "leaderboard.md").read_text()
    assert "1 ok" in board and mbs1 not in board


def test_analysis_skips_a_damaged_record_with_one_line(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "result.json").write_text('{"schema": 1, "trial": "x", "status": "ok", "model": {}, '
                                                   '"cluster": {}, "layout": {"tp": 0}, "trial_config": {}, '
                                                   '"world_size": 1, "dp": 1, "recorded_at": "2026-12-01"}')
    warnings = []
    assert load_records(tmp_path, warn=warnings.append) == []
    assert warnings == [f"warning: skipping damaged record {tmp_path / 'bad' / 'result.json'}: "
                        "layout.tp is 0, not a positive integer"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_the_ranks_records_interrupted_and_exits_130(tmp_path, sig):
    """Ctrl-C, or SIGTERM from a scheduler: the ranks live in their own sessions and must be stopped."""
    sweep_dir = tmp_path / "s"
    long = [a for a in ONE if not a.startswith("trial.measure_steps")] + ["trial.measure_steps=100000"]
    driver = start_sweep(sweep_dir, *long)
    trial_dir = str(sweep_dir / NAME)
    wait_for(lambda: len(processes_mentioning(trial_dir)) == RANKS, 90, "the rank processes", driver)
    log = sweep_dir / NAME / "rank0.log"
    wait_for(lambda: log.exists() and log.stat().st_size > 0, 60, "rank 0 to start importing", driver)
    rc, out, err = interrupt(driver, sig)
    assert rc == 130, err[-2000:]
    assert error_lines(err)[-1] == ("interrupted: running trials stopped and recorded as interrupted; "
                                    "run the same command again to resume")
    assert "Traceback" not in err
    wait_for(lambda: not processes_mentioning(trial_dir), 10, "the ranks to be gone")
    assert records(sweep_dir)[NAME]["status"] == "interrupted"
    assert not (sweep_dir / "sweep.lock").exists()
    resumed = run_sweep(sweep_dir, *long, "sweep.dry_run=true", timeout=60)
    assert "would launch 1 trials" in resumed.stdout  # interrupted is not a result


def test_host_oom_under_ulimit_is_recorded_oom(tmp_path):
    # Weights of ~3 GiB per layer cannot be allocated under a 2.5 GiB address-space limit,
    # which still leaves room for torch's and megatron-core's imports (~1 GiB).
    big = ["model.hidden_size=8192", "model.ffn_hidden_size=22016", "model.num_attention_heads=64",
           "model.num_query_groups=64", "model.num_layers=1", "sweep.prune_predicted_oom=false"]
    cmd = [sys.executable, "-m", "launch.main", f"hydra.sweep.dir={tmp_path / 's'}", *ONE, *big]
    result = subprocess.run(["bash", "-c", 'ulimit -v 2500000; exec "$@"', "bash", *cmd], cwd=REPO,
                            capture_output=True, text=True, timeout=180, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-2000:]
    record = records(tmp_path / "s")[NAME]
    assert record["status"] == "oom", record["reason"]
    assert "can't allocate memory" in record["reason"] or "MemoryError" in record["reason"]


def _mount_tmpfs(path, size: str) -> bool:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.mark.parametrize("fault, message", [("read-only", "Read-only file system"),
                                            ("full", "No space left on device")])
def test_unwritable_sweep_directory_is_one_line(tmp_path, fault, message):
    if os.geteuid() != 0 or not _mount_tmpfs(tmp_path / "m", "256k"):
        pytest.skip("needs root and tmpfs mounts to make a read-only or full directory")
    try:
        if fault == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "m")], check=True)
        else:
            subprocess.run(["dd", "if=/dev/zero", f"of={tmp_path / 'm' / 'fill'}", "bs=4k"], capture_output=True)
        result = run_sweep(tmp_path / "m" / "s", *ONE, timeout=60)
    finally:
        subprocess.run(["umount", str(tmp_path / "m")], capture_output=True)
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: cannot write the sweep") and message in lines[0], lines


def test_rerun_failed_never_shows_the_old_status_as_the_new_result(tmp_path):
    sweep_dir = tmp_path / "s"
    # A failed trial, quickly: a 1 s limit stops it while its ranks still import.
    short = [a for a in ONE if not a.startswith("trial.timeout_s")] + ["trial.timeout_s=1"]
    first = run_sweep(sweep_dir, *short, timeout=120)
    assert first.returncode == 0 and records(sweep_dir)[NAME]["status"] == "timeout"
    again = run_sweep(sweep_dir, *ONE, "sweep.rerun_failed=true", timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    progress = [line for line in again.stdout.splitlines() if line.startswith("[1/1] ")]
    assert [line.split()[1] for line in progress if NAME in line and "elapsed" not in line] == ["ok"]
    assert records(sweep_dir)[NAME]["status"] == "ok"
    old = list((sweep_dir / NAME).glob("result.json.previous-timeout-*"))
    assert len(old) == 1 and json.loads(old[0].read_text())["status"] == "timeout"
