"""Profile one training step of a trial: its time by category, optionally its Chrome trace.

Off by default (it costs a step and some seconds of parsing); `trial.profile=true`
turns it on, `trial.trace=true` also writes rank 0's trace to `<trial_dir>/trace.json`
(other ranks: `trace_rank{N}.json`), to open in chrome://tracing or ui.perfetto.dev.

A trial path (CPU or GPU) uses it the same way:

    profiler = StepProfiler(spec, model_chunks, rank=rank)
    measured = spec.trial.warmup_steps + spec.trial.measure_steps
    for step in range(measured + profiler.extra_steps):
        ...barrier...
        profiler.begin(step)          # starts the profiler on the extra step only
        ...forward/backward...
        with scope("dp_comm"): ...gradient all-reduce...
        with scope("optimizer"): optimizer.step()
        ...barrier / synchronize...
        profiler.end(step)
        if step < measured: ...record the step time...
    return {..., **profiler.record()}  # {"breakdown": {...}} when profiled

The profiled step is an extra step after the measured ones, so profiler overhead
never enters the measured step times. The profiler records CPU activity, and
CUDA activity when the trial runs on a GPU; module hooks (attached for that step
only) mark each model chunk ("model"), each core attention ("attention") and
each norm ("norm") with record_function scopes that `launch.breakdown` reads.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from launch.breakdown import MODEL_SCOPE, STEP_SCOPE, Event, breakdown


def scope(name: str) -> record_function:
    """A named region the breakdown reads: dp_comm, pp_comm, tp_comm, optimizer, attention, norm."""
    return record_function(name)


def module_scope(name: str, module: torch.nn.Module) -> str | None:
    """The breakdown scope for a submodule of a model chunk, or None."""
    if name.split(".")[-1] == "core_attention":
        return "attention"
    kind = type(module).__name__.lower()
    if "norm" in kind and "linear" not in kind:  # not a fused norm + linear (TE)
        return "norm"
    return None


_RUNTIME_CALL = re.compile(r"^cu(da)?[A-Z]\w*$")  # cudaLaunchKernel, cuLaunchKernelEx (Triton)


def _is_device(e) -> bool:
    return e.device_type != torch.autograd.DeviceType.CPU


def _activity(e) -> str:
    """Kineto's activity type ("kernel", "cuda_runtime", ...); "" where torch does not keep it."""
    return str(getattr(e, "activity_type", "") or "")


def _is_no_kernel(e, annotations: set[str]) -> bool:
    """A device event that is no kernel, memcpy or memset: kineto's copy of a record_function
    range on the GPU timeline, a sync. Torch releases without `activity_type` mark the copy
    `is_user_annotation`, or it carries an annotation's name."""
    if not _is_device(e):
        return False
    if _activity(e):
        return not any(kind in _activity(e) for kind in ("kernel", "memcpy", "memset"))
    return bool(getattr(e, "is_user_annotation", False)) or e.name in annotations


def _is_runtime(e) -> bool:
    """A CUDA runtime/driver call on the CPU; its id is the correlation id of what it launched."""
    if _is_device(e):
        return False
    activity = _activity(e)
    return ("runtime" in activity or "driver" in activity) if activity else bool(_RUNTIME_CALL.match(e.name))


def events_from_profile(function_events) -> list[Event]:
    """torch profiler FunctionEvents -> plain breakdown Events (times in us).

    Works with torch releases whose FunctionEvents lack `linked_correlation_id` and
    `activity_type`: kernels then find their launcher through their runtime call, which
    shares their id.
    """
    annotations = {e.name for e in function_events
                   if not _is_device(e) and getattr(e, "is_user_annotation", False)}
    kept = [e for e in function_events if not _is_no_kernel(e, annotations)]
    index = {id(e): i for i, e in enumerate(kept)}
    return [
        Event(name=e.name, start=e.time_range.start, end=e.time_range.end, thread=e.thread,
              parent=index.get(id(e.cpu_parent)) if e.cpu_parent is not None else None,
              seq=e.sequence_nr, is_async=bool(e.is_async), device=_is_device(e), id=e.id,
              link=getattr(e, "linked_correlation_id", 0) or 0, runtime=_is_runtime(e))
        for e in kept
    ]


class StepProfiler:
    """Profiles the step after the measured ones when spec.trial.profile or .trace is set."""

    def __init__(self, spec, model_chunks, *, rank: int):
        trial = spec.trial
        self.enabled = bool(trial.profile or trial.trace)
        self.trace = bool(trial.trace)
        self.step_index = trial.warmup_steps + trial.measure_steps
        self.extra_steps = 1 if self.enabled else 0
        self.on_cuda = spec.cluster.device == "cuda" and torch.cuda.is_available()
        self.chunks = list(model_chunks)
        self.trace_path = Path(spec.trial_dir) / ("trace.json" if rank == 0 else f"trace_rank{rank}.json")
        self._profiler = None
        self._scopes: list[record_function] = []
        self._hooks = []
        self._result: dict = {}

    def begin(self, step: int) -> None:
        if not self.enabled or step != self.step_index:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_cuda else [])
        self._attach_hooks()
        self._profiler = profile(activities=activities)
        self._profiler.start()
        self._step_scope = scope(STEP_SCOPE)
        self._step_scope.__enter__()

    def end(self, step: int) -> None:
        if self._profiler is None or step != self.step_index:
            return
        if self.on_cuda:
            torch.cuda.synchronize()  # the step's kernels end inside its annotation
        self._step_scope.__exit__(None, None, None)
        self._profiler.stop()
        self._detach_hooks()
        if self.trace:
            self._profiler.export_chrome_trace(str(self.trace_path))
            self._result["trace"] = self.trace_path.name
        self._result["breakdown"] = breakdown(events_from_profile(self._profiler.events()))
        self._profiler = None

    def record(self) -> dict:
        """What the rank record gains when profiled: {"breakdown": ..., "trace": file name}; on a GPU
        the breakdown holds `top_kernels` too (see launch.breakdown), all plain JSON."""
        return dict(self._result)

    def _attach_hooks(self) -> None:
        def enter(name):
            def hook(module, args):
                self._scopes.append(scope(name))
                self._scopes[-1].__enter__()
            return hook

        def leave(module, args, output):
            self._scopes.pop().__exit__(None, None, None)

        for chunk in self.chunks:
            named = [("", chunk, MODEL_SCOPE)] + [
                (n, m, module_scope(n, m)) for n, m in chunk.named_modules() if n]
            for _, module, name in named:
                if name:
                    self._hooks.append(module.register_forward_pre_hook(enter(name)))
                    self._hooks.append(module.register_forward_hook(leave, always_call=True))

    def _detach_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
