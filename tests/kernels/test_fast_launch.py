"""kernels.fast_launch: first call through kernel[grid], later calls straight to the launcher.

On CPU a stand-in kernel records what each path was called with (the launcher's argument
order is Triton's: grid, stream, function, metadata, hooks, then every argument with the
constexprs last). On a GPU (marked cuda): RMSNorm through the direct path, across row counts
that a specialized kernel would get wrong, against the float64 formula.
"""

import types

import pytest
import torch

from kernels import fast_launch
from kernels.fast_launch import CachedLaunch


class _Compiled:
    def __init__(self):
        self.packed_metadata = "meta"
        self.calls = []

    def _init_handles(self):
        self.function = "fn"

    def launch_metadata(self, grid, stream, *values):  # as Triton's: None without a hook
        return None if fast_launch._knobs.runtime.launch_enter_hook is None else ("launch-meta", grid)

    def run(self, *call):
        self.calls.append(call)


class _Kernel:
    """A @triton.jit stand-in: `kernel[grid](*args, **kw)` records the call."""

    def __init__(self, compiled, arg_names):
        self.compiled, self.arg_names, self.calls = compiled, arg_names, []
        self.fn = types.SimpleNamespace(__name__="k")

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return self.compiled
        return call


@pytest.fixture
def cuda_stub(monkeypatch):
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)


def test_second_call_goes_straight_to_the_launcher(cuda_stub, monkeypatch):
    compiled = _Compiled()
    kernel = _Kernel(compiled, ["a", "b", "BLOCK"])
    launch = CachedLaunch(kernel)
    launch.launch((0, "cfg"), (7,), ("x", 3), {"BLOCK": 64}, num_warps=4)
    assert kernel.calls == [((7,), ("x", 3), {"BLOCK": 64, "num_warps": 4, "num_stages": 1})]
    assert compiled.calls == []
    hooks = fast_launch._knobs.runtime
    monkeypatch.setattr(hooks, "launch_enter_hook", None)
    monkeypatch.setattr(hooks, "launch_exit_hook", None)
    launch.launch((0, "cfg"), (9, 2), ("y", 5), {"BLOCK": 64}, num_warps=4)
    assert len(kernel.calls) == 1  # not through kernel[grid] again
    assert compiled.calls == [(9, 2, 1, 1234, "fn", "meta", None, None, None, "y", 5, 64)]
    # with a profiler's hook installed, the launch metadata is built and the hook passed on
    monkeypatch.setattr(hooks, "launch_enter_hook", print)
    launch.launch((0, "cfg"), (3,), ("z", 1), {"BLOCK": 64}, num_warps=4)
    assert compiled.calls[-1] == (3, 1, 1, 1234, "fn", "meta", ("launch-meta", (3,)), print, None,
                                  "z", 1, 64)


def test_an_empty_hook_chain_counts_as_no_hook(cuda_stub, monkeypatch):
    """Triton 3.7+ keeps an empty HookChain where 3.6 keeps None: neither builds metadata."""
    compiled = _Compiled()
    launch = CachedLaunch(_Kernel(compiled, ["a", "BLOCK"]))
    launch.launch((0,), (1,), ("x",), {"BLOCK": 8}, num_warps=4)
    hooks = fast_launch._knobs.runtime
    empty = types.SimpleNamespace(calls=[])
    monkeypatch.setattr(hooks, "launch_enter_hook", empty)
    monkeypatch.setattr(hooks, "launch_exit_hook", empty)
    monkeypatch.setattr(compiled, "launch_metadata", lambda *a: pytest.fail("metadata built"))
    launch.launch((0,), (2,), ("y",), {"BLOCK": 8}, num_warps=4)
    assert compiled.calls == [(2, 1, 1, 1234, "fn", "meta", None, None, None, "y", 8)]
    installed = types.SimpleNamespace(calls=[print])
    monkeypatch.setattr(hooks, "launch_exit_hook", installed)
    launch.launch((0,), (3,), ("z",), {"BLOCK": 8}, num_warps=4)
    assert compiled.calls[-1][6:9] == (None, None, installed)


def test_other_device_or_key_takes_the_regular_path(cuda_stub):
    compiled = _Compiled()
    kernel = _Kernel(compiled, ["a", "BLOCK"])
    launch = CachedLaunch(kernel)
    launch.launch((1, "cfg"), (1,), ("x",), {"BLOCK": 8}, num_warps=4)
    launch.launch((1, "cfg"), (1,), ("x",), {"BLOCK": 8}, num_warps=4)  # device 1 != current 0
    launch.launch((0, "other"), (1,), ("x",), {"BLOCK": 8}, num_warps=4)  # a new key compiles
    assert len(kernel.calls) == 3 and compiled.calls == []


def test_no_compiled_kernel_means_always_the_regular_path(cuda_stub):
    kernel = _Kernel(None, ["a", "BLOCK"])  # the interpreter returns no CompiledKernel
    launch = CachedLaunch(kernel)
    for _ in range(3):
        launch.launch((0,), (1,), ("x",), {"BLOCK": 8}, num_warps=4)
    assert len(kernel.calls) == 3 and launch.compiled == {(0,): None}


def test_constexprs_out_of_signature_order_are_refused(cuda_stub):
    launch = CachedLaunch(_Kernel(_Compiled(), ["a", "B", "C"]))
    with pytest.raises(TypeError, match="constexprs must follow"):
        launch.launch((0,), (1,), ("x",), {"C": 1, "B": 2}, num_warps=4)


@pytest.mark.cuda
def test_gpu_rmsnorm_direct_launches_match_float64_across_row_counts():
    from kernels import rmsnorm

    w = (1 + 0.5 * torch.randn(5120, device="cuda")).to(torch.bfloat16).requires_grad_()
    # 32 rows first (divisible by 16: what a specialized kernel would assume), then others.
    for rows in (32, 17, 1, 300, 32):
        x = torch.randn(rows, 5120, device="cuda").to(torch.bfloat16).requires_grad_()
        dy = torch.randn_like(x)
        y = rmsnorm.rms_norm(x, w)
        y.backward(dy)
        x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
        y64 = rmsnorm.reference(x64, w64)
        y64.backward(dy.double())
        for got, ref in ((y, y64), (x.grad, x64.grad), (w.grad, w64.grad)):
            rel = ((got.double() - ref).norm() / ref.norm()).item()
            assert rel < 2.0**-8 + 1e-5, (rows, rel)  # bf16's unit roundoff, as test_rmsnorm
        w.grad = None
    used = (rmsnorm._forward_plan(5120, rmsnorm.forward_config(5120))[0],  # the defaults' kernels
            rmsnorm._backward_plan(5120, rmsnorm.backward_config(5120))[0], rmsnorm._DW_REDUCE)
    for cache in used:
        assert cache.compiled and all(cache.compiled.values())  # the direct path was taken
