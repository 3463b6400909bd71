"""The sweep command through hydra/launcher=submitit_slurm on a real one-node SLURM cluster.

Nothing is mocked: sbatch, squeue and the SLURM tasks are real; each trial is a
SLURM job with one task per rank, and task 0 writes the trial's record.
"""

import math
import os
import subprocess

import pytest

from tests.launch.sweeps import records, run_sweep, trial_name

pytestmark = pytest.mark.slurm

# On 2 ranks: dp=2, tp=2 and pp=2 (1F1B through megatron-core's schedule); tp2*pp2 is invalid there.
ARGS = ["hydra/launcher=submitit_slurm", "layout.tp=1,2", "layout.pp=1,2", "layout.vpp=1", "layout.mbs=1",
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
    assert recs[trial_name(tp=1, pp=2, mbs=1, gbs=4)]["status"] == "ok"  # a real pipeline
    for name, record in recs.items():
        if record["layout"]["tp"] * record["layout"]["pp"] == 4:
            assert record["status"] == "invalid"
        elif name == broken:
            assert record["status"] == "error" and "injected failure" in record["reason"]
        else:
            assert record["status"] == "ok", record.get("reason")
            assert len(record["peak_memory_gb"]) == 2  # two SLURM tasks, one rank each
    assert list((sweep_dir / ".submitit").iterdir())  # submitit's job folders: real sbatch jobs
    board = (sweep_dir / "leaderboard.md").read_text()
    assert all(name in board for name in recs if recs[name]["status"] != "ok")
    assert "2 ok" in board and "1 error" in board and "1 invalid" in board

    launched = [n for n in recs if recs[n]["status"] != "invalid"]
    mtimes = {n: (sweep_dir / n / "result.json").stat().st_mtime for n in launched}
    again = run_sweep(sweep_dir, *args, env=slurm_cluster)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "launching 0 trials" in again.stdout and "3 done" in again.stdout
    assert mtimes == {n: (sweep_dir / n / "result.json").stat().st_mtime for n in launched}


def _partition_cpus() -> int:
    out = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, timeout=20)
    return max((int(c.rstrip("+")) for c in out.stdout.split() if c.rstrip("+").isdigit()), default=0)


def test_slurm_runs_an_8_rank_3d_layout(slurm_cluster, tmp_path):
    """tp2 x pp2 (interleaved, vpp 2) x dp2 with sequence parallelism and full recompute: 8 SLURM
    tasks, one rank each. One CPU rank per SLURM CPU: the node must declare 8."""
    if _partition_cpus() < 8:
        pytest.skip(f"the SLURM node declares {_partition_cpus()} CPUs; 8 ranks need 8 (scripts/slurm_up.sh)")
    sweep_dir = tmp_path / "slurm_3d"
    result = run_sweep(sweep_dir, "hydra/launcher=submitit_slurm", "cluster.gpus_per_node=8",
                       "layout.tp=2", "layout.pp=2", "layout.vpp=2", "layout.mbs=1", "layout.gbs=8",
                       "layout.sequence_parallel=true", "layout.recompute=full",
                       "layout.attention=sdpa", "layout.norm=torch", "trial.warmup_steps=1",
                       "trial.measure_steps=2", "trial.timeout_s=400", env=slurm_cluster)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (record,) = records(sweep_dir).values()
    assert record["status"] == "ok", record.get("reason")
    assert record["world_size"] == 8 and record["dp"] == 2 and len(record["peak_memory_gb"]) == 8
    assert len(record["losses"]) == 3 and all(math.isfinite(l) for l in record["losses"])


def test_slurm_launcher_without_slurm_is_a_one_line_error(tmp_path):
    env = {"PATH": "/usr/bin/nonexistent:" + os.path.dirname(os.__file__)}  # no sbatch on PATH
    result = run_sweep(tmp_path / "x", "hydra/launcher=submitit_slurm", env=env)
    assert result.returncode != 0
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("error: SLURM not reachable")
    assert not (tmp_path / "x").exists()
