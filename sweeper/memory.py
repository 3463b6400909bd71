"""Predicted peak memory per GPU of a dense Llama-style model under a parallel layout.

    est = predict_memory(model, cluster, layout)      # calibration=None: defaults
    est.peak_gb, est.fits, est.worst_stage, est.terms  # GiB; terms sum to peak_gb

What megatron-core holds, as assumed here (CUDA, bf16 mixed precision):
- weights bf16 (2 B/param); gradients in DDP's fp32 buffer (4 B/param,
  grad_reduce_in_fp32); Adam: fp32 main weights + two moments (12 B/param), sharded
  over dp*cp by the distributed optimizer, whole on every rank without it. During
  the optimizer step torch's foreach Adam adds a temporary (Calibration.optimizer_temp_bytes).
- activations per layer and micro-batch, after Korthikanti et al. 2022 ("Reducing
  Activation Recomputation", Table 2), redone for this layer and audited against
  megatron-core 0.16.1: RMSNorm (every norm kernel here saves its input and a fp32
  1/rms), the fused QKV output (alive: V is a strided view of it), Q and K after RoPE,
  GQA (cuDNN SDPA and stock attention repeat K, V to every head), megatron's fused
  SwiGLU (saves fc1's output, 2f; fc2 saves the product, f), no dropout (p=0 saves no
  mask). Without SP the norms' inputs and the inputs of the QKV and fc1 linears are
  whole on every TP rank; with SP everything is divided by tp. cp divides the sequence.
- attention: fused kernels save a fp32 log-sum-exp and their output, which is the
  output projection's input (written in [s, b, h*d] order, no copy); "megatron"
  (stock DotProductAttention, torch softmax in fp32) saves the fp32 softmax and the
  bf16 probabilities, 6 bytes per score, plus a transient of 10.
- recompute: selective checkpoints core attention: it keeps the core's inputs (our
  adapters rotate Q, K inside it, so only the QKV output; megatron's keeps Q, K after
  its RoPE) and drops the rest; full keeps one layer input per checkpoint group, and re-materialises
  one group (uniform) or one layer (block) during backward.
- pipeline: stage k of 1F1B holds min(pp - k, m) micro-batches; interleaved, rank k
  holds min(2(pp-k-1) + (vpp-1)pp + 1, m*vpp) model-chunk forwards (Megatron's
  1 + (pp-1)/(pp*vpp) factor). Stage 0 has the embedding and the most in flight;
  the last stage has the output layer and the loss: megatron's fused cross entropy
  holds 10 B per logit while it runs (bf16 logits, two fp32 buffers) and keeps 4;
  layout.loss="fused" (kernels/fused_ce.py) holds one 4096-token chunk of bf16 logits. Middle stages never exceed stage 0.
- the peak is whichever is larger: the activations at the turn from forward to
  backward, or the optimizer step's temporaries (activations freed by then).
- layout.wgrad_defer=step (kernels/wgrad_defer.py, pp = 1): the arenas, allocated once and
  held through the step, keep every micro-batch's X and dY of the four decoder linears:
  slots * tokens * sum over linears of (in + out) * element bytes (the `wgrad_arena` term,
  in both phases); the linears' inputs autograd no longer saves come off the layer's
  activations (the norms' outputs into QKV and fc1, the SwiGLU product into fc2; the
  attention output stays, saved by the fused attention itself).
- overhead: allocator fragmentation and rounding (a fraction: reserved / allocated - 1,
  measured 1.8-4.9% on the H100 sweep), device memory outside the allocator (CUDA
  context, library handles: 2.83 GiB measured there) and NCCL buffers per communicator
  in use. A CUDA graph's private pool adds nothing measurable: the H100 sweep's graphed
  and eager trials of one layout peak within 0.03 GiB (allocated equal to 0.01 GiB).

CPU trial path (cluster.device == "cpu"): fp32 weights and activations, param.grad
fp32, torch AdamW (8 B/param, no main copy, no sharding), gradients flattened for the
DP all-reduce (a 4 B/param temporary when dp > 1); the peak compares with the RSS.

Which peak: `allocated_gb` predicts torch.cuda.max_memory_allocated, `reserved_gb`
(allocated plus fragmentation) torch.cuda.max_memory_reserved, and `peak_gb` adds the
memory outside the allocator (CUDA context, NCCL buffers): the device's used memory,
which decides `fits`. The trial records carry the first two (max over ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from core.choices import TRITON_DS_STASH_HEAD_DIMS, ds_bytes_per_kv_head, ds_stash_heads
from core.config import ClusterConfig, Layout, ModelConfig
from sweeper.constants import Calibration, default_calibration

GIB = float(2**30)
VOCAB_MULTIPLE = 128  # megatron pads the vocabulary to a multiple of 128 * tp
FUSED_CE_CHUNK_TOKENS = 4096  # kernels/fused_ce.py's CHUNK_TOKENS (not imported: it needs triton)


@dataclass
class MemoryEstimate:
    peak_gb: float  # the worst stage, overhead included
    fits: bool  # peak_gb <= cluster.gpu_memory_gb
    worst_stage: int
    terms: dict  # name -> GiB for the worst stage; they sum to peak_gb
    allocated_gb: float  # the worst stage's allocator peak, before overhead
    reserved_gb: float  # allocated_gb plus fragmentation: torch.cuda.max_memory_reserved
    dynamic_gb: float  # the part of allocated_gb that scales with activation_scale
    phase: str  # "activations" or "optimizer": when the peak happens


@dataclass(frozen=True)
class Shape:
    """Per-model constants, computed once per model."""

    L: int
    h: int
    f: int
    a: int
    g: int
    q: int  # query projection width, a * head_dim
    kv: int  # key (or value) projection width, g * head_dim
    V: int
    s: int
    layer_matrix_params: int  # sharded by TP
    layer_norm_params: int  # replicated on TP ranks


@lru_cache(maxsize=256)
def _shape(L, h, f, a, g, V, s) -> Shape:
    d = h // a
    q, kv = a * d, g * d
    matrices = h * (q + 2 * kv) + q * h + 3 * h * f
    return Shape(L, h, f, a, g, q, kv, V, s, matrices, 2 * h)


def model_shape(model: ModelConfig) -> Shape:
    return _shape(model.num_layers, model.hidden_size, model.ffn_hidden_size,
                  model.num_attention_heads, model.num_query_groups, model.vocab_size,
                  model.seq_length)


def padded_vocab(vocab: int, tp: int) -> int:
    multiple = VOCAB_MULTIPLE * tp
    return -(-vocab // multiple) * multiple


def stage_params(sh: Shape, layout: Layout, stage: int) -> float:
    """Parameters held by one rank of pipeline stage `stage`."""
    tp, pp = layout.tp, layout.pp
    layers = -(-sh.L // pp)
    params = layers * (sh.layer_matrix_params / tp + sh.layer_norm_params)
    table = padded_vocab(sh.V, tp) * sh.h / tp
    if stage == 0:
        params += table  # input embedding
    if stage == pp - 1:
        params += table + sh.h  # output layer (untied) and final norm
    return params


def in_flight(layout: Layout, stage: int, microbatches: int) -> int:
    """Model-chunk forwards whose activations stage `stage` holds at its peak."""
    pp, vpp = layout.pp, layout.vpp
    if vpp > 1:
        return min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, microbatches * vpp)
    return min(pp - stage, microbatches)


@dataclass
class LayerBytes:
    """Bytes of one transformer layer for one micro-batch on one rank."""

    full: float  # saved for backward without recompute
    core: float  # of which the attention core's (dropped by selective recompute)
    checkpoint: float  # one checkpoint's input under full recompute
    attention_workspace: float  # transient while the layer's attention runs
    mlp_workspace: float  # transient gradients in the MLP's backward


# Attention kernels whose adapter repeats K and V to every query head for GQA.
REPEATS_KV = ("megatron", "sdpa_cudnn")


def layer_bytes(sh: Shape, layout: Layout, cpu: bool) -> LayerBytes:
    e = 4.0 if cpu else 2.0
    tp, cp = layout.tp, layout.cp
    T = layout.mbs * sh.s / cp  # tokens per micro-batch on this rank
    s_local = sh.s / cp
    whole = 1.0 / tp if layout.sequence_parallel else 1.0  # SP shards what TP alone cannot
    norms = 2 * (e * sh.h + 4.0) * T * whole  # two norms: input and fp32 1/rms per token
    linear_inputs = 2 * e * T * sh.h * whole
    unfused = layout.attention == "megatron"
    qkv_output = e * T * (sh.q + 2 * sh.kv) / tp  # kept alive by V, a strided view of it
    if sh.g < sh.a and layout.attention in REPEATS_KV:
        attention_inputs = 3 * e * T * sh.q / tp  # Q after RoPE, K and V repeated to every head
    else:
        attention_inputs = qkv_output + e * T * (sh.q + sh.kv) / tp  # + Q, K after RoPE
    attention_inputs += 2 * e * T * sh.kv * (cp - 1) / tp  # K, V received from the CP ring
    scores = T * sh.a / tp * s_local  # per micro-batch, one layer
    # Selective recompute checkpoints core attention: what it keeps are the core's inputs.
    # megatron's RoPE runs before DotProductAttention (Q, K after RoPE are its inputs);
    # our adapters rotate inside, so only the fused QKV output (their input's storage) stays.
    if unfused:
        kept = qkv_output + e * T * (sh.q + sh.kv) / tp
        saved_core = (4.0 if cpu else 6.0) * scores  # fp32 softmax + bf16 probabilities
        attention_ws = (12.0 if cpu else 10.0) * scores
    else:
        kept = qkv_output
        saved_core = 4.0 * T * sh.a / tp  # fp32 log-sum-exp; the output is the projection's input
        attention_ws = (4.0 + e) * T * sh.q / tp + 2 * e * T * sh.kv / tp  # dq (fp32 acc), dk, dv
        if layout.attention == "triton" and not cpu and sh.q // sh.a in TRITON_DS_STASH_HEAD_DIMS:
            # the dS scratch (kernels/attention.py): whole KV heads, as many as fit its cap
            kv_heads, group, s = layout.mbs * max(1, sh.g // tp), sh.a // sh.g, round(s_local)
            attention_ws += (ds_stash_heads(kv_heads, group, s, e)
                             * ds_bytes_per_kv_head(group, s, e))
    core = attention_inputs - kept + saved_core
    proj_input = e * T * sh.q / tp
    # GPU: megatron's fused SwiGLU saves its input (fc1 output, 2f) and fc2 saves the
    # product (f). CPU (no fusion): fc1 output, silu output and the product.
    mlp = (4.0 if cpu else 3.0) * e * T * sh.f / tp
    full = norms + linear_inputs + kept + core + proj_input + mlp
    if getattr(layout, "wgrad_defer", "off") == "step":  # the arena holds them instead
        full -= linear_inputs + e * T * sh.f / tp + (proj_input if unfused else 0.0)
    return LayerBytes(
        full=full,
        core=core,
        checkpoint=e * T * sh.h * whole,
        attention_workspace=attention_ws,
        mlp_workspace=3 * e * T * sh.f / tp,
    )


def chunk_activations(lb: LayerBytes, layout: Layout, layers: int) -> tuple[float, float]:
    """(bytes saved per model chunk per micro-batch, bytes re-materialised in backward)."""
    if layout.recompute == "selective":
        return layers * (lb.full - lb.core), lb.core
    if layout.recompute == "full":
        n = min(layout.recompute_num_layers, layers)
        if layout.recompute_method == "block":
            return n * lb.checkpoint + (layers - n) * lb.full, lb.full
        return math.ceil(layers / n) * lb.checkpoint, n * lb.full
    return layers * lb.full, 0.0


def logits_bytes(sh: Shape, layout: Layout, cpu: bool) -> tuple[float, float]:
    """Last stage: (saved: final norm and fp32 softmax of the loss, transient while the loss runs).

    GPU (megatron's fused cross entropy): the bf16 logits (2 B), their fp32 copy (4 B)
    and a second fp32 buffer (4 B) coexist during the forward, 10 B per logit; the H100
    sweep's trials (24 layers, V=32000) measure the peak there for every recompute mode.
    """
    e = 4.0 if cpu else 2.0
    T = layout.mbs * sh.s / layout.cp
    whole = 1.0 / layout.tp if layout.sequence_parallel else 1.0
    vocab = padded_vocab(sh.V, layout.tp) / layout.tp
    norm_and_input = (2 * e * sh.h + 4.0) * T * whole  # final norm's input and 1/rms; its output
    if getattr(layout, "loss", "megatron") == "fused" and not cpu:
        # kernels/fused_ce.py: the forward keeps dx (h per token, where the output layer's
        # input was) and the output layer's fp32 weight gradient [V, h] until the backward,
        # and holds one chunk of bf16 logits at a time.
        return norm_and_input + 4.0 * vocab * sh.h, 2.0 * min(T, FUSED_CE_CHUNK_TOKENS) * vocab
    saved = norm_and_input + 4.0 * T * vocab
    transient = 0.0 if cpu else 6.0 * T * vocab
    return saved, transient


def arena_bytes(sh: Shape, layout: Layout, cpu: bool, microbatches: int) -> float:
    """kernels/wgrad_defer.py's arenas on one rank: per micro-batch slot and token, the X and
    dY of QKV (h, (q + 2kv)/tp), the attention output (q/tp, h), fc1 (h, 2f/tp) and fc2
    (f/tp, h); X is the whole sequence even under SP (the gathered input)."""
    if getattr(layout, "wgrad_defer", "off") != "step":
        return 0.0
    e = 4.0 if cpu else 2.0
    tp = layout.tp
    per_token = (4 * sh.h + (sh.q + 2 * sh.kv) / tp + sh.q / tp + 3 * sh.f / tp)
    layers = sh.L // layout.pp
    return microbatches * layout.mbs * sh.s / layout.cp * per_token * e * layers


def _stage(sh, layout, cal, cpu, stage, dp, microbatches, lb):
    """(terms in bytes before overhead, dynamic bytes, phase) for one stage."""
    pp, cp = layout.pp, layout.cp
    params = stage_params(sh, layout, stage)
    shards = dp * cp if layout.distributed_optimizer and not cpu else 1
    weight_b, grad_b, opt_b = (4.0, 4.0, 8.0) if cpu else (2.0, 4.0, 12.0)
    chunk_layers = -(-sh.L // (pp * layout.vpp))
    saved_chunk, recompute = chunk_activations(lb, layout, chunk_layers)
    chunks = in_flight(layout, stage, microbatches)
    activations = chunks * saved_chunk
    if stage == 0:
        activations += 8.0 * layout.mbs * sh.s / cp * -(-chunks // layout.vpp)  # token ids
    layer_ws = max(lb.attention_workspace, lb.mlp_workspace) + recompute
    logits = 0.0
    if stage == pp - 1:
        saved, transient = logits_bytes(sh, layout, cpu)
        logits = saved + transient
    scale = cal.activation_scale
    dynamic = (activations + max(layer_ws, logits)) * scale
    step_temp = cal.optimizer_temp_bytes * params / shards
    if cpu and dp > 1:
        step_temp += 4.0 * params  # gradients flattened for the all-reduce
    phase = "activations" if dynamic >= step_temp else "optimizer"
    terms = dict(weights=weight_b * params, grads=grad_b * params, optimizer=opt_b * params / shards,
                 optimizer_step=0.0, activations=0.0, logits=0.0, attention_workspace=0.0,
                 mlp_workspace=0.0, recompute=0.0)
    if getattr(layout, "wgrad_defer", "off") == "step":  # named only when on, as in the trial name
        terms["wgrad_arena"] = arena_bytes(sh, layout, cpu, microbatches)
    if phase == "optimizer":
        terms["optimizer_step"] = step_temp
        return terms, 0.0, phase
    terms["activations"] = activations * scale
    if logits > layer_ws:
        terms["logits"] = logits * scale
    else:
        attention_first = lb.attention_workspace >= lb.mlp_workspace
        terms["attention_workspace" if attention_first else "mlp_workspace"] = (
            max(lb.attention_workspace, lb.mlp_workspace) * scale)
        terms["recompute"] = recompute * scale
    return terms, dynamic, phase


def communicators(layout: Layout, dp: int) -> int:
    return sum(1 for n in (layout.tp, layout.cp, dp, layout.pp) if n > 1)


def predict_memory(model: ModelConfig, cluster: ClusterConfig, layout: Layout,
                   calibration: Optional[Calibration] = None, *, dp: Optional[int] = None) -> MemoryEstimate:
    """Peak memory of the most loaded pipeline stage. `dp` defaults to the cluster's."""
    cal = calibration or default_calibration(cluster)
    cpu = cluster.device == "cpu"
    sh = model_shape(model)
    if dp is None:
        dp = max(1, layout.dp(cluster.world_size))
    microbatches = max(1, layout.gbs // (layout.mbs * dp))
    lb = layer_bytes(sh, layout, cpu)
    fixed = cal.framework_gb + cal.comm_buffer_gb * communicators(layout, dp)
    best = None
    for stage in ((0, layout.pp - 1) if layout.pp > 1 else (0,)):
        terms, dynamic, phase = _stage(sh, layout, cal, cpu, stage, dp, microbatches, lb)
        allocated = sum(terms.values()) / GIB + cal.memory_offset_gb
        peak = allocated * (1 + cal.fragmentation) + fixed
        if best is None or peak > best[0]:
            best = (peak, stage, terms, allocated, dynamic / GIB, phase)
    peak, stage, terms, allocated, dynamic, phase = best
    out = {k: v / GIB for k, v in terms.items()}
    out["offset"] = cal.memory_offset_gb
    out["fragmentation"] = allocated * cal.fragmentation
    out["framework"] = cal.framework_gb
    out["comm_buffers"] = fixed - cal.framework_gb
    return MemoryEstimate(peak_gb=peak, fits=peak + cal.oom_margin_gb <= cluster.gpu_memory_gb, worst_stage=stage,
                          terms=out, allocated_gb=allocated,
                          reserved_gb=allocated * (1 + cal.fragmentation), dynamic_gb=dynamic, phase=phase)
