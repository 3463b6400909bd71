"""Python's garbage collector outside the timed steps (`trial.manual_gc`), as Megatron-LM's
`--manual-gc` does.

Why: a trial process holds millions of Python objects (torch, megatron, Hydra); an automatic
collection that falls inside a step stops the host thread for milliseconds. Where the GPU then
waits on the host (the start of a step, before its first large kernel is queued; every
micro-batch boundary of an eager step) the pause adds to the step time.

`ManualGC(on)`: `start()` collects once, moves every surviving object to the permanent
generation (`gc.freeze`: later collections never walk the model and the imported modules)
and disables automatic collection; `between_steps()` collects what the last step left
(a full collection, cheap once the rest is frozen), outside the timed region; `stop()` restores automatic collection. Off, all three
do nothing.

Measured on an H200 (2026-12-01, llama_1b3 gbs 16, benchmarks/diag_step_phases.py, log in
benchmarks/results/step_phases_h200_2026-12-01.log): with automatic collection, 0-1
collections of ~0.2 ms fell inside a timed step (mbs 16, CUDA graph or eager), and the host
waited on the GPU for almost all of it, so on or off gave the same step time within the
steps' own spread (0.5034 vs 0.5051 s median of 10, graph; 0.5041 vs 0.5058, eager).
"""

from __future__ import annotations

import gc


class ManualGC:
    def __init__(self, on: bool):
        self.on = on
        self.was_enabled = gc.isenabled()

    def start(self) -> None:
        if not self.on:
            return
        gc.collect()
        gc.freeze()
        gc.disable()

    def between_steps(self) -> None:
        if self.on:
            gc.collect()

    def stop(self) -> None:
        if not self.on:
            return
        gc.unfreeze()
        if self.was_enabled:
            gc.enable()
