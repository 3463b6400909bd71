"""The Hydra sweeper: plain cartesian multirun, minus the layouts that must not launch.

`hydra/sweeper=layout` (the default in conf/config.yaml) expands the axes like
Hydra's basic sweeper, then classifies every point (`sweeper.plan`), records
the invalid and skipped ones with their reason, skips trials an earlier run of
the same sweep directory finished, and hands the rest to whatever launcher is
configured (local, submitit_local, submitit_slurm), best predicted first.
Every trial's `spec.json` is written here before its job starts (sweeper.launching).
When the launcher returns, Hydra calls the multirun callback of conf/config.yaml
(`analysis.summary.SummaryCallback`), which writes the leaderboard and the
recommendation from the sweep directory: nothing here imports analysis.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from core.config import (
    ConfigError,
    cluster_from_dict,
    layout_from_dict,
    model_from_dict,
    sweep_from_dict,
    trial_from_dict,
)
from core.paths import git_commit
from core.records import result_path, write_json_atomic
from launch.capacity import check_capacity, check_names, check_trial_name
from launch.record import base_record
from sweeper.launching import launch_blocking, launch_slurm, set_aside_previous, spec_of
from sweeper.lock import LockHeld, SweepLock
from sweeper.plan import Point, classify, launch_lines, order, summary_lines
from sweeper.progress import Progress


def fail(message: str) -> None:
    """One line on stderr and a non-zero exit; Hydra would print a traceback-style report."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def _launcher_kind(config: DictConfig) -> str:
    target = str(config.hydra.launcher.get("_target_", ""))
    if target.endswith("SlurmLauncher"):
        return "slurm"
    if "submitit" in target:
        return "submitit_local"
    return "local"


def check_slurm() -> None:
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        fail("SLURM not reachable: sbatch/squeue not found on PATH (hydra/launcher=submitit_slurm needs a SLURM login node)")
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        fail("SLURM not reachable: squeue did not answer within 20 s")
    if out.returncode != 0:
        first = (out.stderr.strip().splitlines() or ["no output"])[0]
        fail(f"SLURM not reachable: squeue failed: {first}")


