"""The memory model, term by term, against values worked out by hand from its assumptions.

The small model used throughout: L=4, h=64, f=128, a=4 heads, g=2 KV groups
(head_dim 16, so q=64, kv=32), V=1000 (padded to 1024), s=32.
"""

import dataclasses
from pathlib import Path

import pytest

from analysis.ranking import load_archived_records
from core.config import ClusterConfig, Layout, ModelConfig, layout_from_dict
from sweeper.calibration import measured_memory
from sweeper.constants import Calibration
from sweeper.memory import (
    GIB,
    chunk_activations,
    in_flight,
    layer_bytes,
    logits_bytes,
    model_shape,
    padded_vocab,
    predict_memory,
    stage_params,
)

SMALL = ModelConfig(name="small", num_layers=4, hidden_size=64, ffn_hidden_size=128,
                    num_attention_heads=4, num_query_groups=2, vocab_size=1000, seq_length=32)
GPU = ClusterConfig(name="gpu", device="cuda", gpus_per_node=8, nodes=1, gpu_memory_gb=80.0,
                    peak_tflops=1000.0, intra_node_bw_gbps=400.0, inter_node_bw_gbps=50.0)
CPU = ClusterConfig(name="cpu", device="cpu", gpus_per_node=2, nodes=1, gpu_memory_gb=8.0)
# No overhead and no optimizer-step temporary, so the activation terms show on their own.
BARE = Calibration(fragmentation=0.0, framework_gb=0.0, comm_buffer_gb=0.0, optimizer_temp_bytes=0.0)
SH = model_shape(SMALL)

# Per layer at mbs=2 (T = 64 tokens), tp=1, bf16 (e=2):
#   two norms save input + fp32 1/rms: 2 * (2*64 + 4) * 64          = 16896
#   inputs of the QKV and fc1 linears:  2 * 2 * 64 * 64             = 16384
#   fused QKV output (V is a view):     2 * 64 * (64 + 2*32)        = 16384
#   Q, K after RoPE:                    2 * 64 * (64 + 32)          = 12288
#   fp32 log-sum-exp:                   4 * 64 * 4                  =  1024
#   attention output = projection input: 2 * 64 * 64                =  8192
#   fused SwiGLU: fc1 out (2f), product (f): 3 * 2 * 64 * 128       = 49152
UNSHARDED = 16896 + 16384  # whole on every TP rank without SP
SHARDED = 16384 + 12288 + 1024 + 8192 + 49152
FULL_LAYER = UNSHARDED + SHARDED  # 120320
CORE = 12288 + 1024  # what selective recompute drops: our adapters rotate inside core attention


def test_padded_vocab_is_a_multiple_of_128_per_tp_rank():
    assert padded_vocab(1000, 1) == 1024
    assert padded_vocab(1000, 8) == 1024
    assert padded_vocab(1025, 8) == 2048
    assert padded_vocab(32000, 1) == 32000


def test_stage_params_put_embedding_first_and_output_layer_last():
    # Per layer: h*(q+2kv) + q*h + 3*h*f = 64*128 + 64*64 + 3*64*128 = 36864 matrices,
    # 128 norm weights. tp=2, pp=2: 2 layers * (36864/2 + 128) = 37120 per stage;
    # vocabulary table 1024*64/2 = 32768 per rank; the last stage adds the final norm (64).
    layout = Layout(tp=2, pp=2)
    assert stage_params(SH, layout, 0) == 37120 + 32768
    assert stage_params(SH, layout, 1) == 37120 + 32768 + 64
    # pp=1: everything on one stage, equal to the model's count with the padded vocab.
    whole = stage_params(SH, Layout(), 0)
    assert whole == SMALL.num_params() + 2 * (1024 - 1000) * 64


def test_weights_grads_and_optimizer_bytes_per_param():
    params = stage_params(SH, Layout(), 0)
    est = predict_memory(SMALL, GPU, Layout(mbs=1, gbs=8), BARE, dp=1)
    assert est.terms["weights"] == pytest.approx(2 * params / GIB)  # bf16
    assert est.terms["grads"] == pytest.approx(4 * params / GIB)  # fp32 grad buffer
    assert est.terms["optimizer"] == pytest.approx(12 * params / GIB)  # fp32 main + 2 moments


