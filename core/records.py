"""Result records: statuses, paths, the peak-memory fields, and the one atomic writer.

A trial leaves one JSON record per rank (`rank<N>.json`) and one `result.json`
assembled from them (launch/record.py). Every write here is atomic (temp file in the
same folder, fsync, rename), so a crash or kill never leaves a half-written file and
never touches another trial's files.

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
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

STATUSES = ("ok", "invalid", "skipped", "oom", "error", "timeout", "diverged", "interrupted", "lost")
DIVERGED = "diverged"  # the status of a trial whose loss or gradient norm was not finite
# A resumed sweep runs these again: they say nothing about the layout.
NOT_RESULTS = ("interrupted", "lost")
# Bumped when a record's fields change meaning; core/record_check.py reads it.
SCHEMA_VERSION = 1
FAILED = ("oom", "error", "timeout")
RESULT_FILE = "result.json"


# The one named memory peak of a rank and of a trial: `peak_memory_gb` per rank, and its
# maximum over ranks `peak_memory_gb_max` in the trial record (the leaderboard's "peak GiB").
# On CUDA it is torch.cuda.max_memory_reserved, what the caching allocator held (what an
# OOM is decided against; predicted as sweeper.memory's MemoryEstimate.reserved_gb); on CPU
# the process's peak RSS (predicted as MemoryEstimate.peak_gb). `peak_memory_source` says which.
PEAK_MEMORY = "peak_memory_gb"
PEAK_MEMORY_MAX = "peak_memory_gb_max"
PEAK_MEMORY_ALLOCATED = "peak_memory_allocated_gb"  # CUDA: the allocated part of the peak
DEVICE_USED = "mem_get_info_used_gb"  # CUDA: device memory in use at the end


@dataclass(frozen=True)
class PeakMemory:
    """One CUDA rank's peak memory, GiB (2**30 bytes); sweeper.memory predicts each part.

    reserved_gb: torch.cuda.max_memory_reserved, the rank's `peak_memory_gb`
    (MemoryEstimate.reserved_gb);
    allocated_gb: torch.cuda.max_memory_allocated, the part of it tensors held
    (MemoryEstimate.allocated_gb; the calibration fits its activation line to this);
    device_used_gb: used device memory from torch.cuda.mem_get_info at the end, the
    allocator plus everything outside it (CUDA context, NCCL): MemoryEstimate.peak_gb.
    """

    allocated_gb: float
    reserved_gb: Optional[float]
    device_used_gb: Optional[float] = None

    SOURCE = "torch.cuda.max_memory_reserved (allocated and mem_get_info beside it)"

    def fields(self) -> dict:
        """The rank record's keys; `from_rank` reads the same keys back."""
        return {PEAK_MEMORY: self.reserved_gb, PEAK_MEMORY_ALLOCATED: self.allocated_gb,
                DEVICE_USED: self.device_used_gb, "peak_memory_source": self.SOURCE}

    @classmethod
    def from_rank(cls, rank: dict) -> Optional["PeakMemory"]:
        """The peaks a CUDA rank record holds (the keys `fields` writes); None without them
        (a CPU rank, a failed one). A rank of an older record without its reserved peak
        counts its allocated peak only."""
        allocated, reserved, used = rank.get(PEAK_MEMORY_ALLOCATED), rank.get(PEAK_MEMORY), rank.get(DEVICE_USED)
        if not _positive(allocated):
            return None
        return cls(allocated_gb=allocated, reserved_gb=reserved if _positive(reserved) else None,
                   device_used_gb=used if _positive(used) else None)


def rss_peak_fields(rss_gb: float) -> dict:
    """A CPU rank record's memory keys: its peak RSS (getrusage), GiB, is its `peak_memory_gb`."""
    return {PEAK_MEMORY: rss_gb, "peak_memory_source": "peak RSS (getrusage)"}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _to_dict(record, always: frozenset) -> dict:
    """The record's JSON: fields that are None are left out unless `always` names them."""
    out = {}
    for f in fields(record):
        value = getattr(record, f.name)
        if f.name != "extra" and (value is not None or f.name in always):
            out[f.name] = value
    return {**out, **record.extra}


def _from_dict(cls, data: dict):
    """Known keys become fields, the rest `extra` (trial-path details the sweep does not read)."""
    known = {f.name for f in fields(cls)} - {"extra"}
    return cls(**{k: v for k, v in data.items() if k in known},
               extra={k: v for k, v in data.items() if k not in known})


