"""How well the memory and speed models predicted a sweep's measured trials.

    q = prediction_quality(records)                 # default constants, no refit
    q = prediction_quality(records, refit_first=3)  # refit on the first 3 trials, scored on the rest
    both = quality_summary(records)                 # {"default": q0, "refit_first_3": q3}

Conventions (every figure is a fraction, not a percent):
- memory error: |predicted - measured| / measured of the peak the allocator reserved
  (`torch.cuda.max_memory_reserved`, max over ranks), predicted as
  `MemoryEstimate.reserved_gb` (a CPU trial: its peak RSS against `peak_gb`); `memory_allocated_median_abs_err` does the same for
  `max_memory_allocated` against `MemoryEstimate.allocated_gb`.
- step time error: |predicted - measured| / measured, measured = the record's median step.
- ranking: Kendall tau-b and Spearman (average ranks for ties) of predicted vs measured
  PaLM MFU over the ok trials; top-k regret = 1 - (best measured MFU among the k layouts
  predicted best) / (best measured MFU): 0 when the predicted top-k holds the best.
- OOM classification: over ok and oom trials, the share whose predicted `fits` matched.
The trials' order is their launch order (`recorded_at`, then name): "first 3" are the
first 3 that finished, as a sweep that learns would have seen them.
"""

from __future__ import annotations

import json
import statistics
import tarfile
from pathlib import Path
from typing import Optional

from core.config import ConfigError, cluster_from_dict, layout_from_dict, model_from_dict
from sweeper.calibration import fit_calibration, measured_memory
from sweeper.constants import Calibration
from sweeper.memory import predict_memory
from sweeper.speed import predict_speed


def load_archived_records(path, sweep: Optional[str] = None) -> list[dict]:
    """Every trial's result.json inside a .tgz of sweep directories (benchmarks/results/*_trials.tgz);
    `sweep` keeps the members whose path contains it (e.g. "h100_single")."""
    records = []
    with tarfile.open(Path(path)) as archive:
        for member in archive.getmembers():
            if not member.name.endswith("/result.json") or (sweep and sweep not in member.name):
                continue
            try:
                records.append(json.loads(archive.extractfile(member).read()))
            except (AttributeError, ValueError):
                continue  # an unreadable member is reported by its absence
    return records


def launch_order(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: (str(r.get("recorded_at") or ""), str(r.get("trial") or "")))


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> Optional[float]:
    """Pearson correlation of the ranks; None below 2 points or for a constant series."""
    if len(x) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / (sxx * syy) ** 0.5 if sxx and syy else None