def test_distributed_optimizer_shards_the_optimizer_over_dp_times_cp():
    params = stage_params(SH, Layout(), 0)
    layout = Layout(mbs=1, gbs=8, distributed_optimizer=True)
    est = predict_memory(SMALL, GPU, layout, BARE, dp=4)
    assert est.terms["optimizer"] == pytest.approx(12 * params / 4 / GIB)
    assert est.terms["grads"] == pytest.approx(4 * params / GIB)  # grads are not sharded
    cp2 = predict_memory(SMALL, GPU, dataclasses.replace(layout, cp=2), BARE, dp=4)
    assert cp2.terms["optimizer"] == pytest.approx(12 * params / 8 / GIB)


def test_cpu_path_is_fp32_with_plain_adamw():
    params = stage_params(SH, Layout(), 0)
    est = predict_memory(SMALL, CPU, Layout(mbs=1, gbs=8, distributed_optimizer=True), BARE, dp=1)
    assert est.terms["weights"] == pytest.approx(4 * params / GIB)
    assert est.terms["grads"] == pytest.approx(4 * params / GIB)
    assert est.terms["optimizer"] == pytest.approx(8 * params / GIB)  # no main copy, no sharding
    # fp32 activations are twice the bf16 ones, except the norms' 1/rms (4 B per token,
    # two norms) and the attention's log-sum-exp (4 B per token and head), fp32 in both.
    gpu_layer = layer_bytes(SH, Layout(mbs=2), cpu=False)
    cpu_layer = layer_bytes(SH, Layout(mbs=2), cpu=True)
    assert cpu_layer.mlp_workspace == 2 * gpu_layer.mlp_workspace
    # ...and unfused SwiGLU keeps silu's output too (f per token, fp32).
    assert cpu_layer.full == 2 * FULL_LAYER - 4 * 64 * 2 - 4 * 64 * 4 + 4 * 64 * 128


def test_layer_activations_fused_attention():
    lb = layer_bytes(SH, Layout(mbs=2), cpu=False)
    assert lb.full == FULL_LAYER
    assert lb.core == CORE
    assert lb.checkpoint == 2 * 64 * 64


def test_fused_kernels_save_the_same_and_cudnn_repeats_kv_for_gqa():
    # The H100 sweep measured one peak for triton, sdpa_flash and sdpa_cudnn (MHA): every
    # output lands in [s, b, h*d] order, so no copy for the projection.
    for kernel in ("triton", "sdpa", "sdpa_flash"):
        assert layer_bytes(SH, Layout(mbs=2, attention=kernel), cpu=False).full == FULL_LAYER
    # cuDNN takes no enable_gqa: K, V repeated to 4 heads (2 * 2*64*64) replace K after
    # RoPE and the fused QKV output: Q (8192) + 16384 instead of 16384 + 12288.
    cudnn = layer_bytes(SH, Layout(mbs=2, attention="sdpa_cudnn"), cpu=False)
    assert cudnn.full == FULL_LAYER - (16384 + 12288) + 3 * 8192
    assert cudnn.core == 3 * 8192 - 16384 + 1024  # the checkpoint keeps the QKV output


def test_tensor_parallel_without_sp_leaves_norm_and_linear_inputs_whole():
    lb = layer_bytes(SH, Layout(mbs=2, tp=2), cpu=False)
    assert lb.full == UNSHARDED + SHARDED / 2


def test_sequence_parallel_shards_everything():
    lb = layer_bytes(SH, Layout(mbs=2, tp=2, sequence_parallel=True), cpu=False)
    assert lb.full == FULL_LAYER / 2
    assert lb.checkpoint == 2 * 64 * 64 / 2


