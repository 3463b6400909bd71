"""Predicted step time and MFU of a dense Llama-style model under a parallel layout.

    est = predict_speed(model, cluster, layout)   # calibration=None: defaults
    est.step_time_s, est.mfu, est.mfu_megatron, est.tokens_per_s, est.terms

One micro-batch on one pipeline stage costs max(GPU time, host time) plus its
tensor- and context-parallel communication:
- GPU time: GEMM FLOPs at an efficiency that falls for small GEMMs; fused attention
  FLOPs at the kernel's efficiency, which falls with few (batch x heads) tiles; the stock unfused attention as its batched
  matmuls (the whole s x s, masked half included) plus the bytes its fp32 softmax
  moves; RMSNorm and the other elementwise ops (RoPE, SwiGLU, residuals, copies) as
  bytes at memory bandwidth; the output layer and cross entropy on the last stage.
  Recompute adds the recomputed forward. All of it is scaled by the fitted
  `compute_scale` of the attention kernel.
- host time: the eager launch cost per layer and per micro-batch (the step is
  launch-bound when micro-batches are small); a CUDA graph (layout.cuda_graph) replays
  the micro-batch in one launch, so the host no longer bounds it. Either way the GPU
  idles a little per micro-batch and per step (Calibration.microbatch_idle_s, step_overhead_s).
- TP: per layer, four all-reduces of the layer's activations (fwd and bwd; with SP
  the same bytes as all-gathers and reduce-scatters), six with full recompute.
  CP: the ring's K/V exchange, counted where it exceeds the attention it hides behind.
The step: m micro-batches of the slowest stage, the bubble (p-1)/(m*v) of that,
PP point-to-point per micro-batch and model chunk, the DP gradient reduction (fp32
all-reduce; reduce-scatter + bf16 all-gather with the distributed optimizer, over
dp*cp), and the optimizer step as bytes at memory bandwidth. A group whose ranks fit
in one node uses the intra-node bandwidth, else the inter-node one.
layout.wgrad_defer=step (kernels/wgrad_defer.py, pp = 1): see `_deferral`; the per-micro-batch
part is in the GPU time, the flush's main_grad traffic is the `wgrad_flush` term.
MFU: PaLM's and Megatron's conventions from core.flops (recompute not counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from core.config import ClusterConfig, Layout, ModelConfig
from core.flops import megatron_flops_per_token, palm_flops_per_token
from sweeper.constants import Calibration, default_calibration
from sweeper.memory import Shape, model_shape, padded_vocab, stage_params

# Bytes per token per layer moved by elementwise ops (fwd+bwd, bf16), per unit of
# width: residual adds and their gradients (h), unfused RoPE and the query / output
# reshapes (q), SwiGLU's silu and product (f).
ELEMENTWISE_BYTES = {"h": 24.0, "q": 64.0, "f": 26.0}
NORM_BYTES = 10.0  # per element, fwd (read x, write y) + bwd (read x, dy; write dx)
ADD_NORM_BYTES = 16.0  # residual add + norm fused: fwd reads 2 writes 2, bwd reads 3 writes 1
UNFUSED_SCORE_BYTES = 100.0  # per score, fwd+bwd: baddbmm, fp32 copy, scale, mask, softmax, cast (H100 sweep)
# megatron's fused cross entropy, fwd+bwd: bf16 read, fp32 written, exp and divide in
# place, the gradient in place and its bf16 copy.
CE_BYTES_PER_LOGIT = 40.0
# kernels/fused_ce.py: bf16 logits written once, read twice and overwritten with the gradient.
FUSED_CE_BYTES_PER_LOGIT = 8.0
# SwiGLU's bytes per f-element per token, fwd+bwd: megatron's compiled one (in
# ELEMENTWISE_BYTES["f"], with the residual's share) and kernels/swiglu.py's one pass
# each way (reads 2F writes F, reads 3F writes 2F: 16 B, at about 0.95 of copy speed).
SWIGLU_BYTES = {"megatron": 26.0, "triton": 17.0}
# Share of a layer's fwd+bwd time that its forward takes (what recompute repeats).
FORWARD_SHARE = 1.0 / 3.0
FUSED_ATTENTION_FORWARD_SHARE = 0.25  # flash backward recomputes the scores
UNFUSED_ATTENTION_FORWARD_SHARE = 0.45
# Extra host time per layer that recompute costs an eager step, as a share of the layer's
# launch time: the checkpoint's RNG-state save/restore and the re-run forward. H100 sweep
# (2026-11-23, eager mbs 2, 2 micro-batches): selective +1.6 ms, full +2.6 ms per layer.
RECOMPUTE_HOST_SHARE = {"none": 0.0, "selective": 0.4, "full": 0.6}
# fp32 main_grad traffic per decoder-linear weight element (layout.wgrad_defer): a beta-1
# weight-gradient GEMM reads and writes it (4 + 4), a beta-0 one (grad_buffer=overwrite)
# only writes it; megatron's zero_grad_buffer writes zeros over it once per step.
MAIN_GRAD_ACCUMULATE_BYTES = 8.0
MAIN_GRAD_WRITE_BYTES = 4.0
MAIN_GRAD_ZERO_BYTES = 4.0


@dataclass
class SpeedEstimate:
    step_time_s: float
    mfu: float  # PaLM convention, fraction of peak
    mfu_megatron: float
    tokens_per_s: float
    terms: dict  # seconds: compute, launch, tp_comm, cp_comm, bubble, pp_comm, dp_comm, optimizer, wgrad_flush


def _gemm_efficiency(cal: Calibration, tokens: float, width: float) -> float:
    return (cal.gemm_efficiency * tokens / (tokens + cal.gemm_half_tokens)
            * width / (width + cal.gemm_half_width))


def _attention_efficiency(cal: Calibration, layout: Layout, heads: float) -> float:
    """A fused kernel fills the GPU with (batch x heads) tiles: few of them, low efficiency."""
    kernel = cal.attention_efficiency.get(layout.attention, cal.attention_efficiency["sdpa"])
    if layout.attention == "megatron":
        return kernel  # batched matmuls over the whole square: large enough
    batch_heads = layout.mbs * heads
    return kernel * batch_heads / (batch_heads + cal.attention_half_heads)


def _layer_gpu_time(sh: Shape, layout: Layout, cal: Calibration, peak: float) -> tuple[float, float]:
    """(fwd+bwd seconds of one layer for one micro-batch, of which attention core)."""
    tp, cp = layout.tp, layout.cp
    T = layout.mbs * sh.s / cp
    gemm = 6.0 * T * sh.layer_matrix_params / tp
    gemm_time = gemm / (peak * _gemm_efficiency(cal, T, sh.h / tp))
    efficiency = _attention_efficiency(cal, layout, sh.a / tp)
    if layout.attention == "megatron":
        scores = T * sh.a / tp * sh.s / cp
        bmm = 12.0 * scores * sh.q / sh.a  # QK^T and PV over the full square, fwd+bwd
        attention = (bmm / (peak * efficiency)
                     + UNFUSED_SCORE_BYTES * scores / cal.memory_bytes_per_s)
    else:
        flops = 6.0 * T * sh.s * sh.q / tp  # causal: half the square, fwd+bwd
        attention = flops / (peak * efficiency)
    whole = 1.0 / tp if layout.sequence_parallel else 1.0
    fused_add = getattr(layout, "add_norm", "megatron") == "fused"
    # kernels/add_rmsnorm.py takes one residual add (12 B) and the pre-MLP norm (10 B) into
    # one kernel pair of 16 B per element, at the norm's bandwidth.
    residual = ELEMENTWISE_BYTES["h"] / 2 if fused_add else ELEMENTWISE_BYTES["h"]
    ew = T * (residual * sh.h * whole
              + (ELEMENTWISE_BYTES["q"] * sh.q
                 + SWIGLU_BYTES.get(getattr(layout, "swiglu", "megatron"), ELEMENTWISE_BYTES["f"]) * sh.f) / tp)
    norms = (NORM_BYTES + (ADD_NORM_BYTES if fused_add else NORM_BYTES)) * T * sh.h * whole
    norm_bw = cal.memory_bytes_per_s * cal.norm_efficiency.get(layout.norm, 0.3)
    other = ew / cal.memory_bytes_per_s + norms / norm_bw
    return gemm_time + attention + other, attention


def _recompute_share(layout: Layout, layers: int, attention: float, layer: float) -> float:
    """Extra time per layer, averaged over the chunk, that recompute adds."""
    if layout.recompute == "none":
        return 0.0
    attn_fwd = (UNFUSED_ATTENTION_FORWARD_SHARE if layout.attention == "megatron"
                else FUSED_ATTENTION_FORWARD_SHARE) * attention
    if layout.recompute == "selective":
        return attn_fwd
    full = FORWARD_SHARE * (layer - attention) + attn_fwd
    if layout.recompute_method == "block":
        return full * min(layout.recompute_num_layers, layers) / layers
    return full


def arena_copy_elements(sh: Shape, layout: Layout, layers: int) -> float:
    """Elements per token that the deferred linears of `layers` layers copy into their arenas per
    micro-batch: the X and dY that no producer writes into the slot (kernels/defer_wiring.py).
    The attention output (proj's X) is copied unless flash-attn-4 writes it into the slot
    (kernels/attention_fa4.py; SDPA's and our Triton kernel's outputs are their own
    allocations); the rest only where its producer is not ours: QKV's X without our input norm (a fused add+norm still writes layers 2.., the first
    one's comes from the input norm), QKV's dY without the fused RoPE gradient, proj's and
    fc2's dY without the fused add+norm (fc2's last one also needs our final norm), fc1's X
    without our pre-MLP norm, fc1's dY and fc2's X without our SwiGLU. Under recompute nothing
    is wired: everything is copied."""
    tp = layout.tp
    qkv_x, qkv_dy, proj_x, proj_dy = sh.h, (sh.q + 2 * sh.kv) / tp, sh.q / tp, sh.h
    fc1_x, fc1_dy, fc2_x, fc2_dy = sh.h, 2 * sh.f / tp, sh.f / tp, sh.h
    if layout.recompute != "none":
        return layers * (qkv_x + qkv_dy + proj_x + proj_dy + fc1_x + fc1_dy + fc2_x + fc2_dy)
    fused_add = getattr(layout, "add_norm", "megatron") == "fused"
    ours_norm = layout.norm == "triton"
    triton_swiglu = getattr(layout, "swiglu", "megatron") == "triton"
    per_layer = 0.0 if layout.attention == "flash_attn" else proj_x
    per_layer += 0.0 if getattr(layout, "qkv_grad", "megatron") == "fused" else qkv_dy
    per_layer += 0.0 if fused_add else proj_dy + fc2_dy
    per_layer += 0.0 if fused_add or ours_norm else fc1_x
    per_layer += 0.0 if triton_swiglu else fc1_dy + fc2_x
    copies = layers * per_layer
    if not ours_norm:
        copies += qkv_x * (1 if fused_add else layers)
        copies += fc2_dy if fused_add else 0.0
    return copies


def _deferral(sh: Shape, layout: Layout, cal: Calibration, layers: int, cpu: bool) -> tuple[float, float]:
    """(seconds per micro-batch, seconds per step) that layout.wgrad_defer=step changes.

    Without deferral every micro-batch's weight-gradient GEMM of each decoder linear adds into
    the fp32 main_grad (beta 1): MAIN_GRAD_ACCUMULATE_BYTES per weight element per micro-batch,
    which the GEMM term above already carries: its small-GEMM fall-off is a fixed cost per
    micro-batch and weight element, 6 * gemm_half_tokens / (peak * large-GEMM efficiency) =
    1.59 ps at llama_1b3's width on the H200 preset, and the H200 profiles put it in the
    accumulating weight-gradient GEMMs alone (1.58 ps more per call at mbs 1 than at mbs 16,
    the forward and data-gradient GEMMs none: profile_diff_mbs1_mbs16_h200_2026-12-01.json):
    that read-modify-write, 8 B at 4.25 TB/s = 1.88 ps. Deferred, it leaves the micro-batch;
    the one GEMM per weight and step (K = all the step's tokens; its FLOPs are those the GEMM
    term counts, at the large-GEMM rate: 715 TFLOP/s in the deferred step's profile) writes
    main_grad once at the flush: beta 0 under grad_buffer=overwrite, with the zeroing of those
    gradients skipped, else one beta-1 accumulate after the usual zeroing. Added: the copies
    into the arenas that no producer writes (`arena_copy_elements`, read and written at memory
    bandwidth; the profile's 384 attention-output copies: 1.58 ms of the step). On the H200
    (v4 sweep, mbs 1, 16 micro-batches) deferral with overwrite took 37.5 and 36.7 ms off a
    step; this gives 37.1 - 1.5 = 35.6 ms. Both figures are relative to the undeferred step."""
    if getattr(layout, "wgrad_defer", "off") != "step":
        return 0.0, 0.0
    e = 4.0 if cpu else 2.0
    T = layout.mbs * sh.s / layout.cp
    params = layers * sh.layer_matrix_params / layout.tp  # the decoder linears' weights on a rank
    bw = cal.memory_bytes_per_s
    per_microbatch = (2 * e * T * arena_copy_elements(sh, layout, layers)
                      - MAIN_GRAD_ACCUMULATE_BYTES * params) / bw
    if getattr(layout, "grad_buffer", "megatron") == "overwrite":
        flush_bytes = MAIN_GRAD_WRITE_BYTES - MAIN_GRAD_ZERO_BYTES  # written once, never zeroed
    else:
        flush_bytes = MAIN_GRAD_ACCUMULATE_BYTES  # one accumulate, after the zeroing off has too
    return per_microbatch, flush_bytes * params / bw


class _Net:
    """Bandwidths of the groups a layout forms, in bytes/s."""

    def __init__(self, cluster: ClusterConfig, cal: Calibration):
        self.per_node = cluster.gpus_per_node
        self.intra = cluster.intra_node_bw_gbps * 1e9 * cal.comm_efficiency
        self.inter = cluster.inter_node_bw_gbps * 1e9 * cal.comm_efficiency
        self.latency = cal.comm_latency_s

    def bw(self, span: int) -> float:
        return self.intra if span <= self.per_node else self.inter

    def all_reduce(self, nbytes: float, size: int, span: int) -> float:
        if size == 1:
            return 0.0
        return 2 * (size - 1) / size * nbytes / self.bw(span) + self.latency

    def gather(self, nbytes: float, size: int, span: int) -> float:
        """All-gather or reduce-scatter of a tensor of nbytes in total."""
        if size == 1:
            return 0.0
        return (size - 1) / size * nbytes / self.bw(span) + self.latency


def _stage_microbatch(sh, layout, cal, cluster, net, peak, stage) -> dict:
    """Seconds one micro-batch spends on one rank of `stage` (all its model chunks)."""
    tp, pp, cp = layout.tp, layout.pp, layout.cp
    e = 4.0 if cluster.device == "cpu" else 2.0
    layers = -(-sh.L // pp)
    chunk_layers = -(-sh.L // (pp * layout.vpp))
    layer, attention = _layer_gpu_time(sh, layout, cal, peak)
    layer += _recompute_share(layout, chunk_layers, attention, layer)
    T = layout.mbs * sh.s / cp
    gpu = layers * layer
    vocab = padded_vocab(sh.V, tp) / tp
    if stage == pp - 1:
        gpu += 6.0 * T * sh.h * vocab / (peak * _gemm_efficiency(cal, T, sh.h / tp))
        fused = getattr(layout, "loss", "megatron") == "fused"
        gpu += (FUSED_CE_BYTES_PER_LOGIT if fused else CE_BYTES_PER_LOGIT) * T * vocab / cal.memory_bytes_per_s
    gpu += _deferral(sh, layout, cal, layers, cluster.device == "cpu")[0]
    gpu = (gpu + cal.microbatch_idle_s) * cal.compute_scale.get(layout.attention, 1.0)
    if layout.cuda_graph:  # one replay per micro-batch: the host no longer paces the GPU
        host = 0.0
    else:
        per_layer = (cal.launch_per_layer_s + cal.kernel_launch_per_layer_s.get(f"norm:{layout.norm}", 0.0)
                     + cal.kernel_launch_per_layer_s.get(f"attention:{layout.attention}", 0.0))
        host = (per_layer * layers * (1 + RECOMPUTE_HOST_SHARE[layout.recompute])
                + cal.launch_per_microbatch_s)
    activation = e * T * sh.h
    collectives = 4 + (2 if layout.recompute == "full" else 0)
    tp_comm = layers * collectives * net.all_reduce(activation, tp, tp)
    tp_comm += (int(stage == 0) + int(stage == pp - 1)) * net.all_reduce(activation, tp, tp)
    cp_comm = 0.0
    if cp > 1:
        ring = 3 * (cp - 1) * 2 * e * T * sh.kv / tp / net.bw(tp * cp)
        cp_comm = layers * max(0.0, ring - attention)
    return dict(gpu=gpu, host=host, tp_comm=tp_comm, cp_comm=cp_comm)


def _dp_and_optimizer(sh, layout, cal, cluster, net, dp, stage) -> tuple[float, float]:
    params = stage_params(sh, layout, stage)
    ranks = dp * layout.cp  # gradients are reduced, and optimizer state sharded, over dp x cp
    span = layout.tp * ranks
    grad_b = 4.0
    if layout.distributed_optimizer and cluster.device != "cpu":
        dp_comm = (net.gather(grad_b * params, ranks, span)
                   + net.gather(2.0 * params, ranks, span))
        shard = params / ranks
    else:
        dp_comm = net.all_reduce(grad_b * params, ranks, span)
        shard = params
    per_param = (cal.flat_optimizer_bytes_per_param if getattr(layout, "optimizer_step", "megatron") == "flat"
                 else cal.optimizer_bytes_per_param)
    optimizer = (per_param * shard + 6.0 * (params - shard)) / cal.memory_bytes_per_s
    hidden = 0.0 if layout.cuda_graph or cluster.device == "cpu" else cal.dp_overlap
    return dp_comm * (1 - hidden), optimizer


def predict_speed(model: ModelConfig, cluster: ClusterConfig, layout: Layout,
                  calibration: Optional[Calibration] = None, *, dp: Optional[int] = None) -> SpeedEstimate:
    """Step time of the layout; `dp` defaults to the cluster's."""
    cal = calibration or default_calibration(cluster)
    sh = model_shape(model)
    if dp is None:
        dp = max(1, layout.dp(cluster.world_size))
    world = layout.tp * layout.pp * layout.cp * dp
    m = max(1, layout.gbs // (layout.mbs * dp))
    peak = cluster.peak_tflops * 1e12
    net = _Net(cluster, cal)
    stages = (0, layout.pp - 1) if layout.pp > 1 else (0,)
    per_mb = max((_stage_microbatch(sh, layout, cal, cluster, net, peak, k) for k in stages),
                 key=lambda t: max(t["gpu"], t["host"]) + t["tp_comm"] + t["cp_comm"])
    busy = max(per_mb["gpu"], per_mb["host"])
    microbatch = busy + per_mb["tp_comm"] + per_mb["cp_comm"]
    bubble = (layout.pp - 1) / layout.vpp * microbatch
    pp_comm = 0.0
    if layout.pp > 1:
        e = 4.0 if cluster.device == "cpu" else 2.0
        whole = 1.0 / layout.tp if layout.sequence_parallel else 1.0
        message = e * layout.mbs * model.seq_length / layout.cp * model.hidden_size * whole
        bw = net.bw(world)
        pp_comm = m * layout.vpp * 2 * (message / bw + net.latency)
    per_stage = [_dp_and_optimizer(sh, layout, cal, cluster, net, dp, k) for k in stages]
    dp_comm = max(d for d, _ in per_stage)
    optimizer = max(o for _, o in per_stage) + cal.step_overhead_s
    # A host-bound eager step also waits for the host's own per-step work (the optimizer's
    # and grad-norm launches), which a GPU-bound step hides behind queued kernels.
    host_step = cal.eager_step_host_s if per_mb["host"] > per_mb["gpu"] else 0.0
    terms = dict(
        compute=m * per_mb["gpu"],
        launch=m * (busy - per_mb["gpu"]) + host_step,
        tp_comm=m * per_mb["tp_comm"],
        cp_comm=m * per_mb["cp_comm"],
        bubble=bubble,
        pp_comm=pp_comm,
        dp_comm=dp_comm,
        optimizer=optimizer,
        wgrad_flush=_deferral(sh, layout, cal, -(-sh.L // layout.pp), cluster.device == "cpu")[1],
    )
    step = sum(terms.values())
    tokens_per_s = layout.gbs * model.seq_length / step
    peak_world = peak * world
    return SpeedEstimate(
        step_time_s=step,
        mfu=tokens_per_s * palm_flops_per_token(model) / peak_world,
        mfu_megatron=tokens_per_s * megatron_flops_per_token(model) / peak_world,
        tokens_per_s=tokens_per_s,
        terms=terms,
    )
