"""The command that reruns one recorded trial exactly: `layout-sweep` and overrides built from its spec.

    rerun_overrides(record)  # ["model=tiny", "cluster=local_cpu", "layout.tp=2", ...]
    rerun_command(record)    # "layout-sweep model=tiny cluster=local_cpu layout.tp=2 ..."

A record carries the trial's spec (model, cluster, layout, trial settings, commit).
The overrides name the model and cluster presets, then every field whose value
differs from what conf/ composes to with those presets, and every layout axis the
default sweep preset sweeps, so the rerun is this one trial and not that preset's
grid. `sweep.name=rerun` keeps it out of the original sweep directory, where the
trial would be found done and skipped. Leaderboard rows carry this command
(analysis.summary); tests/analysis/test_rerun.py composes it back through conf/.
"""

from __future__ import annotations

import re
from functools import lru_cache

from omegaconf import OmegaConf

from core.paths import CONF_DIR

COMMAND = "layout-sweep"
RERUN_SWEEP_NAME = "rerun"
# The record's key for each config section the overrides rebuild.
SECTIONS = {"model": "model", "cluster": "cluster", "layout": "layout", "trial": "trial_config"}
# A string Hydra reads back as that string without quotes (no spaces, brackets, commas, '=').
_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_.+-]*")
_KEYWORDS = {"true", "false", "null", "inf", "nan"}  # what Hydra reads as a bool, None or float


def presets(group: str) -> set[str]:
    return {p.stem for p in (CONF_DIR / group).glob("*.yaml")}


@lru_cache(maxsize=16)
def _composed(groups: tuple[str, ...]) -> tuple[dict, tuple[str, ...]]:
    """conf/ composed with these group overrides: the sections, and the layout axes the sweep preset sweeps.

    Hydra's config loader directly, not `hydra.compose`: this also runs inside a
    sweep (the summary callback), where Hydra's global state is already set up.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.types import RunMode

    from core.config import register_configs

    register_configs()
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    cfg = loader.load_configuration(config_name="config", overrides=list(groups), run_mode=RunMode.MULTIRUN)
    sections = {name: OmegaConf.to_container(cfg[name], resolve=True) for name in SECTIONS}
    sweeper = cfg.hydra.sweeper
    axes = set((sweeper.get("params") or {}).keys())
    for grid in sweeper.get("grids") or []:
        axes |= set(grid.keys())
    return sections, tuple(sorted(a for a in axes if a.startswith("layout.")))


def value_text(value) -> str:
    """One value as a Hydra override writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _BARE.fullmatch(text) and text.lower() not in _KEYWORDS:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def rerun_overrides(record: dict) -> list[str]:
    """The overrides that compose to this record's model, cluster, layout and trial settings."""
    groups = [f"{group}={record[group]['name']}" for group in ("model", "cluster")
              if record.get(group, {}).get("name") in presets(group)]
    base, swept = _composed(tuple(groups))
    out = list(groups)
    for section, key in SECTIONS.items():
        for name, value in (record.get(key) or {}).items():
            if name not in base[section]:
                continue  # a field this version of the schema no longer has
            if value != base[section][name] or f"{section}.{name}" in swept:
                out.append(f"{section}.{name}={value_text(value)}")
    return out + [f"sweep.name={RERUN_SWEEP_NAME}"]


def rerun_command(record: dict) -> str:
    return " ".join([COMMAND, *rerun_overrides(record)])


def short_commit(commit) -> str:
    """The hash's first 7 characters, "-dirty" kept: the tree had uncommitted changes."""
    if not commit:
        return "unknown"
    head, dirty, _ = str(commit).partition("-dirty")
    return head[:7] + ("-dirty" if dirty else "")