def test_unfused_attention_keeps_the_scores():
    # scores per layer: b * a * s * s = 2 * 4 * 32 * 32 = 8192; fp32 softmax + bf16
    # probabilities = 6 bytes each. GQA: K and V are repeated to all 4 heads, so Q, K, V
    # are 3 * 2 * 64 * 64 = 24576 instead of the fused path's 16384 + 12288.
    lb = layer_bytes(SH, Layout(mbs=2, attention="megatron"), cpu=False)
    assert lb.full == UNSHARDED + 24576 + 6 * 8192 + 8192 + 49152
    # Selective recompute keeps megatron's core-attention inputs: Q, K after RoPE and the
    # QKV output (16384 + 12288), more than the repeated tensors it drops.
    assert lb.core == 24576 - (16384 + 12288) + 6 * 8192
    assert lb.attention_workspace == 10 * 8192
    fused = layer_bytes(SH, Layout(mbs=2, attention="sdpa"), cpu=False)
    assert fused.attention_workspace == (4 + 2) * 64 * 64 + 2 * 2 * 64 * 32  # dq fp32 + bf16, dk, dv


def test_context_parallel_splits_the_sequence_and_keeps_ring_kv():
    lb = layer_bytes(SH, Layout(mbs=2, cp=2), cpu=False)
    # T = 32 tokens; plus K, V from the other rank: 2 * 2 * 32 * 32 = 4096.
    assert lb.full == FULL_LAYER / 2 + 4096


def test_recompute_choices():
    lb = layer_bytes(SH, Layout(mbs=2), cpu=False)
    none = chunk_activations(lb, Layout(), 4)
    assert none == (4 * FULL_LAYER, 0.0)
    selective = chunk_activations(lb, Layout(recompute="selective"), 4)
    assert selective == (4 * (FULL_LAYER - CORE), CORE)
    uniform2 = chunk_activations(lb, Layout(recompute="full", recompute_num_layers=2), 4)
    assert uniform2 == (2 * 8192, 2 * FULL_LAYER)  # 2 checkpoints, 2 layers re-materialised
    block1 = chunk_activations(lb, Layout(recompute="full", recompute_method="block",
                                          recompute_num_layers=1), 4)
    assert block1 == (8192 + 3 * FULL_LAYER, FULL_LAYER)


def test_in_flight_microbatches_1f1b_and_interleaved():
    assert in_flight(Layout(pp=4), 0, 8) == 4
    assert in_flight(Layout(pp=4), 3, 8) == 1
    assert in_flight(Layout(pp=4), 0, 2) == 2  # fewer micro-batches than stages
    assert in_flight(Layout(pp=1), 0, 8) == 1
    # Interleaved: chunks * layers per chunk equals Megatron's L * (1 + (p-1)/(p*v)).
    for pp, vpp in ((2, 2), (4, 2), (4, 3), (8, 4)):
        layers = 48
        chunks = in_flight(Layout(pp=pp, vpp=vpp), 0, 64)
        assert chunks * layers / (pp * vpp) == pytest.approx(layers * (1 + (pp - 1) / (pp * vpp)))


def test_logits_and_loss_on_the_last_stage():
    saved, transient = logits_bytes(SH, Layout(mbs=2), cpu=False)
    # final norm input + output (2 * 2 * 64 + 4 per token) and the fp32 softmax of 1024 logits.
    assert saved == (2 * 2 * 64 + 4) * 64 + 4 * 64 * 1024
    # bf16 logits + a second fp32 buffer while the fused cross entropy runs (10 B per
    # logit in all, the saved softmax's 4 included)
    assert transient == 6 * 64 * 1024
    saved_tp, _ = logits_bytes(SH, Layout(mbs=2, tp=2), cpu=False)
    assert saved_tp == (2 * 2 * 64 + 4) * 64 + 4 * 64 * 512


