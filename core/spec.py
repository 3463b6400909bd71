"""A trial's full description, written to `spec.json` in its directory before any rank starts,
and the sweeper's prediction for it (`Prediction`), carried on into its `result.json`."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Optional

from core.config import (
    ClusterConfig,
    Layout,
    ModelConfig,
    ConfigError,
    TrialConfig,
    _build,
    cluster_from_dict,
    layout_from_dict,
    model_from_dict,
    trial_from_dict,
)
from core.records import write_json_atomic

SPEC_FILE = "spec.json"  # in the trial directory; the sweeper writes it before the job starts


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """One layout's predicted memory and speed, made before its trial runs (sweeper.plan's
    prediction_for builds it from sweeper.memory's MemoryEstimate and sweeper.speed's estimate).
    Memory in GiB (2**30 bytes), rounded to 3 decimals; the field order is the JSON's.

    peak_memory_gb: device memory used (MemoryEstimate.peak_gb), what `fits` is decided on;
    reserved_gb / allocated_gb: the allocator's part (vs torch.cuda.max_memory_reserved /
    max_memory_allocated); None in records made before they were predicted (2026-11-23);
    step_time_s: one optimizer step, s; mfu: PaLM convention, a fraction of the cluster's peak;
    memory_terms_gb: the worst stage's terms by name, GiB (MemoryEstimate.terms).
    """

    peak_memory_gb: float
    reserved_gb: Optional[float] = None
    allocated_gb: Optional[float] = None
    fits: bool
    step_time_s: float
    mfu: float
    memory_terms_gb: dict[str, float]

    def to_dict(self) -> dict:
        """The JSON of spec.json's and result.json's "prediction"; a field that is None is left
        out, so an old record's prediction is written back as it was read."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, data, key: str = "prediction") -> "Prediction":
        """A prediction from its JSON, or a one-line ConfigError naming `key` and the field."""
        if not isinstance(data, dict):
            raise ConfigError(f"{key} must be an object, got {data!r}")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in data]
        if missing:
            raise ConfigError(f"{key}.{missing[0]} is missing")
        return _build(cls, data, key)  # unknown fields refused, each value through check_value


@dataclass(kw_only=True)
class TrialSpec:
    model: ModelConfig
    cluster: ClusterConfig
    layout: Layout
    trial: TrialConfig
    trial_dir: str
    git_commit: Optional[str] = None
    prediction: Optional[Prediction] = None  # None for a trial that is not predicted (invalid)

    @property
    def name(self) -> str:
        return self.layout.name

    @property
    def world_size(self) -> int:
        return self.cluster.world_size

    def to_dict(self) -> dict:
        prediction = None if self.prediction is None else self.prediction.to_dict()
        return {**asdict(self), "prediction": prediction}

    def save(self) -> Path:
        path = Path(self.trial_dir) / SPEC_FILE
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path) -> "TrialSpec":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, data: dict) -> "TrialSpec":
        prediction = data.get("prediction")
        return cls(
            model=model_from_dict(data["model"]),
            cluster=cluster_from_dict(data["cluster"]),
            layout=layout_from_dict(data["layout"]),
            trial=trial_from_dict(data["trial"]),
            trial_dir=data["trial_dir"],
            git_commit=data.get("git_commit"),
            prediction=None if prediction is None else Prediction.from_dict(prediction),
        )
