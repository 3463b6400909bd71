"""Moved to core/config.py (issue 15); a shim until 13:15."""
from core.choices import *  # noqa: F401,F403  shim until 13:15
from core.config import *  # noqa: F401,F403  shim until 13:15
from core.config import _build  # noqa: F401  shim until 13:15
