"""launch.record: how a failure is classified and which rank's status decides the trial."""

import pytest

from launch.divergence import Diverged
from launch.record import _worst_status, classify, summarize_steps


@pytest.mark.parametrize("exc,status", [
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),
    (type("OutOfMemoryError", (RuntimeError,), {})("CUDA error"), "oom"),  # torch.cuda's class name
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), "oom"),
    (MemoryError(), "oom"),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), "error"),
    (ValueError("memory layout"), "error"),  # the word memory alone is no OOM
    (Diverged(3, "loss", float("nan"), []), "diverged"),
])
def test_classify(exc, status):
    assert classify(exc) == status


def _ranks(*statuses, secondary=()):
    return [{"rank": i, "status": s, "secondary": i in secondary} for i, s in enumerate(statuses)]


def test_the_worst_primary_status_decides():
    assert _worst_status(_ranks("ok", "ok")) == "ok"
    assert _worst_status(_ranks("ok", "error")) == "error"
    assert _worst_status(_ranks("error", "oom")) == "oom"
    assert _worst_status(_ranks("oom", "timeout")) == "timeout"
    assert _worst_status(_ranks("diverged", "error")) == "diverged"
    assert _worst_status(_ranks("error", "diverged", secondary=(0,))) == "diverged"
    assert _worst_status(_ranks("error", "ok", secondary=(0,))) == "error"  # never ok with a failed rank
    assert _worst_status([{"rank": 0}]) == "error"  # a record without a status is no success


def test_step_time_is_the_slowest_ranks_median_after_warmup():
    ranks = [{"step_times_s": [9.0, 1.0, 3.0, 2.0]}, {"step_times_s": [9.0, 2.0, 1.0, 2.5]}]
    result = summarize_steps(ranks, warmup=1)
    assert result["step_times_s"] == [9.0, 2.0, 3.0, 2.5]
    assert result["step_time_s"] == 2.5  # median of 2.0, 3.0, 2.5: warm-up excluded
    assert summarize_steps(ranks, warmup=4)["step_time_s"] == 2.75  # all warm-up: every step counts
    assert summarize_steps([{"rank": 0}], warmup=1) == {}


def test_a_secondary_rank_never_outranks_the_primary_failure():
    assert _worst_status(_ranks("timeout", "diverged", secondary=(0,))) == "diverged"
    assert _worst_status(_ranks("oom", "error", secondary=(0,))) == "error"


def test_host_oom_is_found_without_spaces_too():
    assert classify(RuntimeError("DefaultCPUAllocator: Out Of Memory")) == "oom"
    assert classify(RuntimeError("torch.OutOfMemoryError")) == "oom"
