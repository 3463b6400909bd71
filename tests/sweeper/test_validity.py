"""The validity rules: each returns the reason megatron-core would reject a layout."""

import dataclasses

from core.config import ClusterConfig, Layout, ModelConfig
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


# -- each rule at its boundary, with only that rule firing --------------------------------

def test_interleaving_needs_microbatches_divisible_by_pp_not_vpp():
    # pp 2, vpp 4 (8 layers: one per chunk), world 2 -> dp 1: 6 micro-batches split over 2 stages
    assert reason(pp=2, vpp=4, world=2, gbs=6) is None  # 6 % vpp 4 != 0 is fine
    # pp 4, vpp 2, world 4: 6 micro-batches do not split over 4 stages (6 % vpp 2 == 0)
    assert reason(pp=4, vpp=2, world=4, gbs=6) == (
        "interleaved pipeline needs the number of micro-batches (6) to be divisible by pp 4")
    assert reason(pp=4, vpp=2, world=4, gbs=8) is None
    # without interleaving, 1F1B takes any number of micro-batches
    assert reason(pp=4, world=4, gbs=6) is None


def test_sequence_parallel_needs_seq_length_divisible_by_tp():
    odd = dataclasses.replace(MODEL, seq_length=250)  # 250 % 4 = 2, 250 % 2 = 0
    assert reason(model=odd, tp=4, sequence_parallel=True, gbs=8) == (
        "seq_length 250 is not divisible by tp 4 (sequence parallel)")
    assert reason(model=odd, tp=2, sequence_parallel=True, gbs=8) is None
    assert reason(model=odd, tp=4, gbs=8) is None  # without sp the sequence is not split


def test_ffn_must_split_over_tp():
    model = dataclasses.replace(MODEL, ffn_hidden_size=690)  # 690 % 2 = 0, 690 % 4 = 2
    assert reason(model=model, tp=4, gbs=8) == "ffn_hidden_size 690 is not divisible by tp 4"
    assert reason(model=model, tp=2, gbs=8) is None


def test_recompute_num_layers_may_equal_the_layers_per_stage():
    # pp 2 -> 4 layers per stage: recomputing all 4 is allowed, 5 is not
    assert reason(pp=2, recompute="full", recompute_num_layers=4, gbs=8) is None
    assert reason(pp=2, recompute="full", recompute_method="block", recompute_num_layers=4, gbs=8) is None
    assert reason(pp=2, recompute="full", recompute_method="block", recompute_num_layers=5, gbs=8) == (
        "recompute_num_layers 5 exceeds the 4 layers per pipeline stage")
    assert reason(pp=2, recompute="full", recompute_num_layers=2, gbs=8) is None  # 2 divides 4


def test_uniform_recompute_groups_must_divide_the_layers_of_a_chunk_not_a_stage():
    # pp 2, vpp 2 -> 4 layers per stage, 2 per chunk: groups of 4 fit a stage, not a chunk
    assert reason(pp=2, vpp=2, world=2, recompute="full", recompute_num_layers=4, gbs=8) == (
        "uniform recompute groups of 4 do not divide the 2 layers per model chunk")
    assert reason(pp=2, vpp=2, world=2, recompute="full", recompute_num_layers=2, gbs=8) is None


def test_recompute_layer_rules_apply_to_full_recompute_only():
    for recompute in ("none", "selective"):
        assert reason(pp=2, recompute=recompute, recompute_num_layers=5, gbs=8) is None, recompute


def test_the_batch_must_split_exactly():
    # world 8, tp 2 -> dp 4: mbs 3 * dp 4 = 12 divides 24 but not 18
    assert reason(tp=2, mbs=3, gbs=24) is None
    assert reason(tp=2, mbs=3, gbs=18) == "gbs 18 is not divisible by mbs*dp = 3*4 = 12"


def test_the_world_check_counts_context_parallel():
    assert reason(tp=2, pp=2, cp=4).startswith("world size 8 is not divisible by tp*pp*cp = 2*2*4 = 16")
    assert "Transformer Engine" in reason(tp=2, pp=2, cp=2, gbs=8)  # 8 ranks divide: the cp rule fires


def test_fused_loss_needs_an_unsplit_vocabulary():
    assert reason(tp=2, loss="fused", gbs=8) == "loss=fused does not split the vocabulary: it needs tp = 1"
    assert reason(tp=1, loss="fused", gbs=8) is None


def test_fused_qkv_grad_needs_our_rope_attention():
    assert reason(attention="megatron", qkv_grad="fused", gbs=8) == (
        "qkv_grad=fused is our RoPE's backward: it needs an attention of ours (not megatron)")
    assert reason(attention="sdpa", qkv_grad="fused", gbs=8) is None


def test_overwriting_grad_buffer_needs_one_microbatch_per_step():
    # 8 ranks of dp at mbs 1: gbs 8 is one micro-batch per step, gbs 16 two.
    assert reason(grad_buffer="overwrite", gbs=8) is None
    assert reason(grad_buffer="overwrite", gbs=16) == (
        "grad_buffer=overwrite needs one micro-batch per step (gbs = mbs * dp), got 2")
    assert reason(grad_buffer="megatron", gbs=16) is None
    assert reason(grad_buffer="overwrite", pp=2, gbs=4) == "grad_buffer=overwrite needs pp = 1 (one micro-batch per step)"