class _OnlyOnce(logging.Filter):
    """Without accounting, submitit warns about sacct on every poll: say it once."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.seen = text, False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in record.getMessage():
            return True
        if self.seen:
            return False
        self.seen = True
        return True


class LayoutSweeperImpl(Sweeper):
    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[dict] = None,
                 grids: Optional[list] = None):
        super().__init__()
        self.max_batch_size = max_batch_size
        self.params = dict(params or {})
        self.grids = [dict(grid) for grid in (grids or [])]
        self.config: Optional[DictConfig] = None
        self.hydra_context = None
        self.launcher = None
        self.task_function = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config
        kind = _launcher_kind(config)
        if kind == "slurm":
            check_slurm()
            logging.getLogger("submitit").addFilter(_OnlyOnce("Bypassing sacct error"))
        if kind != "local":
            self._fit_submitit_to_cluster(config)
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    @staticmethod
    def _fit_submitit_to_cluster(config: DictConfig) -> None:
        """One SLURM task per rank: the job's shape comes from the cluster preset."""
        try:
            cluster = cluster_from_dict(_plain(config.cluster))
        except ConfigError as exc:
            fail(str(exc))
        launcher = config.hydra.launcher
        with read_write(config.hydra), open_dict(launcher):
            if launcher.tasks_per_node == 1 and launcher.nodes == 1:
                launcher.tasks_per_node = cluster.gpus_per_node
                launcher.nodes = cluster.nodes
            elif launcher.tasks_per_node * launcher.nodes != cluster.world_size:
                fail(f"hydra.launcher sets {launcher.nodes} node(s) x {launcher.tasks_per_node} tasks, "
                     f"but cluster {cluster.name} has {cluster.world_size} ranks")
            if cluster.device == "cuda" and launcher.get("gpus_per_node") is None:
                launcher.gpus_per_node = cluster.gpus_per_node
            if launcher.get("cpus_per_task") is None:
                launcher.cpus_per_task = 1
            launcher.timeout_min = cluster.time_limit_min
            if _launcher_kind(config) == "slurm":
                from launch.slurm_jobs import JOB_NAME, signal_delay_s

                launcher.name = JOB_NAME  # scripts/slurm_down.sh cancels jobs of this name only
                launcher.signal_delay_s = signal_delay_s(cluster.time_limit_min)
            for key in ("partition", "account"):
                if key in launcher and launcher.get(key) is None and getattr(cluster, key):
                    launcher[key] = getattr(cluster, key)

    # -- expansion -----------------------------------------------------------------

    def _combinations(self, arguments: List[str]) -> list[list[str]]:
        """The cartesian product of the axes, for the main grid and each extra grid.

        An extra grid is the main grid's axes with its own replacing some; axes given on
        the command line apply to every grid and replace the preset's.
        """
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        combos = []
        for grid in [{}, *self.grids]:
            axes = {**self.params, **{str(k): str(v) for k, v in grid.items()}}
            strings = [f"{k}={v}" for k, v in axes.items()] + list(arguments)
            overrides = parser.parse_overrides(strings)
            combos.extend(BasicSweeper.split_arguments(overrides, None)[0])
        return combos

    def _points(self, combos: list[list[str]]) -> list[Point]:
        composed: dict[tuple, DictConfig] = {}
        points = []
        for combo in combos:
            layout_ovs = [o for o in combo if o.startswith("layout.")]
            rest = tuple(o for o in combo if not o.startswith("layout."))
            if rest not in composed:
                composed[rest] = self.hydra_context.config_loader.load_sweep_config(self.config, list(rest))
            cfg = composed[rest]
            layout = OmegaConf.merge(_plain(cfg.layout), OmegaConf.from_dotlist([o[len("layout."):] for o in layout_ovs]))
            points.append(Point(
                model=model_from_dict(_plain(cfg.model)),
                cluster=cluster_from_dict(_plain(cfg.cluster)),
                layout=layout_from_dict(OmegaConf.to_container(layout)),
                trial=trial_from_dict(_plain(cfg.trial)),
                overrides=list(combo),
            ))
        return points

    # -- the sweep -----------------------------------------------------------------

    def sweep(self, arguments: List[str]) -> Any:
        try:
            return self._sweep(arguments)
        except (ConfigError, LockHeld) as exc:
            fail(str(exc))
        except OSError as exc:  # a read-only or full sweep directory, a vanished mount
            where = f": {exc.filename}" if exc.filename else ""
            fail(f"cannot write the sweep ({exc.strerror or exc}){where}")

    def _sweep(self, arguments: List[str]) -> Any:
        sweep_cfg = sweep_from_dict(_plain(self.config.sweep))
        check_names({k: _plain(self.config[k]) for k in ("sweep", "model", "cluster")})
        sweep_dir = Path(self.config.hydra.sweep.dir)
        points = self._points(self._combinations(arguments))
        seen = OrderedDict((p.name, p) for p in points)  # an axis repeated twice adds nothing
        points = list(seen.values())
        for point in points:
            check_trial_name(point.name)
        kind = _launcher_kind(self.config)
        if not sweep_cfg.dry_run:  # a dry run may plan for a cluster this machine cannot reach
            shapes = {(p.cluster.nodes, p.cluster.gpus_per_node, p.cluster.partition): p.cluster for p in points}
            for cluster in shapes.values():
                check_capacity(kind, cluster)
        calibration = self._calibration(sweep_cfg, sweep_dir)
        for point in points:
            classify(point, sweep=sweep_cfg, sweep_dir=sweep_dir, calibration=calibration)
        if sweep_cfg.max_trials is not None and sweep_cfg.max_trials <= 0:
            fail(f"sweep.max_trials must be positive, got {sweep_cfg.max_trials}")
        launch = order(points, sweep_cfg.max_trials)
        if not launch and not any(p.status == "done" for p in points):
            reasons = [p.reason for p in points if p.reason]
            fail(f"empty search space: none of {len(points)} layouts can run"
                 + (f" (first reason: {reasons[0]})" if reasons else ""))
        if _launcher_kind(self.config) != "local" and len({p.cluster.world_size for p in launch}) > 1:
            fail("a submitit launcher gives every trial the same number of tasks: sweep one cluster size at a time")

        damaged = [p for p in points if p.damaged]
        if sweep_cfg.dry_run:
            for point in damaged:
                print(f"damaged record {result_path(sweep_dir / point.name)}: {point.damaged} "
                      "(would be set aside and the trial run again)")
            for line in summary_lines(points) + [f"would launch {len(launch)} trials:"] + launch_lines(launch):
                print(line)
            return []
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with SweepLock(sweep_dir):
            return self._run(points, launch, sweep_cfg, sweep_dir, kind)

    def _run(self, points: list[Point], launch: list[Point], sweep_cfg, sweep_dir: Path, kind: str) -> Any:
        """Everything that writes into the sweep directory, under its lock (the summary comes after)."""
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        commit = git_commit()
        set_aside_previous(points, sweep_dir)
        for line in summary_lines(points):
            print(line)
        self._record_unlaunched(points, sweep_dir, commit)
        print(f"launching {len(launch)} trials into {sweep_dir} (launcher: {kind})")

        returns = []
        batch_size = self.max_batch_size or max(1, len(launch))
        with Progress(sweep_dir, [p.name for p in launch], interval_s=sweep_cfg.progress_interval_s):
            if kind == "slurm" and launch:
                launch_slurm(self.launcher, launch, sweep_cfg, sweep_dir, commit, batch_size)
            elif sweep_cfg.learn and launch:  # sweeper.learning: refit after every trial
                from sweeper.learning import launch_learning

                returns = launch_learning(
                    lambda batch: launch_blocking(self.launcher, batch, sweep_dir, commit, len(batch)),
                    launch, sweep_dir, commit, calibration=self._calibration(sweep_cfg, sweep_dir),
                    size=self.max_batch_size or 1)
            else:
                returns = launch_blocking(self.launcher, launch, sweep_dir, commit, batch_size)
        return returns

    def _calibration(self, sweep_cfg, sweep_dir: Path):
        from sweeper.constants import load_calibration

        for path in (sweep_cfg.calibration, sweep_dir / "calibration.json"):
            if path and Path(path).exists():
                print(f"using calibration {path}")
                return load_calibration(path)
        return None

    def _record_unlaunched(self, points: list[Point], sweep_dir: Path, commit) -> None:
        for point in points:
            if point.status in ("invalid", "skipped"):
                record = base_record(spec_of(point, sweep_dir, commit), point.status, point.reason)
                write_json_atomic(result_path(sweep_dir / point.name), record)
