"""A trial's full description, written to `spec.json` in its directory before any rank starts."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from core.config import (
    ClusterConfig,
    Layout,
    ModelConfig,
    TrialConfig,
    cluster_from_dict,
    layout_from_dict,
    model_from_dict,
    trial_from_dict,
)
from core.records import write_json_atomic

SPEC_FILE = "spec.json"  # in the trial directory; the sweeper writes it before the job starts


@dataclass(kw_only=True)
class TrialSpec:
    model: ModelConfig
    cluster: ClusterConfig
    layout: Layout
    trial: TrialConfig
    trial_dir: str
    git_commit: Optional[str] = None
    prediction: Optional[dict] = None

    @property
    def name(self) -> str:
        return self.layout.name

    @property
    def world_size(self) -> int:
        return self.cluster.world_size

    def save(self) -> Path:
        path = Path(self.trial_dir) / SPEC_FILE
        write_json_atomic(path, asdict(self))
        return path

    @classmethod
    def load(cls, path) -> "TrialSpec":
        data = json.loads(Path(path).read_text())
        return cls(
            model=model_from_dict(data["model"]),
            cluster=cluster_from_dict(data["cluster"]),
            layout=layout_from_dict(data["layout"]),
            trial=trial_from_dict(data["trial"]),
            trial_dir=data["trial_dir"],
            git_commit=data.get("git_commit"),
            prediction=data.get("prediction"),
        )
