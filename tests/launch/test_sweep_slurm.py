"""The sweep command through hydra/launcher=submitit_slurm on a real one-node SLURM cluster.

Nothing is mocked: sbatch, squeue and the SLURM tasks are real; each trial is a
SLURM job with one task per rank, and task 0 writes the trial's record.
"""

import os

import pytest

from tests.launch.sweeps import records, run_sweep, trial_name

pytestmark = pytest.mark.slurm

ARGS = ["hydra/launcher=submitit_slurm", "layout.tp=1,2", "layout.mbs=1,2", "layout.pp=1",
        "layout.recompute=none", "layout.gbs=4", "layout.attention=sdpa", "layout.norm=torch",
        "trial.warmup_steps=1", "trial.measure_steps=2", "trial.timeout_s=240"]


def test_slurm_sweep_runs_every_trial_as_a_job_and_resumes(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "slurm_sweep"
    broken = trial_name(tp=2, mbs=1, gbs=4)
    args = ARGS + [f"trial.fail_if_name_contains={broken}"]
    first = run_sweep(sweep_dir, *args, env=slurm_cluster)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    recs = records(sweep_dir)
    assert len(recs) == 4
    for name, record in recs.items():
        if name == broken:
            assert record["status"] == "error" and "injected failure" in record["reason"]
        else:
            assert record["status"] == "ok", record.get("reason")
            assert len(record["peak_memory_gb"]) == 2  # two SLURM tasks, one rank each
    assert list((sweep_dir / ".submitit").iterdir())  # submitit's job folders: real sbatch jobs
    board = (sweep_dir / "leaderboard.md").read_text()
    assert all(name in board for name in recs if recs[name]["status"] != "ok")
    assert "3 ok" in board and "1 error" in board

    mtimes = {n: (sweep_dir / n / "result.json").stat().st_mtime for n in recs}
    again = run_sweep(sweep_dir, *args, env=slurm_cluster)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "launching 0 trials" in again.stdout and "4 done" in again.stdout
    assert mtimes == {n: (sweep_dir / n / "result.json").stat().st_mtime for n in recs}


def test_slurm_launcher_without_slurm_is_a_one_line_error(tmp_path):
    env = {"PATH": "/usr/bin/nonexistent:" + os.path.dirname(os.__file__)}  # no sbatch on PATH
    result = run_sweep(tmp_path / "x", "hydra/launcher=submitit_slurm", env=env)
    assert result.returncode != 0
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("error: SLURM not reachable")
    assert not (tmp_path / "x").exists()
