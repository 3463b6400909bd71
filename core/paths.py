"""Where the repository and its Hydra configs are, and which commit it is at."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


def git_commit(repo_root: Path = REPO_ROOT) -> Optional[str]:
    """HEAD's hash, with "-dirty" when tracked files differ from it; None outside a git tree.

    GIT_COMMIT, when set, names it instead: the device tool's copy of the tree carries the
    checkout's .git as it was when the session began, so HEAD there is stale."""
    named = os.environ.get("GIT_COMMIT")
    if named:
        return named
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True, text=True, timeout=10
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() + ("-dirty" if dirty else "")
