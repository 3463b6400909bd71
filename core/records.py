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
from dataclasses import dataclass
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
