"""core.paths.git_commit: HEAD of this checkout, or the commit a caller names (GIT_COMMIT)."""

import re

from core.paths import git_commit


def test_the_checkouts_head_without_a_named_commit(monkeypatch):
    monkeypatch.delenv("GIT_COMMIT", raising=False)
    commit = git_commit()
    assert commit is not None and re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit), commit


def test_a_named_commit_wins_over_a_stale_head(monkeypatch):
    # The device tool's copy of the tree carries .git as it was at the session's start.
    monkeypatch.setenv("GIT_COMMIT", "441ca1e")
    assert git_commit() == "441ca1e"
