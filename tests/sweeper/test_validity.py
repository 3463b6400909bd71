"""The validity rules: each returns the reason megatron-core would reject a layout."""

import dataclasses

from sweeper.config import ClusterConfig, Layout, ModelConfig
from sweeper.validity import invalid_reason, unsupported_reason

MODEL = ModelConfig(name="m", num_layers=8, hidden_size=256, ffn_hidden_size=688,
                    num_attention_heads=8, num_query_groups=4, vocab_size=1000, seq_length=256)


def reason(world=8, model=MODEL, **layout):
    return invalid_reason(model, Layout(**layout), world)


def test_a_plain_layout_is_valid():
    assert reason(tp=2, pp=2, mbs=1, gbs=8) is None


def test_world_must_split_into_tp_pp_cp():
    assert reason(tp=3).startswith("world size 8 is not divisible by tp*pp*cp = 3*1*1 = 3")


def test_kv_groups_and_layers_must_split():
    assert reason(tp=8, gbs=8) == "num_query_groups 4 is not divisible by tp 8"
    model = dataclasses.replace(MODEL, num_layers=12)
    assert reason(model=model, pp=8, gbs=8) == "num_layers 12 is not divisible by pp 8"


def test_heads_divisibility_is_checked_before_groups():
    model = dataclasses.replace(MODEL, num_attention_heads=6, num_query_groups=6, hidden_size=192)
    assert "num_attention_heads 6 is not divisible by tp 4" in reason(model=model, tp=4, gbs=8)


def test_batch_must_split_over_microbatches_and_dp():
    # world 8, tp 2 -> dp 4; mbs 3 * dp 4 = 12 does not divide 8
    assert "gbs 8 is not divisible by mbs*dp = 3*4 = 12" == reason(tp=2, mbs=3, gbs=8)


def test_sequence_parallel_needs_tp():
    assert reason(sequence_parallel=True, gbs=8) == "sequence parallel needs tp > 1"
    assert reason(tp=2, sequence_parallel=True, gbs=8) is None


def test_virtual_pipeline_rules():
    assert reason(vpp=2, gbs=8) == "virtual pipeline (vpp > 1) needs pp > 1"
    assert "not divisible by pp*vpp = 8" in reason(pp=2, vpp=4, world=2, gbs=8,
                                                    model=dataclasses.replace(MODEL, num_layers=12))
    # 8 layers, pp 2, vpp 2 -> 2 layers per chunk; world 2 -> dp 1; 3 micro-batches not divisible by pp
    assert "micro-batches (3)" in reason(pp=2, vpp=2, world=2, gbs=3)
    assert reason(pp=2, vpp=2, world=2, gbs=4) is None


def test_recompute_rules():
    assert "exceeds the 4 layers per pipeline stage" in reason(pp=2, recompute="full", recompute_num_layers=5, gbs=8)
    assert "do not divide the 4 layers" in reason(pp=2, recompute="full", recompute_num_layers=3, gbs=8)
    assert reason(pp=2, recompute="full", recompute_method="block", recompute_num_layers=3, gbs=8) is None
    assert "recompute must be one of" in reason(recompute="some", gbs=8)


def test_context_parallel_is_rejected_with_the_reason():
    assert "Transformer Engine" in reason(cp=2, gbs=8)


def test_non_positive_axes_and_unknown_kernels():
    assert reason(tp=0) == "tp must be a positive integer, got 0"
    assert reason(mbs=-1) == "mbs must be a positive integer, got -1"
    assert "attention must be one of" in reason(attention="flash3", gbs=8)


def test_triton_attention_head_dim():
    model = dataclasses.replace(MODEL, hidden_size=8 * 80)  # head_dim 80
    assert "head_dim" in reason(model=model, attention="triton", gbs=8)


def test_cpu_cluster_reports_what_needs_cuda():
    cpu = ClusterConfig(device="cpu")
    gpu = ClusterConfig(device="cuda")
    layout = Layout(pp=2, recompute="selective", distributed_optimizer=True, attention="sdpa_cudnn")
    message = unsupported_reason(cpu, layout)
    assert message.startswith("needs CUDA:")
    assert "distributed optimizer" in message and "sdpa_cudnn" in message
    assert "pipeline" not in message and "recompute" not in message  # the CPU path runs those
    assert unsupported_reason(gpu, layout) is None
    assert unsupported_reason(cpu, Layout(tp=2, attention="sdpa", norm="triton")) is None
    # every 3D axis runs on CPU (launch/cpu_trial.py): pp, vpp, sp and each recompute
    for axes in (dict(pp=2, vpp=2), dict(tp=2, sequence_parallel=True), dict(recompute="selective"),
                 dict(recompute="full", recompute_method="block")):
        assert unsupported_reason(cpu, Layout(**axes)) is None, axes
