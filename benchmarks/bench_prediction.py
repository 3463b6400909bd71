"""How well the memory and speed models predict recorded GPU sweeps, before and after a refit.

    python -m benchmarks.bench_prediction [--sweep DIR_OR_TGZ ...] [--out benchmarks/results/prediction_quality_DATE.json]

CPU only: it reads trial records, it runs nothing. By default it scores the H100
sweeps archived in benchmarks/results/*_trials.tgz and any H200 archive there
(`*h200*_trials.tgz`); `--sweep` adds sweep directories or archives (e.g. the H200
re-run). Per data set: analysis.ranking.quality_summary, i.e. the default constants
of the cluster's preset on every trial, and a refit on the first 3 trials (launch
order) scored on the others, with the issue's targets and whether each is met.
Conventions: errors are fractions of the measured value (memory: max_memory_reserved,
max over ranks; step time: the median measured step); regret is a fraction of the
best measured PaLM MFU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from analysis.ranking import load_archived_records, quality_summary
from analysis.results import load_records
from core.paths import REPO_ROOT

RESULTS = REPO_ROOT / "benchmarks" / "results"
# The targets: default constants, then after refitting on 3 trials.
TARGETS = {"default": {"memory_median_abs_err": 0.03, "step_time_median_abs_err": 0.10,
                       "kendall_tau": 0.8, "top1_regret": 0.0},
           "refit_first_3": {"memory_median_abs_err": 0.02, "step_time_median_abs_err": 0.05}}


def _met(quality: dict) -> dict:
    out = {}
    for column, targets in TARGETS.items():
        for key, target in targets.items():
            value = quality[column].get(key)
            better_high = key == "kendall_tau"
            out[f"{column}.{key}"] = None if value is None else (
                value >= target if better_high else value <= target + 1e-12)
    return out


def data_sets(extra: list[Path]) -> dict[str, list[dict]]:
    """name -> ok/oom records, one name per (archive or directory, sweep name)."""
    sources = sorted(RESULTS.glob("*_trials.tgz")) + extra
    out: dict[str, list[dict]] = {}
    for path in sources:
        records = load_archived_records(path) if path.is_file() else load_records(path)
        for record in records:
            if record.get("status") not in ("ok", "oom"):
                continue
            name = f"{path.name}:{(record.get('model') or {}).get('name')}-{(record.get('cluster') or {}).get('name')}"
            out.setdefault(name, []).append(record)
    return out


def describe(records: list[dict]) -> dict:
    devices = Counter((r.get("env") or {}).get("device") for r in records)
    dates = sorted({str(r.get("recorded_at") or "")[:10] for r in records})
    return {"device": devices.most_common(1)[0][0], "dates": dates, "trials": len(records),
            "statuses": dict(Counter(r["status"] for r in records))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, action="append", default=[],
                        help="a sweep directory or a *_trials.tgz (repeatable)")
    parser.add_argument("--out", type=Path, help="JSON to write (default: benchmarks/results/prediction_quality_<date>.json)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.sweep if not p.exists()]
    if missing:
        print(f"error: no such sweep: {', '.join(missing)}", file=sys.stderr)
        return 2
    summary = {}
    for name, records in data_sets(args.sweep).items():
        if len(records) < 4:
            continue  # too few to refit on 3 and score one
        quality = quality_summary(records)
        source = next((str(p) for p in args.sweep if p.name == name.split(":")[0]), None)
        summary[name] = {**describe(records), **quality, "targets_met": _met(quality),
                         **({"source": source} if source else {})}
    out = args.out or RESULTS / f"prediction_quality_{time.strftime('%Y-%m-%d')}.json"
    payload = {"summary": summary, "targets": TARGETS, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "note": "default = the cluster preset's constants (sweeper.constants.PRESETS), no refit; "
                       "refit_first_3 = fitted on the first 3 finished trials, scored on the rest"}
    out.write_text(json.dumps(payload, indent=1) + "\n")
    for name, q in summary.items():
        d, r = q["default"], q["refit_first_3"]
        print(f"{name} ({q['device']}, {', '.join(q['dates'])}, {q['trials']} trials): "
              f"memory {d['memory_median_abs_err']:.3f} -> {r['memory_median_abs_err']:.3f}, "
              f"step {d['step_time_median_abs_err']:.3f} -> {r['step_time_median_abs_err']:.3f}, "
              f"tau {d['kendall_tau']:.3f}, spearman {d['spearman']:.3f}, top-1 regret {d['top1_regret']:.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
