"""A real one-node Slurm cluster for tests (no mock of sbatch).

    (the fixture is registered in tests/conftest.py)

    def test_x(slurm_cluster):       # slurm_cluster == {"SLURM_CONF": ".../slurm.conf"}
        ...                          # os.environ["SLURM_CONF"] is set while the session runs

`ensure_cluster()` runs scripts/slurm_up.sh (idempotent; reuses a running cluster).
Missing binaries are apt-installed only when LAYOUT_SWEEP_INSTALL_SLURM=1 or CI is set.
Locally, a machine without root or slurm skips the tests; with CI set they FAIL
instead, so a CI job can never pass by silently skipping the cluster tests.
The cluster is left running after the session (cheap to reuse); stop it with
scripts/slurm_down.sh.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
DEFAULT_STATE_DIR = "/tmp/layout-sweep-slurm"
BINARIES = ("slurmctld", "slurmd", "sbatch", "munged")
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


class SlurmUnavailable(RuntimeError):
    """No cluster can be had here (not root, binaries missing, bring-up failed)."""


def _missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b, path=_SEARCH_PATH) is None]


def _run(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            ["bash", str(SCRIPTS / script), *args],
            capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise SlurmUnavailable(f"{script} timed out after {timeout:.0f}s") from e


def ensure_cluster(state_dir: str | os.PathLike = DEFAULT_STATE_DIR) -> dict[str, str]:
    """Bring the cluster up; return the env additions ({"SLURM_CONF": path})."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("not root: slurm_up.sh runs slurmctld/slurmd as root")
    if _missing():
        if not (os.environ.get("LAYOUT_SWEEP_INSTALL_SLURM") == "1" or os.environ.get("CI")):
            raise SlurmUnavailable(
                f"missing {', '.join(_missing())}; run scripts/install_slurm.sh "
                "or set LAYOUT_SWEEP_INSTALL_SLURM=1"
            )
        r = _run("install_slurm.sh", timeout=900)
        if r.returncode != 0 or _missing():
            raise SlurmUnavailable(f"install_slurm.sh failed: {(r.stderr or r.stdout).strip()}")
    r = _run("slurm_up.sh", str(state_dir), timeout=120)
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    if r.returncode != 0 or not last.startswith("export SLURM_CONF="):
        raise SlurmUnavailable(f"slurm_up.sh failed (rc={r.returncode}):\n{r.stderr[-3000:]}")
    return {"SLURM_CONF": last.split("=", 1)[1]}


@pytest.fixture(scope="session")
def slurm_cluster():
    """Session-wide cluster env; sets os.environ["SLURM_CONF"] (restored afterwards)."""
    try:
        env = ensure_cluster(os.environ.get("LAYOUT_SWEEP_SLURM_STATE", DEFAULT_STATE_DIR))
    except SlurmUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Slurm tests, but: {e}", pytrace=False)
        pytest.skip(f"no Slurm cluster: {e}")
    old = os.environ.get("SLURM_CONF")
    os.environ.update(env)
    yield env
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
