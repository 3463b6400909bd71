"""The few CUDA-only calls megatron-core 0.16.1 makes on its training path, pointed at the CPU.

megatron-core's schedules, P2P communicator, sequence-parallel mappings, recompute and DDP
run over gloo unchanged except for these (issue 18; none needs an edit of megatron's files):

1. `torch.zeros(..., device="cuda")` literals in `pipeline_parallel/schedules.py` (the token
   counter of every schedule, pp = 1 included): that module's `torch` is swapped for a proxy
   whose factories put "cuda" tensors on the CPU (`device_redirect`).
2. Buffers placed on `torch.cuda.current_device()` (p2p shape and receive buffers,
   `tensor_parallel/mappings.py`, `tensor_parallel/layers.py`, `GlobalMemoryBuffer`, DDP's grad
   buffers): `torch.cuda.current_device` returns the CPU device (`device_redirect`).
3. The CUDA RNG tracker: `model_parallel_cuda_manual_seed` seeds `torch.cuda`, and
   `CheckpointFunction` saves and restores CUDA generator states through `_get_all_rng_states`
   / `_set_all_rng_states`. `install_rng_tracker` puts a tracker of CPU generator states in
   megatron's global slot before seeding, and CPU versions of those two functions in place.
4. `torch.cuda.synchronize()` in p2p is reached only with `batch_p2p_comm=True`: not a shim,
   the CPU path runs `batch_p2p_comm=False` (`launch.steps.p2p_settings`).

Both shims check megatron-core's private names first and raise `ShimError` naming what
changed, so a megatron upgrade fails at set-up instead of training on the wrong device.
`tests/launch/test_cpu_shims.py` removes each shim in turn and sees the failure it exists for.
"""

from __future__ import annotations

import contextlib
import types

import torch

CPU = torch.device("cpu")


class ShimError(RuntimeError):
    """megatron-core's private names moved: the CPU shims no longer fit this version."""


def _require(module, *names: str) -> None:
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise ShimError(f"{module.__name__} no longer has {', '.join(missing)}: "
                        f"launch/cpu_shims.py needs updating for this megatron-core")


def _on_cpu(device):
    """Where a tensor asked for on `device` goes: CUDA requests land on the CPU."""
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return CPU
    return device


def _redirected(factory):
    def call(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        return factory(*args, **kwargs)
    return call


class _TorchOnCpu(types.ModuleType):
    """`torch` as one megatron module sees it: the same, except that factory calls asking for
    "cuda" get the CPU. Scoped to that module, so nothing else pays for it."""

    FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange")

    def __init__(self):
        super().__init__("torch")
        for name in self.FACTORIES:
            setattr(self, name, _redirected(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _cpu_current_device():
    return CPU


@contextlib.contextmanager
def device_redirect():
    """Inside: megatron's CUDA device requests land on the CPU (shims 1 and 2 above).

    Wraps the training step and the construction of megatron's DDP (its grad buffers are
    placed on `torch.cuda.current_device()`); outside it torch is untouched."""
    from megatron.core.pipeline_parallel import schedules

    _require(schedules, "torch")
    _require(torch.cuda, "current_device")
    if schedules.torch is not torch:
        raise ShimError("megatron.core.pipeline_parallel.schedules.torch is not torch "
                        "(already redirected, or the module changed)")
    saved_current_device = torch.cuda.current_device
    schedules.torch = _TorchOnCpu()
    torch.cuda.current_device = _cpu_current_device
    try:
        yield
    finally:
        torch.cuda.current_device = saved_current_device
        schedules.torch = torch


class CpuRNGStatesTracker:
    """megatron's CudaRNGStatesTracker interface over the CPU generator.

    Named states (data-parallel, model-parallel, expert) are CPU generator states;
    `fork(name)` runs its block with that state and keeps what the block advanced, as
    megatron's tracker does with CUDA states."""

    def __init__(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def reset(self) -> None:
        self.states_, self.seeds_ = {}, set()

    def get_states(self) -> dict:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict) -> None:
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _cpu_get_all_rng_states():
    from megatron.core.tensor_parallel import random

    return torch.get_rng_state(), None, random.get_cuda_rng_tracker().get_states()


def _cpu_set_all_rng_states(cpu_rng_state, cuda_rng_state, tracker_states):
    from megatron.core.tensor_parallel import random

    torch.set_rng_state(cpu_rng_state)
    random.get_cuda_rng_tracker().set_states(tracker_states)


def install_rng_tracker() -> None:
    """Put a CPU RNG tracker in megatron's slot (shim 3). Call before
    `model_parallel_cuda_manual_seed`, which then seeds it instead of CUDA generators.
    For the rest of the process: a CPU rank never has CUDA generators to restore."""
    from megatron.core.tensor_parallel import random

    _require(random, "_CUDA_RNG_STATE_TRACKER", "_CUDA_RNG_STATE_TRACKER_INITIALIZED",
             "_get_all_rng_states", "_set_all_rng_states", "CheckpointFunction")
    random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    random._get_all_rng_states = _cpu_get_all_rng_states
    random._set_all_rng_states = _cpu_set_all_rng_states
