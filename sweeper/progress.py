"""Progress of a running sweep, printed from the records as they land.

Works the same for every launcher: it only watches `<sweep_dir>/<trial>/`.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from core.record_check import load_record
from core.records import result_path
from launch.supervise import started


def _fmt_duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Prints a line when a trial finishes, and a heartbeat every `interval_s` otherwise."""

    def __init__(self, sweep_dir: Path, names: list[str], *, interval_s: float, echo=print):
        self.sweep_dir, self.names, self.interval_s, self.echo = sweep_dir, names, interval_s, echo
        self.seen: dict[str, dict] = {}
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweep-progress", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()

    def _running(self) -> list[str]:
        return [n for n in self.names if n not in self.seen and started(self.sweep_dir / n)]

    def poll(self) -> bool:
        """Report newly finished trials; True if any."""
        changed = False
        for name in self.names:
            if name in self.seen:
                continue
            record, _ = load_record(result_path(self.sweep_dir / name))
            if record is None:  # not yet written, or damaged (the sweeper reports those)
                continue
            self.seen[name] = record
            changed = True
            detail = record.get("reason") or ""
            if record["status"] == "ok" and "palm" in record["mfu"]:
                detail = (f"{record['step_time_s']:.3f} s/step, {record['tokens_per_s']:.0f} tok/s, "
                          f"MFU {100 * record['mfu']['palm']:.1f}% (PaLM)")
            self.echo(f"[{len(self.seen)}/{len(self.names)}] {record.get('status', '?'):7s} {name}  {detail}")
        return changed

    def _run(self) -> None:
        last = time.time()
        while not self._stop.wait(1.0):
            if self.poll():
                last = time.time()
            elif time.time() - last >= self.interval_s:
                last = time.time()
                running = self._running()
                what = f"running: {', '.join(running[:2])}" if running else "waiting for jobs to start"
                self.echo(f"[{len(self.seen)}/{len(self.names)}] {_fmt_duration(time.time() - self.started)} "
                          f"elapsed, {what}")
