"""The step loop of one rank, shared by the CPU and GPU trial paths.

    parts = build(spec, world, setup)     # launch.cpu_trial.parts / launch.gpu_trial.parts
    for step in range(warmup + measure + profiled):
        batches                           # made before the clock starts (a prefetching loader)
        parts.barrier()                   # every rank, and its device, lined up
        profiler.begin(step); start clock
        parts.forward_backward(batches)   # fresh grad buffers, megatron's schedule, grads reduced
        parts.optimizer_step()            # in the "optimizer" scope; the global grad norm or None
        parts.synchronize(); stop clock; profiler.end(step)
        loss (a DP all-reduce), divergence guard: measured steps only, outside the clock
        trial.manual_gc: Python's garbage collection here, between steps (launch.manual_gc)

What differs between the paths is in `StepParts` (bf16 or fp32, megatron's optimizer or
torch's AdamW, a CUDA graph, the CPU shims, how the peak memory is read). The profiled
step is an extra one after the measured ones (launch.profile), never timed. A CUDA-graph
trial runs this whole function on a side stream (launch.gpu_trial.run_steps says why).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from megatron.core import parallel_state

from core.spec import TrialSpec
from launch import steps
from launch.divergence import StepGuard
from launch.manual_gc import ManualGC
from launch.profile import StepProfiler, scope


class Timeline:
    """Seconds between named points of a rank's start-up: where a trial's wall time goes."""

    def __init__(self):
        self.marks: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.marks[name] = round(now - self._last, 3)
        self._last = now


def process_age_s():
    """Seconds since this rank's process started, or since a spare got this rank (launch.spare)."""
    assigned = os.environ.get("LAYOUT_SWEEP_ASSIGNED_AT")
    if assigned:
        return round(time.time() - float(assigned), 3)
    try:
        import psutil

        return round(time.time() - psutil.Process().create_time(), 3)
    except Exception:  # noqa: BLE001 - a missing figure, not a failed trial
        return None


def inject_failure(spec: TrialSpec) -> None:
    """`trial.fail_if_name_contains`: the fault tests' planted failure, raised after the build."""
    wanted = spec.trial.fail_if_name_contains
    if wanted and wanted in spec.name:
        raise RuntimeError(f"injected failure: trial name contains {wanted!r}")


@dataclass(frozen=True, kw_only=True)
class StepParts:
    """One rank's trainer as the step loop drives it: what a trial path does its own way."""

    model: list  # the model chunks, each in megatron's DDP (the profiler hooks them)
    guard: StepGuard  # a non-finite loss or gradient ends the trial `diverged`
    device: str  # where the batches go: "cpu" or "cuda"
    barrier: Callable[[], None]  # ranks (and the device) lined up, before the clock starts
    synchronize: Callable[[], None]  # the step's work done, before the clock stops
    forward_backward: Callable[[list], list]  # batches -> [{"loss": tensor}] per micro-batch
    optimizer_step: Callable[[], Optional[torch.Tensor]]  # the global gradient norm, or None
    memory: Callable[[], dict]  # the record's peak-memory fields, read after the last step
    # No global gradient norm (torch's AdamW): each rank checks its own reduced gradients.
    local_grads: bool = False
    fields: dict = field(default_factory=dict)  # more record fields (trial_path, ...)


def run(spec: TrialSpec, *, rank: int, world: int,
        build: Callable[[TrialSpec, int, Timeline], StepParts]) -> dict:
    """Build the rank's trainer with `build`, run its steps, and return the rank's record fields."""
    layout, trial = spec.layout, spec.trial
    setup = Timeline()
    setup.marks["process_start_to_trial"] = process_age_s()  # interpreter, imports, process group
    torch.manual_seed(trial.seed)
    parts = build(spec, world, setup)
    num_micro = layout.num_microbatches(world)
    dp_rank = parallel_state.get_data_parallel_rank()
    profiler = StepProfiler(spec, parts.model, rank=rank)
    measured = trial.warmup_steps + trial.measure_steps

    step_times, losses, profiler_error = [], [], None
    collector = ManualGC(trial.manual_gc)  # trial.manual_gc: collections between steps only
    collector.start()
    try:
        for step in range(measured + profiler.extra_steps):
            batches = steps.step_batches(spec, step, num_micro, dp_rank, device=parts.device)
            parts.barrier()
            profiler.begin(step)
            start = time.perf_counter()
            step_losses = parts.forward_backward(batches)
            with scope("optimizer"):
                grad_norm = parts.optimizer_step()
            parts.synchronize()
            elapsed = time.perf_counter() - start
            try:
                profiler.end(step)
            except Exception as exc:  # noqa: BLE001 - a failed breakdown must not fail a measured trial
                profiler_error = f"{type(exc).__name__}: {exc}"[:500]
            if step == 0:
                setup.mark("first_step")
            if step < measured:  # the profiled step is an extra one, never timed
                step_times.append(elapsed)
                loss = steps.step_loss(step_losses, num_micro)  # None off the last pipeline stage
                if loss is not None:
                    losses.append(loss)
                parts.guard.after_step(step, loss=loss, grad_norm=grad_norm,
                                       local_grads=parts.local_grads)
            collector.between_steps()
    finally:
        collector.stop()
    record = {"step_times_s": step_times, **parts.memory(), **parts.fields, "setup_s": setup.marks}
    if profiler_error:
        record["breakdown_error"] = profiler_error
    if losses:  # the last pipeline stage's ranks compute the loss
        record["losses"] = losses
    record.update(profiler.record())
    record.update(parts.guard.record())
    return record
