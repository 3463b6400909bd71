"""Faults of a real SLURM cluster, injected into real sweeps (issue 13).

Nothing is mocked: sbatch, squeue, scancel and the SLURM tasks are real, on the
one-node cluster tests/slurm.py starts. A job that must stay pending is held with
`sbatch --begin=now+1hour`, so the partition itself is never touched. Each test
bounds its own time; most inject the fault before a trial runs, so the suite
runs in a few minutes on 2 cores.
"""

import json
import os
import signal
import subprocess

import pytest

from tests.faults.helpers import (
    HELD, NAME, ONE, SLURM, REPO, error_lines, finish, interrupt, job_ids, queued, records, run_sweep,
    start_sweep, wait_for,
)

pytestmark = pytest.mark.slurm


def test_job_that_never_starts_is_recorded_lost_and_the_sweep_goes_on(slurm_cluster, tmp_path):
    result = run_sweep(tmp_path / "s", *SLURM, *ONE, *HELD, "sweep.queue_allowance_s=4", timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    record = records(tmp_path / "s")[NAME]
    assert record["status"] == "lost"
    assert record["reason"].startswith("job never started") and "BeginTime" in record["reason"]
    assert queued(job_ids(tmp_path / "s")[NAME]) in ("", "CANCELLED")  # cancelled, not left pending
    assert NAME in (tmp_path / "s" / "leaderboard.md").read_text()
    # lost is not a result: a resumed sweep runs the trial again
    again = run_sweep(tmp_path / "s", *SLURM, *ONE, "sweep.dry_run=true", timeout=60)
    assert "would launch 1 trials" in again.stdout


def test_job_cancelled_while_pending_is_recorded_lost(slurm_cluster, tmp_path):
    driver = start_sweep(tmp_path / "s", *SLURM, *ONE, *HELD)
    job = wait_for(lambda: job_ids(tmp_path / "s").get(NAME), 60, "the job id on disk", driver)
    assert queued(job) == "PENDING"
    subprocess.run(["scancel", job], check=True, timeout=30)
    rc, out, err = finish(driver, 60)
    assert rc == 0, err[-2000:]
    record = records(tmp_path / "s")[NAME]
    assert record["status"] == "lost" and record["reason"].startswith("cancelled"), record["reason"]
    assert f"[1/1] lost" in out


def test_concurrent_sweep_into_one_directory_is_refused_and_a_stale_lock_taken_over(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "s"
    first = start_sweep(sweep_dir, *SLURM, *ONE, *HELD)
    job = wait_for(lambda: job_ids(sweep_dir).get(NAME), 60, "the first sweep's job", first)
    second = run_sweep(sweep_dir, *SLURM, *ONE, *HELD, timeout=60)
    assert second.returncode != 0
    lines = error_lines(second.stderr)
    assert len(lines) == 1 and "is in use by another sweep" in lines[0] and str(first.pid) in lines[0], lines
    assert job_ids(sweep_dir) == {NAME: job}  # the second sweep submitted nothing

    # Ctrl-C to the SLURM driver: its job is cancelled, the trial recorded interrupted, exit 130.
    rc, out, err = interrupt(first)
    assert rc == 130 and error_lines(err)[-1].startswith("interrupted:"), err[-2000:]
    assert "Traceback" not in err
    assert queued(job) in ("", "CANCELLED")
    assert records(sweep_dir)[NAME]["status"] == "interrupted"
    assert not (sweep_dir / "sweep.lock").exists()

    # A lock left by a driver that is gone (pid of an exited process) is taken over.
    dead = subprocess.Popen(["true"])
    dead.wait()
    (sweep_dir / "sweep.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid}))
    third = run_sweep(sweep_dir, *SLURM, *ONE, *HELD, "sweep.queue_allowance_s=3", timeout=90)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "taking over the stale lock" in third.stdout
    assert records(sweep_dir)[NAME]["status"] == "lost"  # the interrupted trial ran again


def test_driver_killed_then_resumed_adopts_its_job_and_runs_the_trial_once(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "s"
    driver = start_sweep(sweep_dir, *SLURM, *ONE)
    job = wait_for(lambda: job_ids(sweep_dir).get(NAME), 60, "the job id on disk", driver)
    driver.send_signal(signal.SIGKILL)
    driver.communicate(timeout=30)
    assert queued(job) in ("PENDING", "RUNNING", "COMPLETING") or (sweep_dir / NAME / "result.json").exists()

    again = run_sweep(sweep_dir, *SLURM, *ONE, timeout=180)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "taking over the stale lock" in again.stdout
    trial_dirs = [d for d in sweep_dir.iterdir() if (d / "spec.json").exists()]  # the sweeper wrote it
    assert trial_dirs and all((d / "result.json").exists() for d in trial_dirs)  # no folder left without one
    record = records(sweep_dir)[NAME]
    assert record["status"] == "ok", record.get("reason")
    if "adopting 1 SLURM job" not in again.stdout:  # it finished before the re-run looked
        assert "1 done" in again.stdout
    assert job_ids(sweep_dir) == {NAME: job}  # never submitted twice
    assert [p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir()] == [job]  # one sbatch


LONG = [a for a in ONE if not a.startswith("trial.measure_steps")] + ["trial.measure_steps=100000"]


def _running_trial(sweep_dir, args=LONG):
    """Start a sweep of one long trial; return (driver, job id) once the trial's ranks run."""
    driver = start_sweep(sweep_dir, *SLURM, *args)
    job = wait_for(lambda: job_ids(sweep_dir).get(NAME), 60, "the job id on disk", driver)
    log = sweep_dir / NAME / "rank0.log"
    # generous: other sessions' jobs may hold the node's CPUs first
    wait_for(lambda: queued(job) == "RUNNING" and log.exists() and log.stat().st_size > 0, 240,
             "the trial's ranks to run", driver)
    return driver, job


def test_running_job_cancelled_gets_a_record_with_the_cause(slurm_cluster, tmp_path):
    driver, job = _running_trial(tmp_path / "s")
    subprocess.run(["scancel", job], check=True, timeout=30)
    rc, out, err = finish(driver, 90)
    assert rc == 0, err[-2000:]
    record = records(tmp_path / "s")[NAME]
    assert record["status"] == "error" and "SIGTERM" in record["reason"], record["reason"]


def test_orphans_are_cancelled_and_resubmitted_when_asked(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "s"
    driver = start_sweep(sweep_dir, *SLURM, *ONE, *HELD)
    old = wait_for(lambda: job_ids(sweep_dir).get(NAME), 60, "the job id on disk", driver)
    driver.send_signal(signal.SIGKILL)
    driver.communicate(timeout=30)
    assert queued(old) == "PENDING"  # the orphan
    # As if the driver had died between sbatch's answer and writing the id: found by its comment.
    (sweep_dir / "slurm_jobs.json").unlink()
    again = run_sweep(sweep_dir, *SLURM, *ONE, *HELD, "sweep.cancel_orphans=true", "sweep.queue_allowance_s=3",
                      timeout=90)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"cancelled 1 SLURM job(s) an earlier run left queued or running ({old})" in again.stdout
    assert queued(old) in ("", "CANCELLED")
    new = job_ids(sweep_dir)[NAME]
    assert new != old and queued(new) in ("", "CANCELLED")
    assert records(sweep_dir)[NAME]["status"] == "lost"


def test_slurm_time_limit_shorter_than_the_trial_ends_as_timeout(slurm_cluster, tmp_path):
    # 1 minute of SLURM time; the trial would need minutes (4000 steps of ~0.05 s).
    args = [a for a in ONE if not a.startswith("trial.measure_steps")] + ["trial.measure_steps=4000"]
    result = run_sweep(tmp_path / "s", *SLURM, *args, "cluster.time_limit_min=1", timeout=150)
    assert result.returncode == 0, result.stderr[-2000:]
    record = records(tmp_path / "s")[NAME]
    assert record["status"] == "timeout", record.get("reason")
    assert "SLURM time limit of 1 min" in record["reason"]
    assert "USR2@10" in next((tmp_path / "s" / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "1 timeout" in (tmp_path / "s" / "leaderboard.md").read_text()


def test_capacity_check_refuses_a_world_beyond_the_partition(slurm_cluster, tmp_path):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    result = run_sweep(tmp_path / "s", *SLURM, *ONE, "cluster.nodes=100000", timeout=60)
    assert result.returncode != 0
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: cluster.nodes=100000 but SLURM partition debug has 1")
    assert not (tmp_path / "s").exists()
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before


def _said(stderr: str) -> str:
    """slurm_up's own lines (why it gave up), not only the daemon logs it prints after them."""
    own = [line for line in stderr.splitlines() if line.startswith(("slurm_up:", "slurm_down:"))]
    return "\n".join(own[-10:]) + "\n" + stderr[-1000:]


# The last two restart the cluster; they run last so the others see a settled one.
def test_slurmd_killed_and_the_cluster_restarted_mid_trial_never_hangs_the_driver(slurm_cluster, tmp_path):
    # A trial that would run for minutes, bounded by a 25 s trial limit.
    args = [a for a in LONG if not a.startswith("trial.timeout_s")] + ["trial.timeout_s=25"]
    driver, job = _running_trial(tmp_path / "s", args)
    state_dir = os.path.dirname(slurm_cluster["SLURM_CONF"])
    slurmd = int(open(os.path.join(state_dir, "slurmd.pid")).read())
    os.kill(slurmd, signal.SIGKILL)
    up = subprocess.run(["bash", str(REPO / "scripts/slurm_up.sh"), state_dir], capture_output=True, text=True,
                        timeout=120)
    assert up.returncode == 0, _said(up.stderr)
    rc, out, err = finish(driver, 120)
    assert rc == 0, err[-2000:]
    # The restart cancels the project's jobs; the job's step may outlive slurmd (slurmstepd runs
    # on) until the trial's own limit. Either way the trial has a record with its cause.
    record = records(tmp_path / "s")[NAME]
    assert record["status"] in ("error", "timeout") and record["reason"], record
    assert queued(job) in ("", "CANCELLED", "COMPLETED", "COMPLETING")  # not left pending or running


def test_cluster_restart_cancels_only_the_projects_jobs(slurm_cluster, tmp_path):
    def submit(name):
        out = subprocess.run(["sbatch", "--parsable", "-J", name, "--begin=now+1hour", "-o", "/dev/null",
                              "--wrap", "true"], capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.strip().split(";")[0]

    user, ours = submit("someone-elses-job"), submit("layout-sweep")
    try:
        state_dir = os.path.dirname(slurm_cluster["SLURM_CONF"])
        down = subprocess.run(["bash", str(REPO / "scripts/slurm_down.sh"), state_dir], capture_output=True,
                              text=True, timeout=60)
        assert down.returncode == 0, down.stderr
        up = subprocess.run(["bash", str(REPO / "scripts/slurm_up.sh"), state_dir], capture_output=True,
                            text=True, timeout=120)
        assert up.returncode == 0, _said(up.stderr)
        assert queued(user) == "PENDING"  # survives the restart
        assert queued(ours) in ("", "CANCELLED")
    finally:
        subprocess.run(["scancel", user, ours], capture_output=True, timeout=30)
