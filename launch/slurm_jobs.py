"""SLURM jobs of a sweep: submit one per trial, remember their ids, and wait without hanging.

hydra-submitit-launcher blocks in `job.results()`, which never returns for a job
cancelled while pending or one that can never start when there is no accounting
(`sacct` absent: submitit then reports such a job UNKNOWN forever). Here the
driver submits each trial itself, writes the job id into `<sweep_dir>/slurm_jobs.json`
as soon as sbatch answers, and polls `squeue` (which needs no accounting):
- a job pending longer than `sweep.queue_allowance_s` is cancelled and recorded
  `lost` (job never started);
- a job that leaves the queue before its trial wrote a record is recorded `lost`
  (cancelled) if it never ran, or from its rank records if it did;
- a running job gets its time limit plus a grace minute, then it is cancelled.
A driver that was killed leaves its jobs in `slurm_jobs.json`: the next run adopts
the ones still queued or running (or cancels them, `sweep.cancel_orphans=true`),
so no trial is ever submitted twice. Each job also carries a comment naming its sweep
directory and trial (`job_tag`), which finds it even if the driver died between
sbatch's answer and writing the id.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

from core.record_check import load_record
from core.records import read_json, write_json_atomic
from launch.supervise import started as rank_started

JOBS_FILE = "slurm_jobs.json"
JOB_NAME = "layout-sweep"  # scripts/slurm_down.sh cancels only jobs of this name
POLL_S = 2.0
RUNNING_GRACE_S = 60.0  # past the time limit, for SLURM's own KillWait and the record's write
# How long a job may stay unknown to squeue right after sbatch (controller lag).
APPEAR_GRACE_S = 15.0
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING")


def signal_delay_s(time_limit_min: int) -> int:
    """How long before the time limit SLURM warns the job (submitit's --signal=USR2@N).

    submitit's default 120 s would be the whole of a 1-minute limit; a tenth of the
    limit, between 10 and 120 s, leaves the trial most of its time.
    """
    return int(min(120, max(10, time_limit_min * 60 // 10)))


def trial_budget_s(time_limit_min: int) -> float:
    """Seconds a trial may run inside a job of this limit: it stops before SLURM's warning.

    Counted from the task process's start; 10 s cover srun's start before it, stopping
    the ranks and the record's write.
    """
    return max(1.0, time_limit_min * 60 - signal_delay_s(time_limit_min) - 10.0)


def load_jobs(sweep_dir) -> dict[str, dict]:
    jobs = read_json(Path(sweep_dir) / JOBS_FILE)
    return jobs if isinstance(jobs, dict) else {}


def job_tag(sweep_dir, name: str) -> str:
    """The SLURM comment of a trial's job: finds it even when the driver died before writing its id."""
    digest = hashlib.sha1(f"{Path(sweep_dir).resolve()}/{name}".encode()).hexdigest()[:20]
    return f"{JOB_NAME}:{digest}"


def queue_states() -> Optional[dict[str, tuple[str, str, str]]]:
    """job id -> (state, reason, comment) for every job squeue still knows; None when squeue fails."""
    try:
        out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%r|%k"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    states = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|", 3)
        if len(parts) == 4:
            states[parts[0]] = (parts[1], parts[2], parts[3])
    return states


def scancel(job_ids: list[str]) -> None:
    if job_ids:
        try:
            subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass  # the controller is down: the job's record says what is known


