"""Collect a sweep's records, failures included, into one flat table.

    rows = collect("sweeps/local_cpu/tiny-local_cpu")
    write_csv(rows, path)
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

from core.record_check import load_record
from core.records import PEAK_MEMORY_MAX, write_text_atomic
from core.spec import Prediction

COLUMNS = [
    "trial", "status", "reason", "tp", "pp", "vpp", "cp", "dp", "mbs", "gbs", "recompute",
    "sequence_parallel", "distributed_optimizer", "attention", "norm", "cuda_graph",
    "swiglu", "loss", "optimizer_step", "add_norm", "qkv_grad", "grad_buffer", "embedding_grad",
    "wgrad_defer", "step_time_s",
    "tokens_per_s", "tflops_per_gpu", "mfu_palm", "mfu_megatron", "peak_memory_gb",
    "predicted_memory_gb", "predicted_fits", "predicted_mfu", "predicted_step_time_s",
    "model", "cluster", "world_size", "device", "git_commit",
]
LAYOUT_COLUMNS = ["tp", "pp", "vpp", "cp", "mbs", "gbs", "recompute", "sequence_parallel",
                  "distributed_optimizer", "attention", "norm", "cuda_graph",
                  "swiglu", "loss", "optimizer_step", "add_norm", "qkv_grad", "grad_buffer",
                  "embedding_grad", "wgrad_defer"]


def load_records(sweep_dir, warn=lambda line: print(line, file=sys.stderr)) -> list[dict]:
    """Every trial record; a damaged one is skipped with one line (path, what is wrong), never fatal."""
    records = []
    for path in sorted(Path(sweep_dir).glob("*/result.json")):
        record, problem = load_record(path)
        if problem:
            warn(f"warning: skipping damaged record {path}: {problem}")
        elif record is not None:
            records.append(record)
    return records


def _predicted_memory(prediction: Prediction, record: dict) -> float:
    """Like for like: a GPU's measured peak is the allocator's reserved one (predicted since
    2026-12-01; older records predicted only the device peak); a CPU's is the RSS."""
    if (record.get("cluster") or {}).get("device") == "cuda" and prediction.reserved_gb is not None:
        return prediction.reserved_gb
    return prediction.peak_memory_gb


def to_row(record: dict) -> dict:
    layout = record.get("layout", {})
    # A record from load_records has a valid prediction or none (core.record_check).
    prediction = record.get("prediction")
    prediction = None if prediction is None else Prediction.from_dict(prediction)
    mfu = record.get("mfu") or {}
    row = {c: None for c in COLUMNS}
    row.update({k: layout.get(k) for k in LAYOUT_COLUMNS})
    row.update(
        trial=record.get("trial"),
        status=record.get("status"),
        reason=record.get("reason"),
        dp=record.get("dp"),
        step_time_s=record.get("step_time_s"),
        tokens_per_s=record.get("tokens_per_s"),
        tflops_per_gpu=(record.get("tflops_per_gpu") or {}).get("palm"),
        mfu_palm=mfu.get("palm"),
        mfu_megatron=mfu.get("megatron"),
        peak_memory_gb=record.get(PEAK_MEMORY_MAX),  # the trial's one peak: core.records.PEAK_MEMORY
        # like for like: a GPU's measured peak is the allocator's reserved one; a CPU's the RSS
        predicted_memory_gb=prediction and _predicted_memory(prediction, record),
        predicted_fits=prediction and prediction.fits,
        predicted_mfu=prediction and prediction.mfu,
        predicted_step_time_s=prediction and prediction.step_time_s,
        model=(record.get("model") or {}).get("name"),
        cluster=(record.get("cluster") or {}).get("name"),
        world_size=record.get("world_size"),
        device=(record.get("env") or {}).get("device"),
        git_commit=record.get("git_commit"),
    )
    return row


def collect(sweep_dir) -> list[dict]:
    return [to_row(r) for r in load_records(sweep_dir)]


def write_csv(rows: list[dict], path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())
