"""The GPU trial path: its pure helpers on the CPU, whole trials on a CUDA GPU.

The CUDA tests start real trials (fresh rank processes, NCCL, megatron DDP and
optimizer) on the tiny model, so they run in seconds on one GPU; on a CPU-only
machine they are skipped (tests/conftest.py).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from analysis.summary import headline
from core.config import ClusterConfig, Layout, ModelConfig, TrialConfig
from core.flops import palm_flops_per_token
from launch.gpu_trial import (
    Timeline,
    _loss_func,
    _use_fused_adam,
    achieved_rates,
    attention_flops_per_token,
    dense_matmul_flops_per_token,
)
from sweeper.validity import unsupported_reason

REPO = Path(__file__).resolve().parents[2]
LLAMA_1B3 = ModelConfig(name="llama_1b3", num_layers=24, hidden_size=2048, ffn_hidden_size=5632,
                        num_attention_heads=16, num_query_groups=16, vocab_size=32000, seq_length=2048)


def _report_module():
    spec = importlib.util.spec_from_file_location("gpu_sweep_report", REPO / "benchmarks" / "gpu_sweep_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- pure helpers ---------------------------------------------------------------------

def test_flop_counts_split_palm_into_matmuls_attention_and_norms():
    m = LLAMA_1B3
    norms = 6.0 * (2 * m.num_layers + 1) * m.hidden_size  # norm weights: in N, but no matmul
    attention_full = 12.0 * m.num_layers * m.hidden_size * m.seq_length  # PaLM: s x s, not halved
    assert math.isclose(dense_matmul_flops_per_token(m) + norms + attention_full, palm_flops_per_token(m))
    assert math.isclose(attention_flops_per_token(m), attention_full / 2)  # causal: half the square


def test_achieved_rates_divide_model_flops_by_kernel_time():
    m, layout = LLAMA_1B3, Layout(mbs=4, gbs=16)
    tokens = 16 * m.seq_length
    breakdown = {"categories": {"matmul": 0.5, "attention": 0.1, "idle": 0.2}}
    rates = achieved_rates(breakdown, m, layout, world=1)
    assert rates["matmul_tflops"] == round(dense_matmul_flops_per_token(m) * tokens / 0.5 / 1e12, 1)
    assert rates["attention_tflops"] == round(attention_flops_per_token(m) * tokens / 0.1 / 1e12, 1)
    # Two GPUs share the same step's work: each does half.
    assert achieved_rates(breakdown, m, layout, world=2)["matmul_tflops"] == pytest.approx(
        rates["matmul_tflops"] / 2, abs=0.1)
    assert achieved_rates({"categories": {"idle": 1.0}}, m, layout, world=1) == {}


def test_timeline_marks_the_time_between_points(monkeypatch):
    import time

    clock = iter([10.0, 10.5, 12.0])  # construction, then each mark
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    timeline = Timeline()
    timeline.mark("a")
    timeline.mark("b")
    assert timeline.marks == {"a": 0.5, "b": 1.5}  # since the previous point, not since the start


def test_reported_loss_is_not_scaled_by_the_schedule():
    # megatron divides the returned loss in place by the micro-batch count; the
    # reported copy must keep the micro-batch mean (a bug the first GPU run caught).
    output = torch.tensor([[2.0, 4.0]], requires_grad=True)
    loss, reported = _loss_func(output)
    loss /= 8
    assert reported["loss"].item() == 3.0


class _Wrapped:  # what megatron's mixed-precision optimizers hold
    def __init__(self, opt):
        self.optimizer = opt


def test_fused_adam_switch_reaches_plain_and_chained_optimizers():
    params = [torch.nn.Parameter(torch.randn(8)) for _ in range(2)]
    plain, other = torch.optim.AdamW(params[:1], lr=1e-3), torch.optim.Adam(params[1:], lr=1e-3)
    chained = type("Chained", (), {"chained_optimizers": [_Wrapped(plain), _Wrapped(other)]})()
    _use_fused_adam(chained)
    for opt in (plain, other):
        assert all(g["fused"] and not g["foreach"] for g in opt.param_groups)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    plain.step()
    other.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, params))


def test_cuda_graph_axis_is_named_and_checked():
    assert not Layout().name.endswith("_cg1")  # names of earlier sweeps are unchanged
    assert Layout(cuda_graph=True).name.endswith("_cg1")
    gpu = ClusterConfig(device="cuda", gpus_per_node=2)
    assert "pp = 1" in unsupported_reason(gpu, Layout(cuda_graph=True, pp=2))
    assert unsupported_reason(gpu, Layout(cuda_graph=True)) is None
    assert "CUDA graphs" in unsupported_reason(ClusterConfig(), Layout(cuda_graph=True))


def _row(trial, mfu, mbs, attention="sdpa_cudnn", norm="triton", status="ok"):
    return {"trial": trial, "status": status, "mfu_palm": mfu, "mbs": mbs, "attention": attention,
            "norm": norm, "device": "NVIDIA H100 80GB HBM3"}


def test_headline_names_device_baseline_and_small_micro_batch_ratio():
    rows = [_row("best", 0.46, 8), _row("mbs1", 0.23, 1), _row("stock2", 0.19, 2, "megatron", "megatron"),
            _row("stock1", 0.12, 1, "megatron", "megatron"), _row("oom", None, 8, status="oom")]
    summary = headline(rows)
    assert summary["device"] == "NVIDIA H100 80GB HBM3"
    assert summary["baseline_trial"] == "stock2" and summary["baseline_mfu_palm"] == 0.19
    assert summary["best_mbs1_trial"] == "mbs1" and summary["mbs1_over_best"] == pytest.approx(0.5)
    assert headline([])["mbs1_over_best"] is None


# -- on a GPU -------------------------------------------------------------------------

def _gpu_trial(tmp_path, *, steps=4, trial=None, **axes):
    from core.spec import TrialSpec
    from launch.trial import run_local

    layout = Layout(gbs=8, **axes)
    spec = TrialSpec(
        model=ModelConfig(),  # tiny: 4 layers, hidden 128
        cluster=ClusterConfig(name="one_gpu", device="cuda", gpus_per_node=1, gpu_memory_gb=70.0,
                              peak_tflops=989.4),
        layout=layout,
        trial=TrialConfig(warmup_steps=2, measure_steps=steps - 2, timeout_s=300, **(trial or {})),
        trial_dir=str(tmp_path / layout.name),
    )
    return run_local(spec)


@pytest.mark.cuda
def test_gpu_trial_records_steps_losses_and_memory(tmp_path):
    record = _gpu_trial(tmp_path, mbs=2, distributed_optimizer=True)
    assert record["status"] == "ok", record.get("reason")
    assert len(record["losses"]) == 4 and all(math.isfinite(x) for x in record["losses"])
    # An untrained tiny model starts near ln(vocab).
    assert abs(record["losses"][0] - math.log(1024)) < 1.0
    rank = record["ranks"][0]
    assert rank["peak_memory_allocated_gb"] <= rank["peak_memory_gb"] <= rank["mem_get_info_used_gb"]
    assert record["mfu"]["palm"] > 0


@pytest.mark.cuda
def test_gpu_losses_agree_across_kernels_and_recompute_over_20_steps(tmp_path):
    from analysis.parity import parity

    variants = [dict(attention="megatron", norm="megatron"), dict(attention="sdpa_cudnn", norm="triton"),
                dict(attention="triton", norm="torch"), dict(attention="sdpa_cudnn", norm="triton",
                                                             recompute="full")]
    records = [_gpu_trial(tmp_path, steps=20, mbs=2, **v) for v in variants]
    # The negative control: a wrong (non-causal) mask must FAIL in the same run.
    records.append(_gpu_trial(tmp_path / "control", steps=20, mbs=2, trial={"plant": "non_causal"},
                              attention="sdpa_cudnn", norm="triton"))
    assert all(r["status"] == "ok" for r in records), [r.get("reason") for r in records]
    result = parity(records)  # analysis.parity: bounds from these variants' spread
    assert result["steps"] == 20 and result["passed"], result["reason"]
    assert [row["control"] for row in result["trials"] if row["control"]] == ["non_causal"]


def test_peer_runs_are_compared_by_step_time_and_rescored_under_palm():
    from dataclasses import asdict

    report = _report_module()
    cluster = ClusterConfig(name="one_gpu", device="cuda", gpus_per_node=1, peak_tflops=989.4)
    records = [{"status": "ok", "model": asdict(LLAMA_1B3), "cluster": asdict(cluster), "layout": {"gbs": 16}}]
    probe = {"mcore": [{"mbs": 1, "gbs": 16, "seq": 2048, "step_s": 1.6},
                       {"mbs": 4, "gbs": 16, "seq": 2048, "step_s": 0.8},
                       {"mbs": 8, "gbs": 16, "seq": 2048, "error": "OutOfMemoryError"},
                       {"mbs": 4, "gbs": 32, "seq": 2048, "step_s": 0.1}]}  # another batch: not comparable
    peer = report.peer_comparison(probe, records, best_step_s=0.4)
    assert [r["mbs"] for r in peer["runs"]] == [1, 4]
    assert peer["best_mbs"] == 4 and peer["speedup_of_best"] == pytest.approx(2.0)
    tokens_per_s = 16 * 2048 / 0.8
    expected = tokens_per_s * palm_flops_per_token(LLAMA_1B3) / 989.4e12
    assert peer["best_mfu_palm"] == pytest.approx(expected)
    assert report.peer_comparison(probe, [], best_step_s=0.4) == {}