def test_pp1_peak_is_activations_plus_the_larger_transient():
    layout = Layout(mbs=2, gbs=8)
    est = predict_memory(SMALL, GPU, layout, BARE, dp=1)
    params = stage_params(SH, layout, 0)
    saved, transient = logits_bytes(SH, layout, cpu=False)
    lb = layer_bytes(SH, layout, cpu=False)
    activations = 4 * FULL_LAYER + 8 * 64  # 4 layers + int64 token ids
    assert lb.mlp_workspace < saved + transient  # the logits are this model's transient
    expected = 18 * params + activations + saved + transient
    assert est.phase == "activations"
    assert est.allocated_gb == pytest.approx(expected / GIB)
    assert est.terms["activations"] == pytest.approx(activations / GIB)
    assert est.terms["logits"] == pytest.approx((saved + transient) / GIB)


def test_optimizer_step_can_be_the_peak():
    # A long model with a tiny batch: Adam's 4 B/param temporary beats the activations.
    big = dataclasses.replace(SMALL, num_layers=64, seq_length=8)
    cal = dataclasses.replace(BARE, optimizer_temp_bytes=4.0)
    est = predict_memory(big, GPU, Layout(mbs=1, gbs=8), cal, dp=1)
    params = stage_params(model_shape(big), Layout(), 0)
    assert est.phase == "optimizer"
    assert est.allocated_gb == pytest.approx(22 * params / GIB)
    assert est.terms["activations"] == 0.0
    assert est.terms["optimizer_step"] == pytest.approx(4 * params / GIB)
    sharded = predict_memory(big, GPU, Layout(mbs=1, gbs=8, distributed_optimizer=True), cal, dp=2)
    assert sharded.terms["optimizer_step"] == pytest.approx(4 * params / 2 / GIB)


def test_cpu_data_parallel_flattens_the_gradients():
    big = dataclasses.replace(SMALL, num_layers=64, seq_length=8)
    params = stage_params(model_shape(big), Layout(), 0)
    alone = predict_memory(big, CPU, Layout(mbs=1, gbs=8), BARE, dp=1)
    assert alone.terms["optimizer_step"] == 0.0
    est = predict_memory(big, CPU, Layout(mbs=1, gbs=8), BARE, dp=2)
    assert est.phase == "optimizer"
    assert est.terms["optimizer_step"] == pytest.approx(4 * params / GIB)


def test_overhead_terms_and_fits():
    cal = Calibration(fragmentation=0.1, framework_gb=2.0, comm_buffer_gb=0.5)
    layout = Layout(tp=2, pp=2, mbs=2, gbs=8)
    est = predict_memory(SMALL, GPU, layout, cal, dp=2)
    assert est.terms["fragmentation"] == pytest.approx(0.1 * est.allocated_gb)
    assert est.terms["comm_buffers"] == pytest.approx(3 * 0.5)  # tp, dp and pp communicators
    assert est.peak_gb == pytest.approx(1.1 * est.allocated_gb + 2.0 + 1.5)
    assert sum(est.terms.values()) == pytest.approx(est.peak_gb)
    tight = dataclasses.replace(GPU, gpu_memory_gb=est.peak_gb * 0.999)
    assert predict_memory(SMALL, tight, layout, cal, dp=2).fits is False
    loose = dataclasses.replace(GPU, gpu_memory_gb=est.peak_gb * 1.001)
    assert predict_memory(SMALL, loose, layout, cal, dp=2).fits is True


def test_worst_stage_is_first_with_many_in_flight_and_last_with_a_large_vocabulary():
    # 16 layers, 4 per stage: stage 0 holds 4 micro-batches (4 * 4 * 120320 B), the last
    # one 1 micro-batch and the loss's 10 B per logit (4 * 120320 + 10 * 64 * 1024 B).
    deep = dataclasses.replace(SMALL, num_layers=16)
    layout = Layout(pp=4, mbs=2, gbs=64)
    assert predict_memory(deep, GPU, layout, BARE, dp=1).worst_stage == 0
    huge_vocab = dataclasses.replace(deep, vocab_size=256000)
    assert predict_memory(huge_vocab, GPU, layout, BARE, dp=1).worst_stage == 3


