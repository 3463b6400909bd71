"""The per-step time breakdown: classification rules and the painting that makes totals add up
(real profiled CPU trials: tests/analysis/test_breakdown_records.py)."""

import pytest

from launch.breakdown import CATEGORIES, Event, breakdown, classify, contexts, paint
from launch.categories import name_category


def test_names_alone():
    assert name_category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert name_category("aten::_efficient_attention_backward") == "attention"
    assert name_category("_attn_fwd") == "attention"  # a Triton kernel
    assert name_category("aten::_fused_rms_norm") == "norm"
    assert name_category("_rms_norm_bwd_kernel") == "norm"
    assert name_category("aten::addmm") == "matmul"
    assert name_category("autograd::engine::evaluate_function: MmBackward0") == "matmul"
    assert name_category("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert name_category("aten::silu") is None


@pytest.mark.parametrize("chain, expected", [
    (["c10d::barrier", "train_step"], "idle"),
    (["c10d::allreduce_", "dp_comm", "train_step"], "dp_comm"),
    (["c10d::allreduce_", "_ReduceFromModelParallelRegion", "model", "train_step"], "tp_comm"),
    (["c10d::allreduce_", "train_step"], "dp_comm"),  # outside the model: the loss / grad all-reduce
    (["c10d::send", "train_step"], "pp_comm"),
    (["aten::mul", "Optimizer.step#AdamW.step", "optimizer", "train_step"], "optimizer"),
    (["aten::bmm", "attention", "model", "train_step"], "attention"),  # the scope beats the name
    (["aten::pow", "aten::_fused_rms_norm", "norm", "model", "train_step"], "norm"),
    (["aten::reshape", "aten::matmul", "model", "train_step"], "matmul"),  # inherits its op
    (["aten::silu", "model", "train_step"], "elementwise"),
    (["model", "train_step"], "other"),  # Python time in the model
])
def test_classify(chain, expected):
    assert classify(chain) == expected


def test_backward_inherits_forward_scope():
    events = [
        Event(name="train_step", start=0, end=100),
        Event(name="attention", start=1, end=10, parent=0),
        Event(name="aten::bmm", start=2, end=9, parent=1, seq=7),
        Event(name="autograd::engine::evaluate_function: BmmBackward0", start=20, end=40, parent=0, seq=7),
        Event(name="aten::bmm", start=21, end=39, parent=3),
    ]
    assert classify(contexts(events)[4]) == "attention"


def test_paint_adds_up_and_respects_priority():
    totals = paint(0, 10, [[(1, 4, "matmul")], [(2, 8, "tp_comm"), (3, 5, "dp_comm")]], "idle")
    assert totals["matmul"] == 3  # 1..4 wins over comm
    assert totals["tp_comm"] == 4  # 4..8 (tp before dp in CATEGORIES)
    assert totals["dp_comm"] == 0
    assert totals["idle"] == 3  # 0..1 and 8..10
    assert sum(totals.values()) == 10


def test_cpu_wait_goes_to_the_collective_in_flight():
    # A sync gloo all-reduce: the c10d op returns at once, Python waits for the gloo thread.
    events = [
        Event(name="train_step", start=0, end=100, thread=1),
        Event(name="model", start=0, end=60, thread=1, parent=0),
        Event(name="aten::mm", start=0, end=20, thread=1, parent=1),
        Event(name="c10d::allreduce_", start=20, end=22, thread=1, parent=1),
        Event(name="gloo:all_reduce", start=22, end=50, thread=7, is_async=True),
        Event(name="c10d::barrier", start=90, end=91, thread=1, parent=0),
        Event(name="gloo:barrier", start=91, end=100, thread=8, is_async=True),
    ]
    result = breakdown(events)
    ms = {k: v * 1e6 for k, v in result["categories"].items()}
    assert ms["matmul"] == pytest.approx(20)
    assert ms["tp_comm"] == pytest.approx(2 + 28)  # the launch and the wait inside the model
    assert ms["other"] == pytest.approx(10 + 30)  # model Python 50..60, step gaps 60..90
    assert ms["idle"] == pytest.approx(10)  # the barrier
    assert sum(result["categories"].values()) == pytest.approx(result["step_s"], rel=1e-12)


def test_device_counts_exposed_communication_only():
    events = [
        Event(name="train_step", start=0, end=100, thread=1),
        Event(name="aten::mm", start=1, end=2, thread=1, parent=0, id=11),
        Event(name="c10d::allreduce_", start=3, end=4, thread=1, parent=0, id=12),
        Event(name="sm90_gemm", start=10, end=50, device=True, link=11),
        Event(name="ncclDevKernel_AllReduce_Sum_bf16_RING_LL", start=40, end=70, device=True, link=12),
        Event(name="train_step", start=0, end=100, device=True),  # kineto's GPU annotation
    ]
    result = breakdown(events)
    ms = {k: v * 1e6 for k, v in result["categories"].items()}
    assert result["device"] == "cuda"
    assert ms["matmul"] == pytest.approx(40)
    assert ms["dp_comm"] == pytest.approx(20)  # 50..70: the part not hidden under the gemm
    assert ms["idle"] == pytest.approx(40)
