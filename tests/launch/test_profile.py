"""launch.profile without a GPU: torch profiler events (as this torch and older ones give
them) -> breakdown Events, and the rank record's breakdown with its top_kernels through JSON."""

import json
from types import SimpleNamespace

import pytest
import torch

import launch.profile as profile_module
from launch.breakdown import breakdown
from launch.profile import StepProfiler, events_from_profile

CPU, CUDA = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
ADD = "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>(int)"


def _event(name, start, end, *, parent=None, device=CPU, id=0, new_torch=True, activity="", link=0,
           user=False, thread=1):
    """A stand-in for torch's FunctionEvent; older torch has no activity_type nor linked_correlation_id."""
    e = SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), thread=thread,
                        cpu_parent=parent, sequence_nr=-1, is_async=False, device_type=device, id=id,
                        is_user_annotation=user)
    if new_torch:
        e.activity_type, e.linked_correlation_id = activity, link
    return e


def _step(new_torch: bool) -> list:
    """A step whose norm launches one Triton kernel outside any aten op, and a GEMM under aten::mm."""
    kw = {"new_torch": new_torch}
    step = _event("train_step", 0, 100, id=1, activity="user_annotation", user=True, **kw)
    norm = _event("norm", 1, 10, parent=step, id=2, activity="user_annotation", user=True, **kw)
    call = _event("cuLaunchKernelEx", 2, 3, parent=norm, id=50, activity="cuda_driver", **kw)
    mm = _event("aten::mm", 11, 20, parent=step, id=3, activity="cpu_op", **kw)
    call2 = _event("cudaLaunchKernel", 12, 13, parent=mm, id=51, activity="cuda_runtime", link=3, **kw)
    return [
        step, norm, call, mm, call2,
        _event(ADD, 5, 25, device=CUDA, id=50, activity="kernel", **kw),  # named like nothing: its scope tells
        _event("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT", 30, 40, device=CUDA, id=51, activity="kernel",
               link=3, **kw),
        # kineto's mirrors of the annotations on the GPU timeline; older torch flags them (or not)
        _event("norm", 5, 25, device=CUDA, activity="gpu_user_annotation", user=True, **kw),
        _event("train_step", 0, 100, device=CUDA, activity="gpu_user_annotation", **kw),
    ] + ([_event("cudaStreamSynchronize", 50, 60, device=CUDA, activity="cuda_sync", **kw)] if new_torch else [])


@pytest.mark.parametrize("new_torch", [True, False])
def test_events_from_profile(new_torch):
    events = events_from_profile(_step(new_torch))
    assert [e.name for e in events if e.device] == [ADD, "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT"]
    assert [e.name for e in events if e.runtime] == ["cuLaunchKernelEx", "cudaLaunchKernel"]
    assert events[2].parent == 1 and events[4].parent == 3
    assert events[6].link == (3 if new_torch else 0)
    b = breakdown(events)
    ms = {k: round(v * 1e6, 6) for k, v in b["categories"].items() if v}
    assert ms == {"norm": 20, "matmul": 10, "idle": 70}


class _FakeProfile:
    def __init__(self, activities):
        self.activities = activities

    def start(self):
        pass

    def stop(self):
        pass

    def events(self):
        return _step(new_torch=False)


def test_rank_record_keeps_top_kernels_through_json(tmp_path, monkeypatch):
    monkeypatch.setattr(profile_module, "profile", _FakeProfile)
    spec = SimpleNamespace(trial=SimpleNamespace(profile=True, trace=False, warmup_steps=1, measure_steps=2),
                           cluster=SimpleNamespace(device="cpu"), trial_dir=str(tmp_path))
    profiler = StepProfiler(spec, [torch.nn.Linear(2, 2)], rank=0)
    for step in range(3 + profiler.extra_steps):
        profiler.begin(step)
        profiler.end(step)
    record = json.loads(json.dumps(profiler.record()))
    top = record["breakdown"]["top_kernels"]
    assert [(k["name"], k["category"], k["count"]) for k in top] == [
        ("vectorized_elementwise_kernel<4, CUDAFunctor_add<...>>", "norm", 1),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT", "matmul", 1)]
    assert top[0]["total_s"] == pytest.approx(20e-6) and top[0]["share"] == pytest.approx(0.2)
