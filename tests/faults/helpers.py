"""Fault injection around the real sweep command: start it, wait for a state, kill it, look at SLURM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.launch.sweeps import REPO, records, run_sweep, trial_name  # noqa: F401 - re-exported

# One layout, one trial, as short as a real megatron-core trial gets: one rank (the faults are
# the driver's and SLURM's, not the ranks'; 2 cores are shared), 1 + 1 steps.
RANKS = 1
ONE = ["layout.tp=1", "layout.pp=1", "layout.mbs=2", "layout.recompute=none", "layout.gbs=4",
       "layout.attention=sdpa", "layout.norm=torch", "trial.warmup_steps=1", "trial.measure_steps=1",
       "trial.timeout_s=120", f"cluster.gpus_per_node={RANKS}"]
NAME = trial_name(tp=1, mbs=2, gbs=4)
SLURM = ["hydra/launcher=submitit_slurm"]
# A SLURM job that stays pending for an hour (sbatch --begin): "a job that can never start",
# without touching the partition other tests use.
HELD = ["+hydra.launcher.additional_parameters.begin=now+1hour"]


def start_sweep(sweep_dir, *overrides, env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launch.main", f"hydra.sweep.dir={sweep_dir}",
           "sweep.progress_interval_s=5", *overrides]
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env)


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    """Poll until predicate() is truthy; fail (and kill proc) after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"driver exited (rc {proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-2000:]}")
        time.sleep(0.5)
    if proc is not None:
        proc.kill()
        proc.communicate()
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def finish(proc: subprocess.Popen, timeout_s: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"driver did not finish within {timeout_s:.0f} s:\n{out[-2000:]}\n{err[-2000:]}")
    return proc.returncode, out, err


def interrupt(proc: subprocess.Popen, sig=signal.SIGINT, timeout_s: float = 60) -> tuple[int, str, str]:
    proc.send_signal(sig)
    return finish(proc, timeout_s)


def job_ids(sweep_dir) -> dict[str, str]:
    try:
        jobs = json.loads((Path(sweep_dir) / "slurm_jobs.json").read_text())
    except (OSError, ValueError):
        return {}
    return {name: entry["job_id"] for name, entry in jobs.items()}


def queued(job_id: str) -> str:
    """The job's state as squeue shows it now ('' when squeue no longer lists it as pending/running)."""
    out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() if out.returncode == 0 else ""


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.strip().splitlines() if line.strip()]


def processes_mentioning(text: str) -> list[int]:
    """Live pids whose command line contains text (a trial directory: its rank processes)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids
