"""The sweep command: `layout-sweep [overrides]` (or `python -m launch.main`).

Hydra runs it as a multirun: the layout sweeper (sweeper.hydra_sweeper) plans
the trials, the configured launcher starts them, and `trial` below runs once
per trial (once per SLURM task under submitit). Bad input is caught before
Hydra composes anything and reported in one line.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from launch.cli_checks import CONF_DIR, check_arguments
from launch.record import base_record, classify, read_json, result_path, write_json_atomic
from launch.spec import TrialSpec, git_commit
from launch.trial import in_submitit_task, run_local, run_task
from sweeper.config import (
    cluster_from_dict,
    layout_from_dict,
    model_from_dict,
    register_configs,
    trial_from_dict,
)

register_configs()


def spec_from_config(cfg: DictConfig, trial_dir: str) -> TrialSpec:
    plain = OmegaConf.to_container(cfg, resolve=True)
    return TrialSpec(
        model=model_from_dict(plain["model"]),
        cluster=cluster_from_dict(plain["cluster"]),
        layout=layout_from_dict(plain["layout"]),
        trial=trial_from_dict(plain["trial"]),
        trial_dir=trial_dir,
        git_commit=git_commit(),
        prediction=read_json(f"{trial_dir}/prediction.json"),
    )


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def trial(cfg: DictConfig) -> dict:
    """One trial. Never raises: whatever happens ends as the trial's record."""
    trial_dir = HydraConfig.get().runtime.output_dir
    spec = None
    try:
        spec = spec_from_config(cfg, trial_dir)
        return run_task(spec) if in_submitit_task() else run_local(spec)
    except Exception as exc:  # noqa: BLE001 - ConfigError included
        if spec is None:
            return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
        record = base_record(spec, classify(exc), f"{type(exc).__name__}: {exc}")
        write_json_atomic(result_path(trial_dir), record)
        return record


def cli() -> None:
    problem = check_arguments(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    trial()


if __name__ == "__main__":
    cli()
