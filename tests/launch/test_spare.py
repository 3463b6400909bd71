"""launch.supervise with spares: a spare that died on hand-over is replaced by a fresh rank."""

import subprocess

from launch import spare, supervise


class _DeadSpare:
    class _Pipe:
        def write(self, text):
            raise BrokenPipeError("spare exited")

    def __init__(self):
        self.stdin, self.killed = self._Pipe(), False

    def kill(self):
        self.killed = True


def test_a_spare_that_died_on_hand_over_gives_way_to_a_fresh_rank(tmp_path, monkeypatch):
    dead = _DeadSpare()
    monkeypatch.setattr(spare.SPARES, "take", lambda device: (dead, tmp_path / "imports.log"))
    proc = supervise._start(tmp_path / "missing-spec.json", tmp_path / "rank0.log",
                            {"RANK": "0", "WORLD_SIZE": "1"}, device="cpu")
    assert isinstance(proc, subprocess.Popen) and dead.killed
    assert proc.wait(timeout=120) != 0  # a real rank process: it fails on the missing spec
    assert "missing-spec.json" in (tmp_path / "rank0.log").read_text()
