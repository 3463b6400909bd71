"""Read a trial's `result.json` and say what is wrong with it, if anything.

A record is trusted only if it parses as a record: a JSON object of the current
schema with a known status, every field core.records.TrialRecord has no default for
(of its annotated type), a layout of positive integer degrees, and no prediction or one
that loads as a core.spec.Prediction. Anything else (a crash mid-edit, a hand edit, a
file from another tool) is damaged: the sweep reports it in one line, sets it aside and
runs the trial again; the analysis tools skip it with the same one line.

    record, problem = load_record(path)   # exactly one of them is None (both if no file)
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from pathlib import Path
from typing import Optional

from core.config import ConfigError
from core.records import SCHEMA_VERSION, STATUSES, TrialRecord
from core.spec import Prediction


def _kind(annotation) -> tuple:
    """The JSON types a field of this annotation may hold: Optional[X] as X, float also as
    an int (JSON writes 2.0 as 2), list[...] / dict[...] as list / dict."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        annotation = args[0]
    annotation = typing.get_origin(annotation) or annotation
    return (int, float) if annotation is float else (annotation,)


def required_fields(record_type) -> dict:
    """Name -> JSON types of every field `record_type` has no default for: what every record
    holds, launched or not. Which fields are optional is explicit in the type: those with a
    default (None; `schema`, whose absence means version 1 and which is checked first)."""
    hints = typing.get_type_hints(record_type)
    return {f.name: _kind(hints[f.name]) for f in dataclasses.fields(record_type)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


REQUIRED = required_fields(TrialRecord)
DEGREES = ("tp", "pp", "vpp", "cp", "mbs", "gbs")
# A status "ok" record is only usable with its measurements (optional fields of TrialRecord).
OK_REQUIRED = {name: _kind(typing.get_type_hints(TrialRecord)[name])
               for name in ("step_time_s", "tokens_per_s", "mfu")}


def record_problem(record) -> Optional[str]:
    """What makes `record` not a record of this schema, or None if it is one."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    # Records from before versioning carry no "schema" and are read as version 1.
    if record.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
        return f"schema {record.get('schema')!r}, expected {SCHEMA_VERSION}"
    for key, kinds in REQUIRED.items():
        value = record.get(key)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            return f"field {key!r} missing or not a {' or '.join(k.__name__ for k in kinds)}"
    if record["status"] not in STATUSES:
        return f"unknown status {record['status']!r}"
    for key in DEGREES:
        value = record["layout"].get(key)
        if type(value) is not int or value <= 0:
            return f"layout.{key} is {value!r}, not a positive integer"
    if record.get("prediction") is not None:  # what the analysis reads as a Prediction
        try:
            Prediction.from_dict(record["prediction"])
        except ConfigError as exc:
            return str(exc)
    if record["status"] == "ok":
        for key, kind in OK_REQUIRED.items():
            if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
                return f"status ok without a valid {key!r}"
    return None


def load_record(path) -> tuple[Optional[dict], Optional[str]]:
    """(record, None) for a good record, (None, problem) for a damaged one, (None, None) if absent."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"unreadable: {exc}"
    try:
        record = json.loads(text)
    except ValueError as exc:
        return None, f"not valid JSON: {exc}"
    problem = record_problem(record)
    return (None, problem) if problem else (record, None)


def set_aside(path, tag: str) -> Path:
    """Rename `path` to `<name>.<tag>-<time>[.N]` beside it, never overwriting; returns the new path."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.{tag}-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.{tag}-{stamp}.{n}")
        n += 1
    path.rename(target)
    return target
