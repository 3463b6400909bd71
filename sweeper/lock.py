"""One owner per sweep directory: a lock file naming the owner's host and pid.

Two drivers writing one sweep directory would both run every trial and print
numbers that are not the ones on disk. The lock is created exclusively
(O_EXCL); a lock whose process is gone (same host, pid dead or reused) is stale
and is taken over with a message. A lock from another host cannot be checked
from here, so it is refused with the path to remove by hand.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional

LOCK_FILE = "sweep.lock"


class LockHeld(RuntimeError):
    """Another live driver owns the sweep directory; the message says which."""


def _start_ticks(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (/proc), so a reused pid is not its owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _alive(owner: dict) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    ticks = owner.get("start_ticks")
    return ticks is None or _start_ticks(pid) in (None, ticks)


class SweepLock:
    def __init__(self, sweep_dir: Path, echo: Callable[[str], None] = print):
        self.path = Path(sweep_dir) / LOCK_FILE
        self.echo = echo
        self.owned = False

    def _create(self) -> bool:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock removed by a racing driver: try again
            if self._create():
                self.owned = True
                return
            try:
                owner = json.loads(self.path.read_text())
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                owner = {}  # half-written by a driver killed mid-write: nobody owns it
            if not isinstance(owner, dict):
                owner = {}
            host = owner.get("host")
            if host and host != socket.gethostname():
                raise LockHeld(f"sweep directory {self.path.parent} is locked by pid {owner.get('pid')} on "
                               f"host {host}; if that driver is gone, remove {self.path}")
            if _alive(owner):
                raise LockHeld(f"sweep directory {self.path.parent} is in use by another sweep "
                               f"(pid {owner['pid']} on {host}, since {owner.get('since')})")
            self.echo(f"taking over the stale lock {self.path} (pid {owner.get('pid')} on {host} is not running)")
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        raise LockHeld(f"could not lock {self.path}: another driver keeps taking it")

    def release(self) -> None:
        if self.owned:
            self.owned = False
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
