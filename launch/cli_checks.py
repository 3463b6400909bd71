"""Check the sweep command's arguments before Hydra composes anything.

Hydra reports bad input as a multi-line report; a user gets one line here
instead: an unknown preset, a malformed override, an unknown field, a value of
the wrong type (`layout.mbs=abc`, `layout.tp=1.5`, `layout.tp=`), a number that
is not finite, a size that is zero or negative, a name that is not a plain name.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from core.config import ClusterConfig, ConfigError, Layout, ModelConfig, SweepConfig, TrialConfig, check_value
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


def _type_problem(cls, name: str, key: str, value) -> Optional[str]:
    """The dataclass's own check (core.config.check_value), as a line."""
    try:
        check_value(cls, name, value, key)
    except ConfigError as exc:
        return str(exc)
    return None


def _check_field(key: str, values: list) -> Optional[str]:
    section, _, name = key.partition(".")
    fields = {f.name: f for f in dataclasses.fields(SCHEMAS[section])}
    if name not in fields:
        return f"unknown field {key} (known: {', '.join(fields)})"
    for value in values:
        problem = (_type_problem(SCHEMAS[section], name, key, value)
                   or (name_problem(key, value) if key in PATH_NAMES else None))
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
        elif key in SCHEMAS:  # the schema's defaults are untyped (core.config.register_configs)
            return f"{key} is a section, not a value: set its fields ({key}.FIELD=VALUE), got {key}={values[0]!r}"
        elif key.split(".")[0] in SCHEMAS and "." in key:
            problem = _check_field(key, values)
            if problem:
                return problem
    return None
