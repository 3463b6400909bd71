"""Moved to core/spec.py and core/paths.py (issue 15); a shim until 13:15."""
from core.paths import REPO_ROOT, git_commit  # noqa: F401  shim until 13:15
from core.spec import *  # noqa: F401,F403  shim until 13:15