def test_deferred_wgrad_needs_no_pipeline_and_lets_the_buffer_be_overwritten():
    # 8 ranks of dp at mbs 1, gbs 32: four micro-batches per step.
    assert reason(wgrad_defer="step", gbs=32) is None
    assert reason(wgrad_defer="step", gbs=32, tp=2, sequence_parallel=True) is None
    assert reason(wgrad_defer="step", pp=2, gbs=32) == (
        "wgrad_defer=step needs pp = 1 (one chunk, each backward right after its forward)")
    assert reason(wgrad_defer="step", grad_buffer="overwrite", gbs=32) is None  # flush writes, beta 0
    assert reason(wgrad_defer="off", grad_buffer="overwrite", gbs=32) == (
        "grad_buffer=overwrite needs one micro-batch per step (gbs = mbs * dp), got 4")
    assert reason(wgrad_defer="step", grad_buffer="overwrite", pp=2, gbs=32) == (
        "grad_buffer=overwrite needs pp = 1 (one micro-batch per step)")
    assert reason(wgrad_defer="always", gbs=8) == "wgrad_defer must be one of off, step, got 'always'"
    assert Layout(wgrad_defer="step").name.endswith("_defer-step")
    assert "defer" not in Layout().name


def test_fused_embedding_grad_takes_any_split_and_a_typo_is_refused():
    """kernels/embedding.py masks the other ranks' rows as megatron does and leaves the output's
    reduce (or SP reduce-scatter) to megatron; on later pipeline stages there is no embedding.
    The model presets never tie the output layer to the embedding (launch/model.py)."""
    for axes in (dict(tp=2, sequence_parallel=True), dict(tp=4), dict(pp=2, vpp=2), dict(tp=2, mbs=2)):
        assert reason(embedding_grad="fused", gbs=8, **axes) is None, axes
    assert reason(embedding_grad="sparse", gbs=8) == "embedding_grad must be one of megatron, fused, got 'sparse'"
    assert unsupported_reason(ClusterConfig(device="cpu"), Layout(embedding_grad="fused")) == (
        "needs CUDA: embedding_grad=fused")
    assert Layout(embedding_grad="fused").name.endswith("_embgrad-fused")
    assert "embgrad" not in Layout().name  # off: the name earlier sweeps resume by


def test_every_allowed_kernel_value_is_valid_and_a_typo_is_not():
    from core.choices import ATTENTION_KERNELS, NORM_KERNELS

    for attention in ATTENTION_KERNELS:
        if attention != "flash_attn":  # its head-dim rule is kernels/attention_fa4's
            assert reason(attention=attention, gbs=8) is None, attention
    for norm in NORM_KERNELS:
        assert reason(norm=norm, gbs=8) is None, norm
    assert reason(attention="tritonn", gbs=8).startswith("attention must be one of")
    assert reason(norm="rms", gbs=8).startswith("norm must be one of")


# -- what a CPU cluster cannot run: the exact reason --------------------------------------

CPU, GPU = ClusterConfig(device="cpu"), ClusterConfig(device="cuda")


def test_the_needs_cuda_reason_lists_every_missing_part_in_order():
    layout = Layout(distributed_optimizer=True, cuda_graph=True, attention="sdpa_flash", swiglu="triton")
    assert unsupported_reason(CPU, layout) == (
        "needs CUDA: distributed optimizer, CUDA graphs, attention=sdpa_flash, swiglu=triton")
    assert unsupported_reason(GPU, layout) is None


def test_each_cuda_only_attention_needs_cuda_and_the_others_do_not():
    for attention in ("sdpa_flash", "sdpa_cudnn", "megatron"):
        assert unsupported_reason(CPU, Layout(attention=attention)) == f"needs CUDA: attention={attention}"
    for attention in ("sdpa", "triton"):
        assert unsupported_reason(CPU, Layout(attention=attention)) is None


def test_each_fusion_off_its_default_needs_cuda_but_the_deferral():
    from core.choices import FUSION_CHOICES
    from sweeper.validity import CPU_FUSIONS

    for axis, choices in FUSION_CHOICES.items():
        for value in choices[1:]:
            expected = None if axis in CPU_FUSIONS else f"needs CUDA: {axis}={value}"
            assert unsupported_reason(CPU, Layout(**{axis: value})) == expected
    assert CPU_FUSIONS == ("wgrad_defer",)  # the CPU path runs it through the fp32 addmm


def test_cuda_graphs_need_pp_1_on_any_device():
    for cluster in (CPU, GPU):
        assert unsupported_reason(cluster, Layout(cuda_graph=True, pp=2)) == (
            "cuda_graph captures the non-pipelined schedule only (pp = 1)")
    assert unsupported_reason(GPU, Layout(cuda_graph=True, pp=1)) is None


def test_flash_attn_without_the_package_is_unsupported_even_on_gpu(monkeypatch):
    from core import choices

    monkeypatch.setattr(choices, "fa4_installed", lambda: False)
    assert unsupported_reason(GPU, Layout(attention="flash_attn")) == "flash-attn-4 not installed"
    monkeypatch.setattr(choices, "fa4_installed", lambda: True)
    assert unsupported_reason(GPU, Layout(attention="flash_attn")) is None
    assert unsupported_reason(CPU, Layout(attention="flash_attn")) == "needs CUDA: attention=flash_attn"
