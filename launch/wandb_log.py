"""Log a finished trial to wandb: its config, per-step metrics and summary.

Off unless `trial.wandb=true`; offline by default (`trial.wandb_mode=offline`),
so no network is needed: the run lands in `<trial_dir>/wandb/` and can be
uploaded later with `wandb sync`.
"""

from __future__ import annotations

import os


def log_trial(record: dict, *, trial_dir: str, project: str, mode: str) -> str:
    """Returns the wandb run directory."""
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    config = {k: record.get(k) for k in ("model", "cluster", "layout", "trial_config", "world_size", "dp")}
    run = wandb.init(project=project, mode=mode, dir=trial_dir, name=record["trial"],
                     config=config, reinit=True)
    try:
        for step, seconds in enumerate(record.get("step_times_s") or []):
            metrics = {"step_time_s": seconds}
            losses = record.get("losses") or []
            if step < len(losses):
                metrics["loss"] = losses[step]
            run.log(metrics, step=step)
        summary = {"status": record["status"], "reason": record.get("reason") or ""}
        for key in ("step_time_s", "tokens_per_s", "peak_memory_gb_max"):
            if record.get(key) is not None:
                summary[key] = record[key]
        for convention, value in (record.get("mfu") or {}).items():
            summary[f"mfu_{convention}"] = value
        run.summary.update(summary)
        return run.dir
    finally:
        run.finish()