@dataclass(kw_only=True)
class RankRecord:
    """One rank's record, `rank<N>.json`: written by the rank (launch/rank.py), or by the
    supervisor for a rank that ended without one (launch/supervise.py). Times are Unix s."""

    rank: int
    status: str  # one of STATUSES
    error: Optional[str] = None  # "Type: message", at most 2000 characters
    traceback: Optional[str] = None
    secondary: Optional[bool] = None  # True: stopped after another rank failed; does not decide
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    prestarted: Optional[bool] = None  # ran in a spare process started during the previous trial
    exit_code: Optional[int] = None  # supervisor's records: the process's return code
    log_tail: Optional[str] = None  # supervisor's records: the end of the rank's log
    env: Optional[dict] = None  # versions and device name
    trial_path: Optional[str] = None  # what ran it, in words (PATH of launch/cpu_trial.py or gpu_trial.py)
    # Measured, per step (warm-up included), until the end or the divergence:
    step_times_s: Optional[list] = None
    losses: Optional[list] = None
    grad_norms: Optional[list] = None
    diverged_step: Optional[int] = None  # the first step whose loss or gradient norm was not finite
    setup_s: Optional[dict] = None  # start-up phases, s
    # Memory, GiB (2**30 bytes): see PEAK_MEMORY and PeakMemory.
    peak_memory_gb: Optional[float] = None
    peak_memory_allocated_gb: Optional[float] = None
    mem_get_info_used_gb: Optional[float] = None
    peak_memory_source: Optional[str] = None
    # trial.profile: the time breakdown of one measured step (launch/breakdown.py)
    breakdown: Optional[dict] = None
    breakdown_error: Optional[str] = None
    trace: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def update(self, data: Optional[dict] = None, **values) -> "RankRecord":
        """Set fields from a dict of record keys (unknown keys go to `extra`); returns self."""
        for key, value in {**(data or {}), **values}.items():
            if key in _RANK_FIELDS:
                setattr(self, key, value)
            else:
                self.extra[key] = value
        return self

    def to_dict(self) -> dict:
        return _to_dict(self, frozenset({"rank", "status"}))

    @classmethod
    def from_dict(cls, data: dict) -> "RankRecord":
        return _from_dict(cls, data)


_RANK_FIELDS = frozenset(f.name for f in fields(RankRecord)) - {"extra"}
# Written for every trial, launched or not, even when None.
_BASE_FIELDS = frozenset({"schema", "trial", "status", "reason", "model", "cluster", "layout",
                          "trial_config", "world_size", "dp", "prediction", "git_commit", "recorded_at"})
_LAUNCHED_FIELDS = frozenset({"wall_s", "ranks", "env", "trial_path", "peak_memory_gb", "peak_memory_gb_max"})


@dataclass(kw_only=True)
class TrialRecord:
    """A trial's `result.json`: what every trial has (launched or not), then what its ranks
    measured (launch/record.py's trial_record assembles it). core/record_check.py says
    whether a file on disk is one of this schema."""

    schema: int = SCHEMA_VERSION
    trial: str  # the layout's name (core.config.Layout.name)
    status: str  # one of STATUSES
    reason: Optional[str] = None  # why not ok: invalid/skipped's reason, or the deciding rank's error
    model: dict
    cluster: dict
    layout: dict
    trial_config: dict
    world_size: int
    dp: int
    prediction: Optional[dict] = None  # core.spec.Prediction's JSON, made before the trial ran
    git_commit: Optional[str] = None  # core.paths.git_commit at the sweep's start
    recorded_at: str  # local time, "%Y-%m-%dT%H:%M:%S%z"
    # launched trials
    wall_s: Optional[float] = None  # the whole trial, start-up included
    ranks: Optional[list] = None  # the rank records without their per-step lists
    env: Optional[dict] = None
    trial_path: Optional[str] = None
    peak_memory_gb: Optional[list] = None  # per rank, GiB: PEAK_MEMORY
    peak_memory_gb_max: Optional[float] = None  # PEAK_MEMORY_MAX: the trial's one memory peak
    diverged_step: Optional[int] = None
    losses: Optional[list] = None
    grad_norms: Optional[list] = None
    # ok trials: step time of the slowest rank per step; the median over measured steps
    step_times_s: Optional[list] = None
    step_time_s: Optional[float] = None
    tokens_per_s: Optional[float] = None  # gbs * seq_length / step_time_s
    mfu: Optional[dict] = None  # {convention: fraction of peak}, core.flops
    tflops_per_gpu: Optional[dict] = None  # {convention: model TFLOP/s per device}
    mfu_formula: Optional[dict] = None  # core.flops.FORMULAS, carried with the numbers
    peak_tflops: Optional[float] = None  # the cluster's explicit peak the MFU divides by
    breakdown: Optional[dict] = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        always = _BASE_FIELDS
        if self.wall_s is not None:  # launched: these say "none measured" as null
            always |= _LAUNCHED_FIELDS
            if self.status in ("ok", DIVERGED):
                always |= {"losses"}
            if self.status == DIVERGED:
                always |= {"diverged_step"}
        return _to_dict(self, always)

    @classmethod
    def from_dict(cls, data: dict) -> "TrialRecord":
        return _from_dict(cls, data)

    def rank_records(self) -> list[RankRecord]:
        return [RankRecord.from_dict(r) for r in self.ranks or [] if isinstance(r, dict)]


def write_text_atomic(path, text: str) -> None:
    """Write `text` to `path` so a reader sees the old file or the whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path, obj, *, indent: int = 1, sort_keys: bool = False) -> None:
    """`obj` as JSON (non-JSON values as their str), written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str))


def read_json(path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def rank_path(trial_dir, rank: int) -> Path:
    return Path(trial_dir) / f"rank{rank}.json"


def result_path(trial_dir) -> Path:
    return Path(trial_dir) / RESULT_FILE
