"""One real CPU sweep, made once per test session and shared by the report, notebook and breakdown tests.

Four trials launch (tp 1 and 2, norm torch and megatron, all profiled and traced),
one of them fails on purpose; tp 4 is invalid on 2 ranks, so every section of the report
has data. pp stays 1: the breakdown tests read a profile without pipeline sends.
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAILING = "tp2_pp1_vpp1_cp1_mbs2_gbs8_rc-none_sp0_do0_attn-sdpa_norm-megatron"


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report_sweep") / "tiny-local_cpu"
    command = [
        sys.executable, "-m", "launch.main", f"hydra.sweep.dir={out}",
        "layout.tp=1,2,4", "layout.pp=1", "layout.mbs=2", "layout.recompute=none",
        "layout.norm=torch,megatron", "trial.warmup_steps=1", "trial.measure_steps=2",
        "trial.profile=true", "trial.trace=true", f"trial.fail_if_name_contains={FAILING}",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"sweep failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return out