def kendall_tau(x: list[float], y: list[float]) -> Optional[float]:
    """Kendall's tau-b (ties in either series shrink the denominator)."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    n0 = concordant + discordant
    denominator = ((n0 + ties_x) * (n0 + ties_y)) ** 0.5
    return (concordant - discordant) / denominator if denominator else None


def top_k_regret(predicted: list[float], measured: list[float], k: int) -> Optional[float]:
    if not measured:
        return None
    best = max(measured)
    picked = sorted(range(len(predicted)), key=lambda i: -predicted[i])[:k]
    return 1.0 - max(measured[i] for i in picked) / best if best > 0 else None


def _median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def _predict(record: dict, calibration: Optional[Calibration]):
    model = model_from_dict(record["model"])
    cluster = cluster_from_dict(record["cluster"])
    layout = layout_from_dict(record["layout"])
    dp = record.get("dp")
    dp = dp if isinstance(dp, int) and dp > 0 else None
    return (predict_memory(model, cluster, layout, calibration, dp=dp),
            predict_speed(model, cluster, layout, calibration, dp=dp))


def score(records: list[dict], calibration: Optional[Calibration] = None) -> dict:
    """The quality figures of `calibration` (None: the presets' defaults) on these records."""
    mem_err, alloc_err, time_err, pred_mfu, meas_mfu, outcomes = [], [], [], [], [], []
    skipped = 0
    for r in records:
        if r.get("status") not in ("ok", "oom"):
            continue
        try:
            memory, speed = _predict(r, calibration)
        except (ConfigError, KeyError, TypeError, ValueError):
            skipped += 1  # a record of another version's schema: not scored, counted
            continue
        outcomes.append(memory.fits == (r["status"] == "ok"))
        if r["status"] != "ok":
            continue
        allocated, reserved, _ = measured_memory(r)
        # A CPU trial's peak is its RSS: everything, so the whole predicted peak.
        predicted = memory.peak_gb if (r.get("cluster") or {}).get("device") == "cpu" else memory.reserved_gb
        if reserved:
            mem_err.append(abs(predicted - reserved) / reserved)
        if allocated:
            alloc_err.append(abs(memory.allocated_gb - allocated) / allocated)
        step = r.get("step_time_s")
        if isinstance(step, (int, float)) and step > 0:
            time_err.append(abs(speed.step_time_s - step) / step)
        mfu = (r.get("mfu") or {}).get("palm")
        if isinstance(mfu, (int, float)):
            pred_mfu.append(speed.mfu)
            meas_mfu.append(mfu)
    return {
        "trials": len(outcomes),
        "ranked": len(meas_mfu),
        "unscored": skipped,
        "memory_median_abs_err": _median(mem_err),
        "memory_max_abs_err": max(mem_err, default=None),
        "memory_allocated_median_abs_err": _median(alloc_err),
        "step_time_median_abs_err": _median(time_err),
        "step_time_max_abs_err": max(time_err, default=None),
        "kendall_tau": kendall_tau(pred_mfu, meas_mfu),
        "spearman": spearman(pred_mfu, meas_mfu),
        "top1_regret": top_k_regret(pred_mfu, meas_mfu, 1),
        "top5_regret": top_k_regret(pred_mfu, meas_mfu, 5),
        "oom_accuracy": sum(outcomes) / len(outcomes) if outcomes else None,
    }


def refit(records: list[dict], base: Optional[Calibration] = None) -> Optional[Calibration]:
    """The constants refitted on these records (one model and cluster: the first's)."""
    usable = [r for r in records if r.get("status") in ("ok", "oom") and r.get("model")]
    if not usable:
        return None
    model = model_from_dict(usable[0]["model"])
    cluster = cluster_from_dict(usable[0]["cluster"])
    return fit_calibration(usable, model, cluster, base)


def prediction_quality(records: list[dict], *, refit_first: int = 0,
                       calibration: Optional[Calibration] = None) -> dict:
    """Quality of the predictions for these records' layouts.

    refit_first=0: `calibration` (None: the cluster preset's defaults) on every record.
    refit_first=n: refit on the first n finished trials (launch order), then score the
    remaining ones only, so no trial is scored by constants fitted to it.
    """
    ordered = launch_order([r for r in records if r.get("status") in ("ok", "oom")])
    if refit_first <= 0:
        return score(ordered, calibration)
    seen, rest = ordered[:refit_first], ordered[refit_first:]
    try:
        fitted = refit(seen, calibration)
    except (ConfigError, KeyError, TypeError, ValueError):
        fitted = calibration  # records this version cannot read: scored unrefitted, and said so
        seen = []
    out = score(rest, fitted)
    out["refit_on"] = [r.get("trial") for r in seen]
    return out


def quality_summary(records: list[dict], refit_first: int = 3) -> dict:
    """Default constants on every trial, and the refit on the first `refit_first`."""
    return {"default": prediction_quality(records),
            f"refit_first_{refit_first}": prediction_quality(records, refit_first=refit_first)}


HEADLINE = ("memory_median_abs_err", "step_time_median_abs_err", "kendall_tau", "spearman",
            "top1_regret", "top5_regret")


def quality_headline(summary: dict) -> dict:
    """The issue's figures as flat keys: the default constants', then `<key>_refit` for the
    refit's (memory and step time)."""
    default = summary.get("default") or {}
    refit = next((v for k, v in summary.items() if k.startswith("refit_first_")), {})
    out = {key: default.get(key) for key in HEADLINE}
    out.update({f"{key}_refit": refit.get(key) for key in HEADLINE[:2]})
    return out


QUALITY_ROWS = (("memory_median_abs_err", "peak memory (reserved), median abs. error"),
                ("memory_allocated_median_abs_err", "peak memory (allocated), median abs. error"),
                ("step_time_median_abs_err", "step time, median abs. error"),
                ("step_time_max_abs_err", "step time, largest abs. error"),
                ("kendall_tau", "Kendall tau, predicted vs measured MFU"),
                ("spearman", "Spearman, predicted vs measured MFU"),
                ("top1_regret", "top-1 regret (MFU lost by running the predicted best)"),
                ("top5_regret", "top-5 regret"),
                ("oom_accuracy", "OOM-or-fit classified right"))


def quality_markdown(summary: dict) -> list[str]:
    """The quality_summary as a markdown table, one column per calibration."""
    columns = list(summary)
    lines = ["| figure | " + " | ".join(c.replace("_", " ") for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for key, label in QUALITY_ROWS:
        cells = [summary[c].get(key) for c in columns]
        lines.append(f"| {label} | " + " | ".join("" if v is None else f"{v:.3f}" for v in cells) + " |")
    counts = ", ".join(f"{c.replace('_', ' ')}: {summary[c].get('trials')} trials" for c in columns)
    return lines + ["", f"Scored on {counts} (the refit column scores only trials it was not fitted on)."]
