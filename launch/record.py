"""Result records: one JSON file per rank, assembled into one `result.json` per trial.

Every write is atomic (temp file, fsync, rename), so a crash or kill never
leaves a half-written record and never touches another trial's files.

Statuses: ok, invalid (megatron would reject it), skipped (unsupported here or
predicted OOM; the reason says which), oom (GPU or host allocator), error, timeout
(the trial's or SLURM's limit), diverged (a loss or gradient norm was not finite;
`diverged_step` says when; never ranked, never calibrated on), interrupted (the driver
was stopped while it ran) and lost (its SLURM job never started or was cancelled
before it wrote a record). The last two are not results: a resumed sweep runs those
trials again.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from launch.divergence import Diverged

STATUSES = ("ok", "invalid", "skipped", "oom", "error", "timeout", "diverged", "interrupted", "lost")
# A resumed sweep runs these again: they say nothing about the layout.
NOT_RESULTS = ("interrupted", "lost")
# Bumped when a record's fields change meaning; launch/record_check.py reads it.
SCHEMA_VERSION = 1
FAILED = ("oom", "error", "timeout")
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class PeakMemory:
    """One rank's peak memory, GiB (2**30 bytes); sweeper.memory predicts the first two.

    allocated_gb: torch.cuda.max_memory_allocated (MemoryEstimate.allocated_gb);
    reserved_gb: torch.cuda.max_memory_reserved, what the caching allocator held
    (MemoryEstimate.reserved_gb; it is the trial's `peak_memory_gb`);
    device_used_gb: used device memory from torch.cuda.mem_get_info at the end, the
    allocator plus everything outside it (CUDA context, NCCL): MemoryEstimate.peak_gb.
    """

    allocated_gb: float
    reserved_gb: float
    device_used_gb: Optional[float] = None

    def fields(self) -> dict:
        """The rank record's keys (sweeper.calibration.measured_memory reads them back)."""
        return {"peak_memory_gb": self.reserved_gb, "peak_memory_allocated_gb": self.allocated_gb,
                "mem_get_info_used_gb": self.device_used_gb,
                "peak_memory_source": "torch.cuda.max_memory_reserved (allocated and mem_get_info beside it)"}


def write_json_atomic(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def rank_path(trial_dir, rank: int) -> Path:
    return Path(trial_dir) / f"rank{rank}.json"


def classify(exc: BaseException) -> str:
    """diverged for a non-finite loss, oom for allocator failures (CUDA or host), error otherwise."""
    if isinstance(exc, Diverged):
        return "diverged"
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


def base_record(spec, status: str, reason: Optional[str] = None) -> dict:
    """The part of a record every trial has, launched or not."""
    from dataclasses import asdict

    return {
        "schema": SCHEMA_VERSION,
        "trial": spec.name,
        "status": status,
        "reason": reason,
        "model": asdict(spec.model),
        "cluster": asdict(spec.cluster),
        "layout": asdict(spec.layout),
        "trial_config": asdict(spec.trial),
        "world_size": spec.world_size,
        "dp": spec.layout.dp(spec.world_size),
        "prediction": spec.prediction,
        "git_commit": spec.git_commit,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def result_path(trial_dir) -> Path:
    return Path(trial_dir) / RESULT_FILE


def trial_record(spec, ranks: list[dict], *, wall_s: float) -> dict:
    """Assemble the trial's record from its rank records (missing ranks already filled in)."""
    from analysis.flops import FORMULAS, flops_per_token, mfu

    ranks = sorted(ranks, key=lambda r: r.get("rank", 0))
    status = _worst_status(ranks)
    record = base_record(spec, status, _first_error(ranks) if status != "ok" else None)
    record["wall_s"] = round(wall_s, 3)
    record["ranks"] = [
        {k: v for k, v in r.items() if k not in ("step_times_s", "losses", "grad_norms")} for r in ranks
    ]
    first = ranks[0] if ranks else {}
    record["env"] = first.get("env", {})
    record["trial_path"] = first.get("trial_path")
    record["peak_memory_gb"] = [r.get("peak_memory_gb") for r in ranks]
    known = [m for m in record["peak_memory_gb"] if m is not None]
    record["peak_memory_gb_max"] = max(known) if known else None
    losses = next((r["losses"] for r in ranks if r.get("losses")), None)
    if status == "diverged":
        record["diverged_step"] = min((r["diverged_step"] for r in ranks if "diverged_step" in r),
                                      default=None)
        record["losses"] = losses
    if status != "ok":
        return record
    record.update(summarize_steps(ranks, spec.trial.warmup_steps))
    record["losses"] = losses
    grad_norms = next((r["grad_norms"] for r in ranks if r.get("grad_norms")), None)
    if grad_norms:
        record["grad_norms"] = grad_norms
    tokens = spec.layout.gbs * spec.model.seq_length
    record["tokens_per_s"] = tokens / record["step_time_s"]
    record["mfu"] = mfu(spec.model, record["tokens_per_s"], spec.cluster.peak_tflops, spec.world_size)
    record["tflops_per_gpu"] = {
        c: record["tokens_per_s"] * flops_per_token(spec.model, c) / spec.world_size / 1e12
        for c in FORMULAS
    }
    record["mfu_formula"] = FORMULAS
    record["peak_tflops"] = spec.cluster.peak_tflops
    breakdown = next((r["breakdown"] for r in ranks if r.get("breakdown")), None)
    if breakdown:
        record["breakdown"] = breakdown
    return record
