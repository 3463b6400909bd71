"""The pieces of the fault handling that need no sweep: lock, record check, SLURM time budget, OOM text."""

import json
import os
import subprocess

import pytest

from core.record_check import load_record, record_problem, set_aside
from launch.record import classify_text
from launch.slurm_jobs import signal_delay_s, trial_budget_s
from sweeper.lock import LockHeld, SweepLock


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_live_owner_keeps_the_lock_and_a_released_one_frees_it(tmp_path):
    with SweepLock(tmp_path):
        with pytest.raises(LockHeld, match=f"in use by another sweep \\(pid {os.getpid()} "):
            SweepLock(tmp_path).acquire()
    assert not (tmp_path / "sweep.lock").exists()
    with SweepLock(tmp_path):  # free again
        pass


@pytest.mark.parametrize("content", ["{}", "not json", "[1]", json.dumps({"host": os.uname().nodename, "pid": 0})])
def test_a_lock_nobody_owns_is_taken_over_with_a_message(tmp_path, content):
    (tmp_path / "sweep.lock").write_text(content)
    said = []
    with SweepLock(tmp_path, echo=said.append) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert len(said) == 1 and said[0].startswith("taking over the stale lock")


def test_dead_or_reused_pid_is_stale_and_another_host_is_refused(tmp_path):
    host = os.uname().nodename
    (tmp_path / "sweep.lock").write_text(json.dumps({"host": host, "pid": _dead_pid()}))
    SweepLock(tmp_path, echo=lambda _: None).acquire()
    # this process's pid, but a different start time: the pid was reused, the owner is gone
    (tmp_path / "sweep.lock").write_text(json.dumps({"host": host, "pid": os.getpid(), "start_ticks": "1"}))
    SweepLock(tmp_path, echo=lambda _: None).acquire()
    (tmp_path / "sweep.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(LockHeld, match="locked by pid 1 on host elsewhere; if that driver is gone, remove"):
        SweepLock(tmp_path).acquire()


def test_record_problems_name_what_is_wrong(tmp_path):
    good = {"schema": 1, "trial": "t", "status": "error", "model": {}, "cluster": {},
            "layout": {k: 1 for k in ("tp", "pp", "vpp", "cp", "mbs", "gbs")},
            "trial_config": {}, "world_size": 1, "dp": 1, "recorded_at": "2026-12-01T12:00:00+0000"}
    assert record_problem(good) is None
    assert record_problem({**good, "schema": 2}) == "schema 2, expected 1"
    assert record_problem({**good, "status": "great"}) == "unknown status 'great'"
    assert record_problem({**good, "layout": {**good["layout"], "tp": True}}) == \
        "layout.tp is True, not a positive integer"
    assert record_problem({**good, "status": "ok"}) == "status ok without a valid 'step_time_s'"
    path = tmp_path / "result.json"
    assert load_record(path) == (None, None)
    path.write_bytes(b"\xff\xfe")
    assert load_record(path)[1].startswith("unreadable")
    moved = set_aside(path, "damaged")
    assert not path.exists() and moved.read_bytes() == b"\xff\xfe"
    path.write_text("{}")
    assert set_aside(path, "damaged") != moved  # never overwrites an earlier one


def test_slurm_warning_and_trial_budget_leave_the_trial_most_of_its_time():
    assert signal_delay_s(1) == 10 and signal_delay_s(20) == 120 and signal_delay_s(600) == 120
    assert trial_budget_s(1) == 40.0  # 60 s - 10 s warning - 10 s for start-up and the record
    assert trial_budget_s(30) == 30 * 60 - 120 - 10


@pytest.mark.parametrize("text, status", [
    ("RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 92274688 bytes", "oom"),
    ("MemoryError", "oom"),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "oom"),
    ("RuntimeError: injected failure", "error"),
])
def test_host_and_gpu_oom_read_as_oom(text, status):
    assert classify_text(text) == status
