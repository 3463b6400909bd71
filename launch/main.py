"""The sweep command: `layout-sweep [overrides]` (or `python -m launch.main`).

Hydra runs it as a multirun: the layout sweeper (sweeper.hydra_sweeper) plans
the trials and writes each one's spec.json, the configured launcher starts them,
and `trial` below runs once per trial (once per SLURM task under submitit), from
that spec. When the launcher returns, Hydra calls the summary callback
(analysis.summary.SummaryCallback). The sweeper and the callback come in through
conf/config.yaml (`hydra/sweeper: layout`, `hydra.callbacks`), not through imports,
so this module imports nothing above launch. Bad input is caught before Hydra
composes anything and reported in one line. Ctrl-C or SIGTERM stops the running
trial's ranks, records it `interrupted`, prints one line and exits 130; running
the same command again resumes.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from core.config import cluster_from_dict, layout_from_dict, model_from_dict, register_configs, trial_from_dict
from core.paths import CONF_DIR, git_commit
from core.records import result_path, write_json_atomic
from core.spec import SPEC_FILE, TrialSpec
from launch.cli_checks import check_arguments
from launch.record import base_record, classify
from launch.trial import in_submitit_task, run_local, run_task

register_configs()


def job_spec(cfg: DictConfig, trial_dir: str) -> TrialSpec:
    """The trial this job runs: the `spec.json` the sweeper wrote, else composed from `cfg`.

    The layout sweeper writes every trial's spec before its job starts
    (`launch.trial.prepare`), so Hydra's composition of the job's overrides is not read
    again. Without one (`hydra/sweeper=basic`, `hydra.mode=RUN`), this is the one place
    that turns a composed config into a spec, and the spec is saved for the ranks.
    """
    path = Path(trial_dir) / SPEC_FILE
    if path.exists():
        spec = TrialSpec.load(path)
        # The record names the tree as this job found it: the code its ranks import, which
        # may be newer than the tree the sweep was planned from (spec.json keeps that one).
        spec.git_commit = git_commit() or spec.git_commit
        return spec
    plain = OmegaConf.to_container(cfg, resolve=True)
    spec = TrialSpec(
        model=model_from_dict(plain["model"]),
        cluster=cluster_from_dict(plain["cluster"]),
        layout=layout_from_dict(plain["layout"]),
        trial=trial_from_dict(plain["trial"]),
        trial_dir=trial_dir,
        git_commit=git_commit(),
    )
    spec.save()
    return spec


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def trial(cfg: DictConfig) -> dict:
    """One trial. Never raises: whatever happens ends as the trial's record."""
    trial_dir = HydraConfig.get().runtime.output_dir
    spec = None
    try:
        spec = job_spec(cfg, trial_dir)
        return run_task(spec) if in_submitit_task() else run_local(spec)
    except KeyboardInterrupt:  # the driver was stopped: run_ranks has stopped the ranks
        if spec is not None:
            write_json_atomic(result_path(trial_dir), base_record(spec, "interrupted", "the sweep was interrupted"))
        raise
    except Exception as exc:  # noqa: BLE001 - ConfigError included
        if spec is None:
            return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
        status, reason = classify(exc), f"{type(exc).__name__}: {exc}"
        if type(exc).__name__ == "UncompletedJobError" and "timed-out" in str(exc):
            # submitit's handler for SLURM's warning signal: the job's time limit, not a crash
            status = "timeout"
            reason = (f"the SLURM time limit of {spec.cluster.time_limit_min} min (cluster.time_limit_min): "
                      f"its warning signal arrived while the trial ran ({exc})")
        record = base_record(spec, status, reason)
        write_json_atomic(result_path(trial_dir), record)
        return record


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM takes Ctrl-C's path: ranks stopped, records written


def cli() -> None:
    problem = check_arguments(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell may start us with it ignored
        signal.signal(signum, _interrupt)
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises instead of printing its multi-line report
    try:
        trial()
    except KeyboardInterrupt:
        print("interrupted: running trials stopped and recorded as interrupted; "
              "run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - Hydra's composition errors, anything the checks missed
        if wants_traceback:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)


def one_line(exc: BaseException) -> str:
    """Hydra's message in one line: its first line, its hint to drop a '+', the options it lists."""
    raw = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    parts = [raw[0].strip()]
    for i, line in enumerate(raw[1:], 1):
        if line.startswith("Either remove + prefix"):
            parts.append(line.strip())
        elif line.startswith("Available options"):
            options = []
            for option in raw[i + 1:]:
                if not option.startswith("\t"):
                    break
                options.append(option.strip())
            parts.append(f"available: {', '.join(options)}")
    return "; ".join(parts)


if __name__ == "__main__":
    cli()