def make_executor(launcher):
    """The submitit executor hydra-submitit-launcher would build, from the same parameters."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    params = dict(launcher.params)
    init_keys = {"submitit_folder", "max_num_timeout"}
    executor = submitit.AutoExecutor(cluster=launcher._EXECUTOR, folder=params["submitit_folder"],
                                     **({f"{launcher._EXECUTOR}_max_num_timeout": params["max_num_timeout"]}
                                        if "max_num_timeout" in params else {}))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"{launcher._EXECUTOR}_{k}": v
                                  for k, v in params.items() if k not in init_keys})
    return executor


class JobWatch:
    """The sweep's SLURM jobs, from submission until each trial has a record.

    `record_lost(name, status, reason)` writes the record of a trial whose job ended
    without one; it is the sweeper's, which knows the trial's spec.
    """

    def __init__(self, sweep_dir: Path, *, queue_allowance_s: float, time_limit_min: int,
                 record_lost: Callable[[str, str, str], None], echo=print):
        self.sweep_dir = Path(sweep_dir)
        self.queue_allowance_s, self.time_limit_min = queue_allowance_s, time_limit_min
        self.record_lost, self.echo = record_lost, echo
        self.jobs = load_jobs(sweep_dir)
        self.open: dict[str, dict] = {}  # trial -> its job entry, until the trial has a record

    def _save(self) -> None:
        write_json_atomic(self.sweep_dir / JOBS_FILE, self.jobs)

    def submit(self, executor, name: str, fn, *args) -> str:
        executor.update_parameters(slurm_comment=job_tag(self.sweep_dir, name))
        job = executor.submit(fn, *args)
        entry = {"job_id": str(job.job_id), "submitted_at": time.time()}
        self.jobs[name] = entry
        self._save()  # at once: a driver killed from here on leaves the id for the next run
        self.open[name] = entry
        return entry["job_id"]

    def orphans(self, names: list[str]) -> dict[str, str]:
        """Of these trials, the ones whose job from an earlier run is still queued or running: name -> id."""
        states = queue_states() or {}
        by_tag = {comment: job_id for job_id, (state, _, comment) in states.items() if state in ACTIVE}
        found = {}
        for name in names:
            known = self.jobs.get(name, {}).get("job_id")
            if known and states.get(known, ("",))[0] in ACTIVE:
                found[name] = known
            elif job_tag(self.sweep_dir, name) in by_tag:  # submitted, then killed before the id was saved
                found[name] = by_tag[job_tag(self.sweep_dir, name)]
                self.jobs[name] = {"job_id": found[name], "submitted_at": time.time()}
                self._save()
        return found

    def adopt(self, name: str) -> None:
        self.open[name] = self.jobs[name]

    def cancel_open(self) -> list[str]:
        """Cancel every job whose trial has no record yet; returns those trials."""
        names = [n for n in self.open if not self._has_record(n)]
        scancel([self.open[n]["job_id"] for n in names])
        self.open.clear()
        return names

    def _has_record(self, name: str) -> bool:
        record, _ = load_record(self.sweep_dir / name / "result.json")
        return record is not None

    def wait(self, names: list[str]) -> None:
        """Until each of these trials has a record; never longer than their jobs' deadlines."""
        waiting = [n for n in names if n in self.open]
        warned = False
        while waiting:
            states = queue_states()
            now = time.time()
            if states is None and not warned:
                warned = True
                self.echo("warning: squeue does not answer; waiting for it until the jobs' deadlines")
            for name in list(waiting):
                if self._has_record(name) or (self._resolve(name, states, now) if states is not None
                                              else self._unreachable(name, now)):
                    waiting.remove(name)
                    del self.open[name]
            if waiting:
                time.sleep(POLL_S)

    def _unreachable(self, name: str, now: float) -> bool:
        """squeue fails: past everything the job could take (queue and run), give up on it."""
        entry = self.open[name]
        if now - entry["submitted_at"] <= self.queue_allowance_s + self.time_limit_min * 60 + RUNNING_GRACE_S:
            return False
        scancel([entry["job_id"]])
        self.record_lost(name, "lost", f"job {entry['job_id']}'s state unknown: squeue did not answer past "
                         "its queueing allowance and time limit; scancel attempted")
        return True

    def _resolve(self, name: str, states: dict, now: float) -> bool:
        """Decide a trial without a record from its job's state; True once it has one."""
        entry = self.open[name]
        job_id = entry["job_id"]
        state, why, _ = states.get(job_id, (None, "", ""))
        if state == "PENDING":
            if now - entry["submitted_at"] > self.queue_allowance_s:
                scancel([job_id])
                self.record_lost(name, "lost", f"job never started: job {job_id} pending ({why}) longer than "
                                 f"sweep.queue_allowance_s={self.queue_allowance_s:g} s; cancelled")
                return True
            return False
        if state in ACTIVE:
            entry.setdefault("running_since", now)
            if now - entry["running_since"] > self.time_limit_min * 60 + RUNNING_GRACE_S:
                scancel([job_id])
                self.record_lost(name, "error", f"job {job_id} still {state} {self.time_limit_min} min "
                                 f"+ {RUNNING_GRACE_S:.0f} s after it started; cancelled")
                return True
            return False
        if state is None and now - entry["submitted_at"] < APPEAR_GRACE_S:
            return False
        # The job left the queue (or squeue forgot it) without a record from its trial.
        time.sleep(1.0)  # task 0 may be renaming its record into place right now
        if self._has_record(name):
            return True
        # a rank's log appears when it starts (1 s: the file system's clock against ours)
        started = "running_since" in entry or rank_started(self.sweep_dir / name, since=entry["submitted_at"] - 1)
        ended = state or "gone from the queue"
        if started:
            self.record_lost(name, "ran", f"job {job_id} ended ({ended}) before its trial wrote a record")
        elif state in (None, "CANCELLED"):
            self.record_lost(name, "lost", f"cancelled: job {job_id} left the queue ({ended}) before it started")
        else:
            self.record_lost(name, "lost", f"job never started: job {job_id} ended {ended} ({why})")
        return True
