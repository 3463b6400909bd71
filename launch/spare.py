"""Rank processes started before they are needed, so a trial does not wait for imports.

Before its first step a rank spends 12-19 s on the H100 machine (2026-11-23,
benchmarks/diag_step_overhead.py): the interpreter, torch, megatron-core (which pulls
in torch.compile's machinery) and the trial path's own modules, then CUDA and NCCL.
A sweep of short trials on one GPU is mostly that.

A spare is `python -m launch.rank --spare DEVICE IMPORT_LOG` (`launch.rank.serve`): a fresh
interpreter that imports the trial path for DEVICE, touches no GPU, and waits on its stdin. While one
trial runs, the supervisor starts spares for the next; the next trial hands each rank
to a spare with one JSON line (spec path, rank environment, log path) instead of
starting a process. Each rank is still its own process, used for one trial only, so
nothing leaks between trials. A spare that died is skipped, and a fresh process starts
as before. Spares are used for local runs (`launch.trial.run_local`); under SLURM each
task starts its own rank once. `trial.prestart_ranks` turns them on or off; by default
they are on for GPU trials only (on a small CPU machine the spare's imports would
compete with the running trial for cores).

The spare's imports run beside the current trial's start-up (CUDA, NCCL, model build,
compilation), on a core of their own, and are done long before its measured steps.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from core.paths import REPO_ROOT


def base_env() -> dict:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


class Spares:
    """Idle spare ranks per device kind, started ahead of the trials that will use them."""

    def __init__(self):
        self._idle: dict[str, list[tuple[subprocess.Popen, Path]]] = {}

    def take(self, device: str) -> Optional[tuple[subprocess.Popen, Path]]:
        """A live idle spare for `device` (and the log of its imports), or None."""
        idle = self._idle.get(device, [])
        while idle:
            proc, import_log = idle.pop(0)
            if proc.poll() is None:
                return proc, import_log
        return None

    def prepare(self, device: str, count: int) -> None:
        """Start spares until `count` are idle for `device`."""
        idle = self._idle.setdefault(device, [])
        idle[:] = [(p, log) for p, log in idle if p.poll() is None]
        while len(idle) < count:
            fd, import_log = tempfile.mkstemp(prefix="spare-rank-", suffix=".log")
            with os.fdopen(fd, "w") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "launch.rank", "--spare", device, import_log],
                    env=base_env(), cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True, text=True,
                )
            idle.append((proc, Path(import_log)))

    def close(self) -> None:
        for idle in self._idle.values():
            for proc, import_log in idle:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                import_log.unlink(missing_ok=True)
        self._idle.clear()


def assign(proc: subprocess.Popen, *, spec_path: Path, env: dict, log: Path) -> None:
    """Hand one rank of a trial to a waiting spare."""
    proc.stdin.write(json.dumps({"spec": str(spec_path), "env": env, "log": str(log)}) + "\n")
    proc.stdin.close()


def receive(import_log: str) -> Optional[str]:
    """The spare's side of `assign`: wait for one rank, take on its environment and log.

    Returns the trial's spec path, or None when the supervisor went away (no rank for this
    spare). The spare's own entry (`launch.rank.serve`) imports the trial path first."""
    line = sys.stdin.readline()
    if not line:
        Path(import_log).unlink(missing_ok=True)
        return None
    job = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, Path(import_log).read_bytes())  # what the imports printed
    except OSError:
        pass
    Path(import_log).unlink(missing_ok=True)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(job["env"], LAYOUT_SWEEP_ASSIGNED_AT=repr(time.time()))
    return job["spec"]


SPARES = Spares()
atexit.register(SPARES.close)
