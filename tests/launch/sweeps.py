"""Run the real sweep command in a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_sweep(sweep_dir, *overrides, env=None, timeout=900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch.main", f"hydra.sweep.dir={sweep_dir}",
           "sweep.progress_interval_s=5", *overrides]
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)


def records(sweep_dir) -> dict[str, dict]:
    out = {}
    for path in Path(sweep_dir).glob("*/result.json"):
        record = json.loads(path.read_text())
        out[record["trial"]] = record
    return out


def trial_name(**axes) -> str:
    from core.config import Layout

    return Layout(**axes).name
