"""Assembling a trial's record: classify a failure, pick the deciding rank, sum up the steps.

The record types, statuses, paths and the atomic writer are core.records'.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict
from typing import Optional

from core.flops import FORMULAS, flops_per_token, mfu
from core.records import DIVERGED, PEAK_MEMORY, TrialRecord
from launch.divergence import Diverged


def classify(exc: BaseException) -> str:
    """diverged for a non-finite loss, oom for allocator failures (CUDA or host), error otherwise."""
    if isinstance(exc, Diverged):
        return DIVERGED
    return classify_text(f"{type(exc).__name__}: {exc}")


# Host OOM reads differently from CUDA's: torch's CPU allocator and Python's own.
OOM_MARKERS = ("outofmemory", "out of memory", "can't allocate memory", "cannot allocate memory",
               "memoryerror", "std::bad_alloc")


def classify_text(text: str) -> str:
    """oom when an error message (or a rank's log) says an allocator failed, error otherwise."""
    text = text.lower()
    if any(m in text or m in text.replace(" ", "") for m in OOM_MARKERS):
        return "oom"
    return "error"


def _worst_status(ranks: list[dict]) -> str:
    # Ranks stopped after another rank failed (secondary) do not decide: a pipeline
    # stage that diverged leaves the others waiting in a collective until stopped.
    statuses = {r.get("status", "error") for r in ranks if not r.get("secondary")}
    if statuses <= {"ok"}:
        statuses = {r.get("status", "error") for r in ranks}
    for status in ("interrupted", "timeout", "oom", "diverged", "error"):
        if status in statuses:
            return status
    return "ok"


def _first_error(ranks: list[dict]) -> Optional[str]:
    # A rank that failed on its own explains the trial better than one killed after it.
    failed = [r for r in ranks if r.get("status") != "ok" and r.get("error")]
    failed.sort(key=lambda r: (bool(r.get("secondary")), r.get("rank", 0)))
    return f"rank {failed[0]['rank']}: {failed[0]['error']}" if failed else None


def summarize_steps(ranks: list[dict], warmup: int) -> dict:
    """Step time is the slowest rank's, per step; the median over measured steps."""
    per_rank = [r["step_times_s"] for r in ranks if r.get("step_times_s")]
    if not per_rank:
        return {}
    steps = [max(times) for times in zip(*per_rank)]
    measured = steps[warmup:] or steps
    return {
        "step_times_s": steps,
        "step_time_s": statistics.median(measured),
    }


def _base(spec, status: str, reason: Optional[str]) -> TrialRecord:
    return TrialRecord(
        trial=spec.name,
        status=status,
        reason=reason,
        model=asdict(spec.model),
        cluster=asdict(spec.cluster),
        layout=asdict(spec.layout),
        trial_config=asdict(spec.trial),
        world_size=spec.world_size,
        dp=spec.layout.dp(spec.world_size),
        prediction=None if spec.prediction is None else spec.prediction.to_dict(),  # spec.json's shape
        git_commit=spec.git_commit,
        recorded_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def base_record(spec, status: str, reason: Optional[str] = None) -> dict:
    """The part of a record every trial has, launched or not."""
    return _base(spec, status, reason).to_dict()


def trial_record(spec, ranks: list[dict], *, wall_s: float) -> dict:
    """Assemble the trial's record from its rank records (missing ranks already filled in)."""
    ranks = sorted(ranks, key=lambda r: r.get("rank", 0))
    status = _worst_status(ranks)
    record = _base(spec, status, _first_error(ranks) if status != "ok" else None)
    record.wall_s = round(wall_s, 3)
    record.ranks = [
        {k: v for k, v in r.items() if k not in ("step_times_s", "losses", "grad_norms")} for r in ranks
    ]
    first = ranks[0] if ranks else {}
    record.env = first.get("env", {})
    record.trial_path = first.get("trial_path")
    record.peak_memory_gb = [r.get(PEAK_MEMORY) for r in ranks]
    known = [m for m in record.peak_memory_gb if m is not None]
    record.peak_memory_gb_max = max(known) if known else None
    losses = next((r["losses"] for r in ranks if r.get("losses")), None)
    if status == DIVERGED:
        record.diverged_step = min((r["diverged_step"] for r in ranks if "diverged_step" in r),
                                   default=None)
        record.losses = losses
    if status != "ok":
        return record.to_dict()
    steps = summarize_steps(ranks, spec.trial.warmup_steps)
    record.step_times_s, record.step_time_s = steps["step_times_s"], steps["step_time_s"]
    record.losses = losses
    record.grad_norms = next((r["grad_norms"] for r in ranks if r.get("grad_norms")), None)
    tokens = spec.layout.gbs * spec.model.seq_length
    record.tokens_per_s = tokens / record.step_time_s
    record.mfu = mfu(spec.model, record.tokens_per_s, spec.cluster.peak_tflops, spec.world_size)
    record.tflops_per_gpu = {
        c: record.tokens_per_s * flops_per_token(spec.model, c) / spec.world_size / 1e12
        for c in FORMULAS
    }
    record.mfu_formula = FORMULAS
    record.peak_tflops = spec.cluster.peak_tflops
    record.breakdown = next((r["breakdown"] for r in ranks if r.get("breakdown")), None)
    return record.to_dict()
