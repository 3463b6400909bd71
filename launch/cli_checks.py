"""Check the sweep command's arguments before Hydra composes anything.

Hydra reports bad input as a multi-line report; a user gets one line here
instead: an unknown preset, a malformed override, an unknown field, a value of
the wrong type (`layout.mbs=abc`, `layout.tp=1.5`, `layout.tp=`), a number that
is not finite, a size that is zero or negative, a name that is not a plain name.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from core.config import ClusterConfig, Layout, ModelConfig, SweepConfig, TrialConfig
from core.paths import CONF_DIR
from launch.capacity import PATH_NAMES, name_problem

GROUPS = ("model", "cluster", "sweep")
SCHEMAS = {"model": ModelConfig, "cluster": ClusterConfig, "layout": Layout, "trial": TrialConfig,
           "sweep": SweepConfig}
# What an override may start with: the schema's sections, the preset groups, Hydra's own, the site file.
TOP_LEVEL = ("model", "cluster", "layout", "trial", "sweep", "hydra", "local")
# Hydra's own flags that take a value.
# Numeric fields where zero means something (no warm-up); every other size must be positive.
ZERO_ALLOWED = {"trial.warmup_steps"}
VALUE_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
               "--experimental-rerun", "--package", "-p", "--info", "-i", "--cfg", "-c"}


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _overrides(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in VALUE_FLAGS:
            skip = True
        elif not arg.startswith("-"):
            out.append(arg)
    return out


def _values(override) -> list:
    if override.is_sweep_override():
        if not override.is_discrete_sweep():
            return []
        return list(override.sweep_iterator())
    return [override.value()]


def _field_type(cls, name: str):
    """The field's type, Optional[X] read as X."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _type_problem(key: str, kind, value) -> Optional[str]:
    if value is None:
        return None
    if kind is bool and not (isinstance(value, bool) or value in (0, 1)):
        return f"{key} must be true or false, got {value!r}"
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{key} must be an integer, got {value!r}"
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{key} must be a number, got {value!r}"
        if not math.isfinite(value):
            return f"{key} must be a finite number, got {value!r}"
    return None


def _check_field(key: str, values: list) -> Optional[str]:
    section, _, name = key.partition(".")
    fields = {f.name: f for f in dataclasses.fields(SCHEMAS[section])}
    if name not in fields:
        return f"unknown field {key} (known: {', '.join(fields)})"
    kind = _field_type(SCHEMAS[section], name)
    for value in values:
        problem = _type_problem(key, kind, value) or (name_problem(key, value) if key in PATH_NAMES else None)
        if problem:
            return problem
    default = getattr(SCHEMAS[section](), name)
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        for value in values:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if value < 0 or (value == 0 and key not in ZERO_ALLOWED):
                    return f"{key} must be positive, got {value}"
    return None


def check_arguments(argv: list[str]) -> Optional[str]:
    """The first problem with the command-line overrides, or None."""
    try:
        overrides = OverridesParser.create().parse_overrides(_overrides(argv))
    except HydraException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "cannot parse"
        return f"malformed override: {first}"
    for override in overrides:
        raw_key = override.get_key_element()
        key = raw_key.lstrip("+~")
        top = key.split(".")[0].split("/")[0]
        if not raw_key.startswith("+") and top not in TOP_LEVEL:
            return f"unknown config key {key!r} (known: {', '.join(TOP_LEVEL)})"
        values = _values(override)
        if key in GROUPS:
            known = presets(key)
            for value in values:
                if str(value) not in known:
                    return f"unknown {key} preset {value!r} (known: {', '.join(known)})"
        elif key.split(".")[0] in SCHEMAS and "." in key:
            problem = _check_field(key, values)
            if problem:
                return problem
    return None