def test_calibration_scales_activations_and_offsets_the_peak():
    layout = Layout(mbs=2, gbs=8)
    base = predict_memory(SMALL, GPU, layout, BARE, dp=1)
    scaled = predict_memory(SMALL, GPU, layout, dataclasses.replace(BARE, activation_scale=2.0), dp=1)
    assert scaled.allocated_gb - base.allocated_gb == pytest.approx(base.dynamic_gb)
    shifted = predict_memory(SMALL, GPU, layout, dataclasses.replace(BARE, memory_offset_gb=1.5), dp=1)
    assert shifted.allocated_gb == pytest.approx(base.allocated_gb + 1.5)


LLAMA_1B3 = ModelConfig(name="llama_1b3", num_layers=24, hidden_size=2048, ffn_hidden_size=5632,
                        num_attention_heads=16, num_query_groups=16, vocab_size=32000, seq_length=2048)
H100 = ClusterConfig(name="local_gpu", device="cuda", gpus_per_node=1, nodes=1, gpu_memory_gb=79.1,
                     peak_tflops=989.4, intra_node_bw_gbps=450.0, inter_node_bw_gbps=50.0)


# The H100 sweep of 2026-11-23 (sweep=h100_single: 26 trials, mbs 1-8, every recompute
# mode, five attention kernels, CUDA graphs on and off), every record kept.
H100_TRIALS = Path(__file__).resolve().parents[2] / "benchmarks/results/gpu_sweep_2026-11-23_final_trials.tgz"


def test_defaults_match_every_recorded_h100_trial():
    # Tolerance: allocated within 1.5% on every trial (the model's terms are exact bytes;
    # what is left is the allocator's own small buffers); reserved within 3% (the
    # fragmentation the model takes as a constant 3% measured 1.8-4.9%).
    records = [r for r in load_archived_records(H100_TRIALS, "h100_single") if r["status"] == "ok"]
    assert len(records) == 26
    for r in records:
        allocated, reserved, _ = measured_memory(r)
        est = predict_memory(LLAMA_1B3, H100, layout_from_dict(r["layout"]), dp=1)
        assert est.allocated_gb == pytest.approx(allocated, rel=0.015), r["trial"]
        assert est.reserved_gb == pytest.approx(reserved, rel=0.03), r["trial"]
    # Negative control: 10% more activations than the terms say misses the large-mbs trials.
    off = Calibration(activation_scale=1.1)
    misses = [r for r in records if abs(predict_memory(LLAMA_1B3, H100, layout_from_dict(r["layout"]), off, dp=1)
                                          .allocated_gb / measured_memory(r)[0] - 1) > 0.015]
    assert len(misses) > 10


def test_unfused_attention_at_mbs4_does_not_fit_an_h100():
    layout = Layout(mbs=4, gbs=16, attention="megatron", norm="megatron")
    est = predict_memory(LLAMA_1B3, H100, layout)
    assert not est.fits
    assert est.terms["activations"] > 40  # mostly s x s scores: 24 layers * 1.5 GiB


def test_fused_loss_keeps_dx_and_one_chunk_of_logits():
    # kernels/fused_ce.py: saved = final norm input + 1/rms and dx, (2*2*64 + 4) * 64, plus
    # the fp32 weight gradient 4 * 1024 * 64; transient = one chunk of bf16 logits,
    # min(64 tokens, 4096) * 1024 * 2.
    saved, transient = logits_bytes(SH, Layout(mbs=2, loss="fused"), cpu=False)
    assert saved == (2 * 2 * 64 + 4) * 64 + 4 * 1024 * 64
    assert transient == 2 * 64 * 1024
    # Negative control: megatron's loss keeps the fp32 softmax and 10 B per logit at its peak.
    m_saved, m_transient = logits_bytes(SH, Layout(mbs=2), cpu=False)
    assert m_saved + m_transient - (saved + transient) == 10 * 64 * 1024 - 2 * 64 * 1024 - 4 * 1024 * 64


