"""What a sweep leaves behind when its launcher returns.

`SummaryCallback` runs it: Hydra calls the callback when the multirun ends
(`hydra.callbacks` in conf/config.yaml), so the sweeper never imports analysis.
It reads only the sweep directory, every trial's `result.json` included (the
sweeper records invalid and skipped layouts there before anything launches).

In the sweep directory: `results.csv` (every trial), `leaderboard.md` and
`leaderboard.json` (ranked, with a summary), `calibration.json` (the memory and
speed model refit on this cluster's measurements). On stdout: the leaderboard,
where measurement contradicted prediction, and the recommended layout.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from analysis.leaderboard import markdown, ranked
from analysis.ranking import quality_headline, quality_summary
from analysis.recommend import from_measured
from analysis.rerun import rerun_command
from analysis.results import load_records, to_row, write_csv
from core.records import write_json_atomic, write_text_atomic


def mismatches(rows: list[dict]) -> list[str]:
    """Trials whose outcome contradicts the memory prediction."""
    out = []
    for r in rows:
        if r["predicted_fits"] is None:
            continue
        if r["status"] == "oom" and r["predicted_fits"]:
            out.append(f"{r['trial']}: ran out of memory, predicted to fit ({r['predicted_memory_gb']:.1f} GiB)")
        if r["status"] == "skipped" and (r["reason"] or "").startswith("predicted OOM"):
            continue
        if r["status"] == "ok" and r["predicted_fits"] is False:
            out.append(f"{r['trial']}: fit ({r['peak_memory_gb']:.1f} GiB), predicted OOM "
                       f"({r['predicted_memory_gb']:.1f} GiB)")
    return out


def _calibrate(sweep_dir: Path) -> str | None:
    from core.config import cluster_from_dict, model_from_dict
    from sweeper.calibration import fit_calibration
    from sweeper.constants import save_calibration

    records = [r for r in load_records(sweep_dir) if r.get("status") in ("ok", "oom")]
    if not any(r["status"] == "ok" for r in records):
        return None
    model = model_from_dict(records[0]["model"])
    cluster = cluster_from_dict(records[0]["cluster"])
    same = [r for r in records if r["model"] == records[0]["model"]]
    path = sweep_dir / "calibration.json"
    # Whole records: the fit reads allocated, reserved and device-used memory per rank.
    save_calibration(fit_calibration(same, model, cluster), path)
    return str(path)


def headline(rows: list[dict]) -> dict:
    """The numbers a sweep is judged by: device, best and baseline MFU, small-micro-batch ratio.

    The baseline is megatron-core's stock local spec (attention=megatron, norm=megatron)
    at its best layout in the same sweep; mbs1_over_best is the best mbs-1 trial's MFU
    over the best trial's.
    """
    best = ranked(rows)
    stock = [r for r in best if r["attention"] == "megatron" and r["norm"] == "megatron"]
    mbs1 = [r for r in best if r["mbs"] == 1]
    top = best[0]["mfu_palm"] if best else None
    return {
        "device": next((r["device"] for r in best if r.get("device")), None),
        "baseline_trial": stock[0]["trial"] if stock else None,
        "baseline_mfu_palm": stock[0]["mfu_palm"] if stock else None,
        "best_mbs1_trial": mbs1[0]["trial"] if mbs1 else None,
        "mbs1_over_best": mbs1[0]["mfu_palm"] / top if mbs1 and top else None,
    }


def with_rerun(rows: list[dict], records: list[dict], warn=lambda line: print(line, file=sys.stderr)) -> list[dict]:
    """Each row with `command` (rerun exactly that trial: analysis.rerun) and `commit` (its spec's)."""
    commands = {}
    for record in records:
        try:
            commands[record["trial"]] = rerun_command(record)
        except Exception as exc:  # noqa: BLE001 - a preset gone since the sweep must not lose the leaderboard
            warn(f"warning: no rerun command for {record['trial']}: {type(exc).__name__}: {exc}")
    return [{**row, "command": commands.get(row["trial"]), "commit": row["git_commit"]} for row in rows]


def finish_sweep(sweep_dir: Path, echo=print) -> dict:
    sweep_dir = Path(sweep_dir)
    records = load_records(sweep_dir)
    rows = [to_row(r) for r in records]
    write_csv(rows, sweep_dir / "results.csv")
    rows = with_rerun(rows, records)
    write_text_atomic(sweep_dir / "leaderboard.md", markdown(rows, rerun=True) + "\n")
    best = ranked(rows)
    quality = quality_summary(records)
    summary = {
        "trials": len(rows),
        "ok": len(best),
        "best_trial": best[0]["trial"] if best else None,
        "best_mfu_palm": best[0]["mfu_palm"] if best else None,
        "best_mfu_megatron": best[0]["mfu_megatron"] if best else None,
        **headline(rows),
        # analysis.ranking: default constants on every trial, and refit on the first 3
        "prediction_quality": quality,
        **quality_headline(quality),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(sweep_dir / "leaderboard.json", {"summary": summary, "rows": rows})
    echo("")
    echo(markdown(rows, top=20, group_unlaunched=True))
    wrong = mismatches(rows)
    if wrong:
        echo("\nMeasurement contradicted the memory prediction:")
        for line in wrong:
            echo("  " + line)
    calibration = _calibrate(sweep_dir)
    if calibration:
        echo(f"\nCalibration refit from this sweep: {calibration}")
    if best:
        echo("")
        echo("\n".join(from_measured(sweep_dir, top=3)))
    from analysis.report import write_report

    try:
        report = write_report(sweep_dir)
        echo(f"\nResults: {sweep_dir}/results.csv, {sweep_dir}/leaderboard.md, report: {report}")
    except Exception as exc:  # noqa: BLE001 - a plotting failure must not hide the results
        echo(f"\nResults: {sweep_dir}/results.csv, {sweep_dir}/leaderboard.md (report failed: {exc})")
    return summary


class SummaryCallback(Callback):
    """The end of a multirun: the leaderboard, the recommendation and the report of its sweep directory.

    A dry run launched nothing and a failed plan exits before Hydra gets here; the
    sweep lock is taken again so a second driver cannot write the directory meanwhile.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from sweeper.lock import LockHeld, SweepLock

        sweep_dir = Path(config.hydra.sweep.dir)
        if config.sweep.dry_run or not sweep_dir.is_dir():
            return
        try:
            with SweepLock(sweep_dir):
                finish_sweep(sweep_dir)
        except LockHeld as exc:
            print(f"no summary written: {exc}", file=sys.stderr)

