"""Checks made before a sweep writes anything: names that become paths, and whether the cluster can hold it.

- `sweep.name`, `model.name` and `cluster.name` become the sweep directory
  (`sweeps/<sweep.name>/<model.name>-<cluster.name>`): each must be a plain name,
  so `../../etc` cannot write outside `sweeps/` and `a/b` cannot nest folders.
- A job larger than the SLURM partition is accepted by sbatch and pends forever;
  the local launcher runs every rank on this one machine. Both are refused here.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Optional

from core.config import ClusterConfig, ConfigError

PATH_NAMES = ("sweep.name", "model.name", "cluster.name")
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
# More CPU ranks than this many per core is a typo, not a sweep (they would only thrash).
MAX_CPU_RANKS_PER_CORE = 8


def name_problem(key: str, value) -> Optional[str]:
    text = str(value)
    if _PLAIN.fullmatch(text) and ".." not in text:
        return None
    return (f"{key} must be a plain name (letters, digits, '.', '_', '+', '-'; no '/', no '..', "
            f"at most 100 characters), got {text!r}")


def check_names(config: dict) -> None:
    for key in PATH_NAMES:
        section, name = key.split(".")
        problem = name_problem(key, (config.get(section) or {}).get(name, ""))
        if problem:
            raise ConfigError(problem)


_TRIAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")


def check_trial_name(name: str) -> None:
    """A trial's folder is named after its layout, and string axes (attention=...) go into it."""
    if not _TRIAL_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"a layout value would make the trial folder {name!r}, which is not a plain name: "
                          "string axes (attention, norm, recompute, ...) take plain values")


def _sinfo(partition: Optional[str]) -> Optional[tuple[str, int, int]]:
    """(partition, nodes, CPUs per node) of the named or default partition; None if sinfo cannot say."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P|%D|%c"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        parts = line.strip().split("|")
        if len(parts) != 3:
            continue
        name = parts[0].rstrip("*")
        if (partition and name == partition) or (not partition and parts[0].endswith("*")):
            try:
                return name, int(parts[1]), int(parts[2].rstrip("+"))
            except ValueError:
                return None
    return None


def check_capacity(kind: str, cluster: ClusterConfig) -> None:
    """Refuse a trial shape the cluster can never run (it would pend or thrash forever)."""
    if kind == "slurm":
        info = _sinfo(cluster.partition)
        if info is None:
            return  # an unusual sinfo: sbatch will judge
        partition, nodes, cpus = info
        if cluster.nodes > nodes:
            raise ConfigError(f"cluster.nodes={cluster.nodes} but SLURM partition {partition} has {nodes} "
                              f"node(s): the jobs could never start")
        if cluster.device == "cpu" and cluster.gpus_per_node > cpus:
            raise ConfigError(f"cluster.gpus_per_node={cluster.gpus_per_node} CPU ranks per node, but the nodes "
                              f"of SLURM partition {partition} have {cpus} CPUs: the jobs could never start")
        return
    if cluster.nodes > 1:
        raise ConfigError(f"cluster.nodes={cluster.nodes}, but the {kind} launcher runs every rank on this "
                          "machine: use hydra/launcher=submitit_slurm for more than one node")
    cores = os.cpu_count() or 1
    if cluster.device == "cpu" and cluster.gpus_per_node > MAX_CPU_RANKS_PER_CORE * cores:
        raise ConfigError(f"cluster.gpus_per_node={cluster.gpus_per_node} CPU ranks on a machine of {cores} "
                          f"cores (at most {MAX_CPU_RANKS_PER_CORE} per core)")
