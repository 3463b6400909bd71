"""Run one trial from its spec and write its `result.json`.

The sweeper writes the spec (`prepare`, before the trial's job is launched); the job
reads it (launch.main.job_spec) and hands it to one of the two paths below.

Two ways a trial's ranks start, one code path after that:
- local: this process starts every rank (`run_local`);
- SLURM/submitit: the job has one task per rank and each task runs
  `run_task`; task 0 assembles the record.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from core.records import rank_path, result_path, write_json_atomic
from core.spec import SPEC_FILE, TrialSpec
from launch.record import trial_record
from launch.supervise import collect_ranks, rank_log, run_ranks

# How long task 0 waits for other tasks' rank records after its own rank ended.
COLLECT_GRACE_S = 60.0


def prepare(spec: TrialSpec) -> None:
    """Before the trial's job is launched: its `spec.json`, and no rank files of an earlier run.

    The sweeper calls this, so the job runs the spec the sweeper planned (prediction
    inside) and does not compose the layout again; an earlier run's rank logs would
    read as this launch having started (`launch.supervise.started`).
    """
    for rank in range(spec.world_size):
        rank_log(spec.trial_dir, rank).unlink(missing_ok=True)
        rank_path(spec.trial_dir, rank).unlink(missing_ok=True)
    spec.save()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finish(spec: TrialSpec, ranks: list[dict], started: float) -> dict:
    record = trial_record(spec, ranks, wall_s=time.time() - started)
    write_json_atomic(result_path(spec.trial_dir), record)
    if spec.trial.wandb:
        try:
            from launch.wandb_log import log_trial

            log_trial(record, trial_dir=spec.trial_dir, project=spec.trial.wandb_project,
                      mode=spec.trial.wandb_mode)
        except Exception as exc:  # noqa: BLE001 - logging never costs a trial its record
            print(f"warning: wandb logging failed for {spec.name}: {exc}")
    return record


def run_local(spec: TrialSpec) -> dict:
    """Every rank of the trial on this machine. A spec not on disk yet (a direct call: the
    CUDA tests, the benchmarks) is written first, as the sweeper's `prepare` does."""
    if not (Path(spec.trial_dir) / SPEC_FILE).exists():
        prepare(spec)
    started = time.time()
    world = spec.world_size
    prestart = spec.trial.prestart_ranks
    if prestart is None:
        prestart = spec.cluster.device == "cuda"
    run_ranks(spec, ranks=list(range(world)), local_ranks=list(range(world)),
              master_addr="127.0.0.1", master_port=_free_port(),
              deadline=started + spec.trial.timeout_s, prestart=prestart,
              limit=f"trial.timeout_s={spec.trial.timeout_s} s")
    return _finish(spec, collect_ranks(spec, wait_until=time.time()), started)


def run_task(spec: TrialSpec) -> dict:
    """Inside a submitit task (SLURM or submitit's local executor): run this task's rank."""
    import submitit

    job = submitit.JobEnvironment()
    started = time.time()
    deadline, limit = task_deadline(spec, started)
    run_ranks(spec, ranks=[job.global_rank], local_ranks=[job.local_rank],
              master_addr=job.hostnames[0], master_port=_job_port(job.job_id),
              deadline=deadline, limit=limit)
    if job.global_rank != 0:
        return {"trial": spec.name, "status": "rank-done", "rank": job.global_rank}
    ranks = collect_ranks(spec, wait_until=min(time.time() + COLLECT_GRACE_S, deadline + 5))
    return _finish(spec, ranks, started)


def _process_started() -> float:
    """When this process started (epoch s): the job's clock ran from about then, not from `started`."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def task_deadline(spec: TrialSpec, started: float) -> tuple[float, str]:
    """When this task's trial must stop, and what that limit is called in a timeout's reason.

    Under SLURM the job's time limit may be the shorter one: the trial then stops ahead
    of SLURM's warning signal, so it ends as `timeout` with its record instead of being
    killed mid-step. The job's clock is counted from this task process's start, since
    Hydra's composition in the job can take many seconds before `started`.
    """
    from launch.slurm_jobs import signal_delay_s, trial_budget_s

    deadline, limit = started + spec.trial.timeout_s, f"trial.timeout_s={spec.trial.timeout_s} s"
    minutes = spec.cluster.time_limit_min
    if os.environ.get("SLURM_JOB_ID"):
        slurm_deadline = _process_started() + trial_budget_s(minutes)
        if slurm_deadline < deadline:
            deadline = slurm_deadline
            limit = (f"the SLURM time limit of {minutes} min (cluster.time_limit_min; stopped "
                     f"{minutes * 60 - trial_budget_s(minutes):.0f} s before it, ahead of SLURM's warning "
                     f"{signal_delay_s(minutes)} s before the limit)")
    return deadline, limit


def _job_port(job_id: str) -> int:
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def in_submitit_task() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))