def test_deferred_wgrad_adds_its_arenas_and_drops_the_saved_linear_inputs():
    # Four micro-batches of mbs 2 (T = 64 tokens), bf16. Per layer and token the arenas hold
    # X and dY of QKV (64 + 128), proj (64 + 64), fc1 (64 + 256), fc2 (128 + 64) = 832
    # elements: 4 slots * 64 tokens * 832 * 2 B * 4 layers.
    off, on = Layout(mbs=2, gbs=8), Layout(mbs=2, gbs=8, wgrad_defer="step")
    arena = 4 * 64 * 832 * 2 * 4
    # Autograd no longer saves the QKV and fc1 inputs (2 * 2 B * 64 * 64) or fc2's (2 B * 64 * 128).
    freed = 2 * 2 * 64 * 64 + 2 * 64 * 128
    assert layer_bytes(SH, off, cpu=False).full - layer_bytes(SH, on, cpu=False).full == freed
    est_off = predict_memory(SMALL, GPU, off, BARE, dp=1)
    est_on = predict_memory(SMALL, GPU, on, BARE, dp=1)
    assert "wgrad_arena" not in est_off.terms
    assert est_on.terms["wgrad_arena"] == pytest.approx(arena / GIB)
    assert est_off.terms["activations"] - est_on.terms["activations"] == pytest.approx(4 * freed / GIB)
    assert sum(est_on.terms.values()) == pytest.approx(est_on.peak_gb)
    # tp 2 splits the out (QKV, fc1) and in (proj, fc2) widths, never the h sides: 256 + 288 / 2.
    tp2 = predict_memory(SMALL, GPU, dataclasses.replace(on, tp=2), BARE, dp=1)
    assert tp2.terms["wgrad_arena"] == pytest.approx(4 * 64 * (256 + 576 / 2) * 2 * 4 / GIB)


def test_triton_attention_backward_counts_its_ds_scratch():
    # kernels/attention.py's backward at head dim 128 on a GPU stores dS: whole KV heads of
    # group x s x s bf16 scores, as many as fit TRITON_DS_SCRATCH_BYTES (1 GiB).
    from core.choices import TRITON_DS_SCRATCH_BYTES

    wide = model_shape(dataclasses.replace(SMALL, hidden_size=512, seq_length=4096))  # d = 128
    base = dict(mbs=2, tp=1)
    triton = layer_bytes(wide, Layout(attention="triton", **base), cpu=False)
    sdpa = layer_bytes(wide, Layout(attention="sdpa", **base), cpu=False)
    per_kv_head = 2 * 4096 * 4096 * 2  # group 2, s x s, bf16: 64 MiB
    kv_heads = 2 * 2  # mbs x g
    assert triton.attention_workspace - sdpa.attention_workspace == kv_heads * per_kv_head
    # 16 KV heads (mbs 8) hold 1 GiB; 32 run in two chunks of 16: the scratch stays 1 GiB
    big = layer_bytes(wide, Layout(attention="triton", mbs=16, tp=1), cpu=False)
    assert big.attention_workspace - layer_bytes(
        wide, Layout(attention="sdpa", mbs=16, tp=1), cpu=False).attention_workspace == (
        TRITON_DS_SCRATCH_BYTES)
    # none where one KV head's dS alone is over the cap (the backward then runs without):
    # s = 16392, group 2: 2 x 16392^2 x 2 bytes, just over 1 GiB
    longer = model_shape(dataclasses.replace(SMALL, hidden_size=512, seq_length=16384 + 8))
    assert layer_bytes(longer, Layout(attention="triton", **base), cpu=False).attention_workspace == (
        layer_bytes(longer, Layout(attention="sdpa", **base), cpu=False).attention_workspace)
    # no scratch at other head dims (SMALL's 16) or on CPU
    assert layer_bytes(SH, Layout(attention="triton", **base), cpu=False).attention_workspace == (
        layer_bytes(SH, Layout(attention="sdpa", **base), cpu=False).attention_workspace)
    assert layer_bytes(wide, Layout(attention="triton", **base), cpu=True).attention_workspace == (
        layer_bytes(wide, Layout(attention="sdpa", **base), cpu=True).attention_workspace)
