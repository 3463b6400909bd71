"""A real 2-task submitit job on the local one-node Slurm cluster (see tests/slurm.py)."""

from __future__ import annotations

import subprocess
import sys
import time

import cloudpickle
import pytest
import submitit

pytestmark = pytest.mark.slurm  # `-m "not slurm"` deselects it with the other cluster tests

TIMEOUT_S = 120

# The job's python cannot import this test module (pytest put it on sys.path, the job
# has no such path), so ship its functions by value instead of by module name.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _rank_and_world() -> tuple[int, int]:
    env = submitit.JobEnvironment()
    return env.global_rank, env.num_tasks


def test_two_task_job_reports_both_ranks(slurm_cluster, tmp_path):  # noqa: F811
    ex = submitit.SlurmExecutor(folder=tmp_path / "%j")
    ex.update_parameters(
        nodes=1, ntasks_per_node=2, cpus_per_task=1, time=5, partition="debug",
        job_name="layout-sweep-smoke",
    )
    job = ex.submit(_rank_and_world)
    deadline = time.monotonic() + TIMEOUT_S
    while not job.done():  # bounded: no pytest-timeout here, and a hung job must not hang CI
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} not done after {TIMEOUT_S}s; state={job.state}")
        time.sleep(1)

    results = job.results()  # one per task, in rank order; raises if a task failed
    assert sorted(results) == [(0, 2), (1, 2)]

    q = subprocess.run(["squeue", "-h", "-j", str(job.job_id)], capture_output=True,
                       text=True, timeout=30)
    assert q.returncode == 0, q.stderr
    q = subprocess.run(["squeue"], capture_output=True, text=True, timeout=30)
    assert q.returncode == 0 and "JOBID" in q.stdout, q.stderr
