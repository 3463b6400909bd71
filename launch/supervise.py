"""Start rank processes, enforce the trial's time limit, and record what happened.

A rank is always a fresh `python -m launch.rank` process (started just now, or
a spare started ahead of need, `launch.spare`), used for one trial only, so no
memory or state leaks between trials. Locally one supervisor starts every rank; under
SLURM each task supervises its own rank. A rank that exits without writing its
record (segfault, kill, host OOM) or outlives the limit gets one written here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from core.paths import REPO_ROOT
from core.records import RankRecord, rank_path, read_json, write_json_atomic
from core.spec import TrialSpec
from launch import spare
from launch.record import classify_text

# After one rank fails, the others are usually stuck in a collective: give them
# this long to fail on their own before they are stopped.
FAILURE_GRACE_S = 15.0


def rank_vars(*, rank: int, local_rank: int, world: int, master_addr: str, master_port: int) -> dict:
    """What one rank's environment adds to the supervisor's."""
    return {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
            "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}


def _start(spec_path: Path, log_path: Path, variables: dict, *, device: Optional[str]) -> subprocess.Popen:
    """A rank process: a waiting spare when `device` names one that is ready, else a fresh one."""
    ready = spare.SPARES.take(device) if device else None
    if ready is not None:
        proc, _ = ready
        try:
            spare.assign(proc, spec_path=spec_path, env=variables, log=log_path)
            return proc
        except OSError:  # the spare died after take() saw it alive: start a fresh rank
            proc.kill()
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "launch.rank", str(spec_path)],
            env={**spare.base_env(), **variables}, cwd=REPO_ROOT, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )


def _log_tail(path: Path, limit: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait()


def run_ranks(spec: TrialSpec, *, ranks: list[int], local_ranks: list[int], master_addr: str,
              master_port: int, deadline: float, prestart: bool = False,
              limit: Optional[str] = None) -> None:
    """Run the given ranks to completion or the deadline; every rank ends with a record.

    prestart: take ranks from waiting spares, and start spares for the next trial
    (`launch.spare`). limit: what the deadline is, for a timeout's reason.
    Interrupted (Ctrl-C, SIGTERM turned into KeyboardInterrupt, any exception here),
    it stops its ranks, which live in their own sessions and would outlive it, records
    them `interrupted` and re-raises.
    """
    spec_path = Path(spec.trial_dir) / "spec.json"
    device = spec.cluster.device if prestart else None
    procs, logs = {}, {}
    outcome = {}  # rank -> "timeout" | "aborted" | "interrupted"
    try:
        for rank, local_rank in zip(ranks, local_ranks):
            path = rank_path(spec.trial_dir, rank)
            if path.exists():
                path.unlink()  # a stale record from an interrupted earlier run
            logs[rank] = rank_log(spec.trial_dir, rank)
            variables = rank_vars(rank=rank, local_rank=local_rank, world=spec.world_size,
                                  master_addr=master_addr, master_port=master_port)
            procs[rank] = _start(spec_path, logs[rank], variables, device=device)
        if device:
            spare.SPARES.prepare(device, len(ranks))
        first_failure = _watch(procs, outcome, deadline)
    except BaseException:
        for rank, proc in procs.items():
            if proc.poll() is None:
                outcome[rank] = "interrupted"
                _stop(proc)
        _record_ranks(spec, procs, logs, outcome, None, limit)
        raise
    _record_ranks(spec, procs, logs, outcome, first_failure, limit)


def _watch(procs: dict, outcome: dict, deadline: float) -> Optional[int]:
    """Until every rank exited; stops those past the deadline or the failure grace. Returns the first failed rank."""
    first_failure = None
    while any(p.poll() is None for p in procs.values()):
        now = time.time()
        failed = [r for r, p in procs.items() if p.poll() not in (None, 0)]
        if failed and first_failure is None:
            first_failure = (failed[0], now)
        for rank, proc in procs.items():
            if proc.poll() is not None:
                continue
            if now > deadline:
                outcome[rank] = "timeout"
                _stop(proc)
            elif first_failure and now > first_failure[1] + FAILURE_GRACE_S:
                outcome[rank] = "aborted"
                _stop(proc)
        time.sleep(0.2)
    return first_failure[0] if first_failure else None


def _record_ranks(spec: TrialSpec, procs: dict, logs: dict, outcome: dict, first_failure, limit) -> None:
    """A record for every rank that ended without writing its own."""
    for rank, proc in procs.items():
        path = rank_path(spec.trial_dir, rank)
        if read_json(path) is not None:
            continue
        tail = _log_tail(logs[rank])
        record = RankRecord(rank=rank, status="error", exit_code=proc.returncode, log_tail=tail)
        if outcome.get(rank) == "timeout":
            record.update(status="timeout", error=f"trial exceeded {limit or f'trial.timeout_s={spec.trial.timeout_s} s'}")
        elif outcome.get(rank) == "interrupted":
            record.update(status="interrupted", error="stopped: the sweep was interrupted")
        elif outcome.get(rank) == "aborted":
            record.update(status="error", secondary=True,
                          error=f"stopped {FAILURE_GRACE_S:.0f} s after rank {first_failure} failed")
        else:
            # Killed by the host's OOM killer, or an allocator failure before the rank could
            # write its record: the log says which.
            status = classify_text(tail[-600:])
            cause = "out of memory" if status == "oom" else "crash or kill"
            if proc.returncode is not None and proc.returncode < 0:  # why SLURM's scancel reads as SIGTERM
                cause += f": {signal.Signals(-proc.returncode).name}"
            record.update(status=status, error=f"rank exited with code {proc.returncode} without a record ({cause})")
        write_json_atomic(path, record.to_dict())


def rank_log(trial_dir, rank: int) -> Path:
    return Path(trial_dir) / f"rank{rank}.log"


def started(trial_dir, since: float = 0.0) -> bool:
    """Whether a rank of this trial started (at or after `since`, epoch s).

    Each rank's log is created as the rank starts (`_start`, or a spare taking the rank
    on), and `launch.trial.prepare` removes an earlier run's logs before the job is
    launched, so a log says this launch got as far as starting a rank.
    """
    for log in Path(trial_dir).glob("rank*.log"):
        try:
            if log.stat().st_mtime >= since:
                return True
        except FileNotFoundError:  # removed between glob and stat
            continue
    return False


def collect_ranks(spec: TrialSpec, *, wait_until: float) -> list[dict]:
    """Rank records of every rank, waiting until `wait_until` for ranks run elsewhere."""
    records = {}
    while True:
        for rank in range(spec.world_size):
            if rank not in records:
                rec = read_json(rank_path(spec.trial_dir, rank))
                if rec is not None:
                    records[rank] = rec
        if len(records) == spec.world_size or time.time() > wait_until:
            break
        time.sleep(0.5)
    for rank in range(spec.world_size):
        records.setdefault(rank, RankRecord(
            rank=rank, status="error", error="rank wrote no record (its task never ran or was killed)").to_dict())
    return [records[r] for r in range(spec.world_size)]
