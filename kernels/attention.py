"""Fused causal attention: the project's own FlashAttention-2-style Triton kernel.

    out = softmax(scale * Q K^T + causal_mask) V        per (batch, query head)

q: [b, s, hq, d], k, v: [b, s, hkv, d] with hkv dividing hq (GQA/MQA: query head h
reads KV head h // (hq // hkv)); any strides. The forward never stores the s x s score
matrix: it keeps only the per-row log-sum-exp [b, hq, s] for the backward.
The backward is deterministic (each gradient block owned by one program, summed in a fixed
order, no atomics): at head dim 128 on a GPU by 5 block matmuls, the dK/dV kernel storing dS
for a dQ = dS K kernel (DKDV_STASH_CONFIGS); elsewhere by 7, a dK/dV and a dQ kernel, unless
`deterministic=False` lets the dK/dV kernel add dQ with fp32 atomics (5 block matmuls; dQ's
last bits then vary from run to run; on the H200 it was slower wherever timed).

Layers: `attention_fwd.py` / `attention_bwd.py` (delta, dK/dV) / `attention_dq.py` /
`attention_dq_ds.py` hold the @triton.jit kernels and
their launchers; `attention_gluon_fwd.py` / `attention_gluon_bwd.py` the Gluon ones (sm_90,
Triton 3.6: warp-specialized, TMA, async wgmma); here are the block configurations, the
choice between the two (`impl`), the autograd.Function and the keyword-only entry point
`flash_attention`, plus a float64 reference.

As every caller gets it (impl="auto"; H200, 2026-12-02, tree 0f87f5c,
benchmarks/results/attention_h200_2026-12-02_v2.json): the Gluon forward 462/559/326/571
TFLOP/s at the issue's four shapes (0.854x flash-attn-4 at the minimum, 1.24x at d=64), the
Triton-language backward 326/441/245/412 (d=128: the dK/dV kernel storing dS, then
dQ = dS K, see DKDV_STASH_CONFIGS; the Gluon backward, correct but slower, stays opt-in):
fwd+bwd 0.760x flash-attn-4, 0.864x SDPA-cuDNN (1.015x cuDNN at 4x32/8x4096). The figures
below are the Triton-language kernels' of earlier runs.

H200, bf16, causal, the issue's four shapes (benchmarks/results/attention_h200_2026-12-01.json;
bf16 matmul ceiling 701 TFLOP/s in that run): forward+backward 343/391/241/378 TFLOP/s,
0.68-0.79x flash-attn-4 (479/577/304/520) and 0.77-0.91x SDPA-cuDNN, 1.34-1.47x SDPA-flash.
What holds it back, measured (attention_tune_h200 / attention_diag_h200 JSON): the forward
at s=4096 runs 464 TFLOP/s, 636 with the softmax taken out (NO_SOFTMAX), so the softmax,
not overlapped with the tensor cores as FA3/FA4 ping-pong it, costs 27%; at s=2048 even the
softmax-free pipeline reaches only 404 (58% of the ceiling). Triton's warp specialization
compiles on sm_90 (Triton 3.6) but is slower for the forward (320 vs 361) and dK/dV; it wins
only for dQ. The dK/dV kernel (the backward's bottleneck, TFLOP/s counted at its share of
the FLOPs: 285-329) sits at 206-255 registers; its 64x128 tiles spill. deterministic=False
(atomic dQ, 5 block matmuls instead of 7) is slower, 0.76-0.88x fwd+bwd: more registers, spills.
Overlap variants, timed on vs off in one tuner call (H200, Triton 3.6, 2026-12-01, tree
de1c83e; attention_tune_h200_2026-12-01_v2.json; TFLOP/s at 8x16x2048 / 4x32x4096, d=128):
forward PIPELINE 298/363 vs plain 362/461: ptxas serialized every wgmma of that build (C7515,
"non wgmma instructions defining accumulator registers"), caused by the scf.if that guarded
the pipelined segment; the guard is gone since (no C7515 from Triton 3.6's ptxas on CPU), not
yet timed. SUBTILE 228/263 (8 warps: each 64-row half spread over both warpgroups, N-split
layouts and P converted through shared memory) or 278/350 (4 warps: 255 registers, spills);
it wins only at d=64 (281 vs 276). Backward DEFER: dK/dV 260/314 vs 272/311, dQ 323/406 vs
412/432 (the previous block's K or Q tile is loaded a second time per iteration).

Dtypes: fp16 and bf16 (fp32 too: on a GPU its dots run as tf32). Head dims: powers
of two from 16 to 256 (64 and 128 tuned). Any sequence length; rows past the last
full block are masked. Works on CUDA and, under TRITON_INTERPRET=1, on CPU tensors.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton

from core.choices import TRITON_HEAD_DIMS as HEAD_DIMS  # the sweeper's validity reads the same tuple
from core.choices import TRITON_DS_SCRATCH_BYTES, ds_stash_heads, ds_stash_stride
from kernels.attention_bwd import (
    DQ_NONE,
    DQ_STASH,
    dq_mode,
    launch_delta,
    launch_dkdv,
)
from kernels.attention_dq import launch_dq
from kernels.attention_dq_ds import launch_dq_ds
from kernels.attention_fwd import launch_forward, tma_aligned

# Block configurations per head dim, winners of the H200 sweep of benchmarks/tune_attention.py
# (bf16, causal; benchmarks/results/attention_tune_h200_2026-12-01.json). "tma": load tiles
# through tensor descriptors (sm_90+, when the strides allow); "WARP_SPEC": Triton's warp
# specialization of the inner loop (compiles on sm_90 with Triton 3.6; it won only for dQ).
# Variants (kernel flags, each timed on vs off by the tuner): forward "PIPELINE" (block j-1's
# P V issued after block j's S and left in flight under block j's softmax) and "SUBTILE" (two
# 64-row query halves in turn, one's softmax under the other's P V); dK/dV and dQ "DEFER"
# (each block's dK += dS^T Q or dQ += dS K issued one iteration late, under the next exp2);
# "maxnreg" caps registers per thread.
FWD_CONFIGS = {
    # SUBTILE at d=64: 281 vs 276 TFLOP/s for the plain 8-warp kernel in the same tuner call
    # (attention_tune_h200_2026-12-01_v2.json), a margin inside the run-to-run spread.
    64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=4, tma=False, SUBTILE=True),
    128: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, tma=False),
}
DKDV_CONFIGS = {
    64: dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3, tma=False),
    128: dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3, tma=False),
}
DQ_CONFIGS = {
    64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, tma=False),
    128: dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3, tma=True, WARP_SPEC=True),
}
# The dK/dV kernel that also adds dQ (deterministic=False): element-wise atomics, or with
# "DQ_TMA" one bulk tensor reduce-add per tile.
DKDV_ATOMIC_CONFIGS = {
    64: dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3, tma=False),
    128: dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3, tma=True),
}
# DQ_STASH (kernels/attention_bwd.py): the dK/dV kernel that stores dS ("DS_STASH") and the
# dQ = dS K kernel (kernels/attention_dq_ds.py); where a head dim is listed, both
# deterministic settings run this pair instead of the dK/dV + dQ one.
# H200 tuner, 2026-12-02 (attention_tune_h200_2026-12-02_stash.json): at 8x16x2048 /
# 4x32/8x4096 (d=128) the dK/dV kernel storing dS runs 228/290 TFLOP/s (its 1.25x share;
# the plain one 291/326), dQ = dS K 642/984 (the dQ kernel 412/502): the pair's total wins
# by 13% at 4096, loses by 1.5% at 2048. At d=64 dS costs twice the bytes per FLOP: the
# storing dK/dV kernel's best, 153, loses to the plain 209, so d=64 keeps the old pair.
DKDV_STASH_CONFIGS: dict[int, dict] = {
    128: dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3, tma=True, DS_STASH=True),
}
DQ_DS_CONFIGS: dict[int, dict] = {
    128: dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3, tma=True),
}
# The dS scratch is at most this large: beyond it, the heads run in chunks (the memory
# model counts it: core.choices).
DS_SCRATCH_BYTES = TRITON_DS_SCRATCH_BYTES
# Untuned head dims get small blocks. The CPU interpreter simulates every program
# in numpy: few, small tiles keep the tests fast there.
SMALL_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2, tma=False)
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, tma=False)


def kernel_configs(head_dim: int, device: torch.device, *, deterministic: bool = True):
    """(forward, dk/dv, dq) block configurations for this head dim and device. A dk/dv config
    with "DS_STASH" pairs with the dQ = dS K kernel's; otherwise with deterministic=False
    the dk/dv one is for the kernel that also adds dQ (atomics or bulk reduce-adds)."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG, INTERPRETER_CONFIG, INTERPRETER_CONFIG
    if head_dim in FWD_CONFIGS:
        if head_dim in DKDV_STASH_CONFIGS:
            return FWD_CONFIGS[head_dim], DKDV_STASH_CONFIGS[head_dim], DQ_DS_CONFIGS[head_dim]
        dkdv = DKDV_CONFIGS if deterministic else DKDV_ATOMIC_CONFIGS
        return FWD_CONFIGS[head_dim], dkdv[head_dim], DQ_CONFIGS[head_dim]
    return SMALL_CONFIG, SMALL_CONFIG, SMALL_CONFIG


def tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA wants sm_90+, a 16-byte aligned base, unit last stride, other strides in 16 B.

    On CPU the interpreter emulates tensor descriptors, so tests can cover that path.
    """
    if tensors[0].device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return False
    elif torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    return all(tma_aligned(t) for t in tensors)


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _use_tma(config, *tensors) -> bool:
    use = bool(config.get("tma")) and tma_ok(*tensors)
    if use:
        # Device-side descriptors need scratch memory. Triton keeps its allocator in a
        # context variable, which autograd's backward thread does not inherit: set it
        # on every launch (cheap), not once per process.
        triton.set_allocator(_scratch)
    return use


def _device(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


IMPLS = ("auto", "gluon", "triton")


def _gluon(kind: str):
    """kernels.attention_gluon_fwd / _bwd, or why it does not import (a str): imported on
    first use, never with this module."""
    import importlib

    try:
        return importlib.import_module(f"kernels.attention_gluon_{kind}")
    except ImportError as e:
        return str(e) or type(e).__name__


def _auto_takes_gluon(kind: str) -> bool:
    """The Gluon backward is correct but slower than the Triton-language one on the H200
    (kernels/attention_gluon_bwd.py's figures): "auto" takes it only when asked to."""
    return kind == "fwd" or os.environ.get("LAYOUT_SWEEP_GLUON_BWD") == "1"


def _pick(impl: str, kind: str, why_not) -> object | None:
    """The Gluon module to run, or None for the Triton-language kernels.

    impl "auto": Gluon where it runs (sm_90, supported shape) and is the faster, else
    Triton-language; "gluon": Gluon or a ValueError naming why not; "triton": never Gluon."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} not one of {IMPLS}")
    if impl == "triton" or (impl == "auto" and not _auto_takes_gluon(kind)):
        return None
    module = _gluon(kind)
    reason = f"import failed: {module}" if isinstance(module, str) else why_not(module)
    if reason is None:
        return module
    if impl == "gluon":
        raise ValueError(f"Gluon attention {kind} cannot run: {reason}")
    return None


def _gluon_forward(impl, q, k, v, out, causal):
    return _pick(impl, "fwd", lambda m: m.gluon_forward_unsupported(q, k, v, out, causal=causal))


def _gluon_backward(impl, q, k, v, do, causal, deterministic):
    return _pick(impl, "bwd", lambda m: m.gluon_backward_unsupported(
        q, k, v, do, causal=causal, deterministic=deterministic))


def attention_impls(q, k, v, *, causal=True, deterministic=True, impl="auto") -> dict:
    """Which kernels flash_attention runs for these inputs: {"fwd": "gluon" | "triton",
    "bwd": ...} (benchmarks and trial records name it)."""
    fwd = _gluon_forward(impl, q, k, v, q.new_empty(q.shape), causal)
    bwd = _gluon_backward(impl, q, k, v, q, causal, deterministic)
    return {"fwd": "triton" if fwd is None else "gluon", "bwd": "triton" if bwd is None else "gluon"}


def _check_inputs(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected [b, s, h, d] tensors, got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v differ in shape: {k.shape} vs {v.shape}")
    b, s, hq, d = q.shape
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in b, s or d")
    if hq % k.shape[2]:
        raise ValueError(f"KV heads {k.shape[2]} must divide query heads {hq}")
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim {d} not supported (supported: {HEAD_DIMS})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype {q.dtype} not supported (fp16, bf16, fp32)")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")


def attention_forward(q, k, v, *, causal, softmax_scale, seq_first_out=False, config=None,
                      impl="auto"):
    """Host launcher: (out [b, s, hq, d], lse [b, hq, s] fp32, natural log).

    `seq_first_out` lays the output out as [s, b, hq, d] in memory (returned as its
    [b, s, hq, d] view), which megatron's adapter then reshapes for free.
    `config` overrides the tuned block configuration of the Triton-language kernel (the
    benchmark sweep uses it) and so selects that kernel; `impl` as in `_pick`.
    """
    b, s, hq, d = q.shape
    if seq_first_out:
        out = torch.empty((s, b, hq, d), dtype=q.dtype, device=q.device).permute(1, 0, 2, 3)
    else:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, hq, s), dtype=torch.float32, device=q.device)
    gluon = None if config is not None else _gluon_forward(impl, q, k, v, out, causal)
    if gluon is not None:
        with _device(q):
            gluon.gluon_forward(q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale)
        return out, lse
    config = config or kernel_configs(d, q.device)[0]
    with _device(q):
        launch_forward(q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale,
                       config=config, use_tma=_use_tma(config, q, k, v))
    return out, lse


def attention_backward(do, q, k, v, out, lse, *, causal, softmax_scale, dkdv_config=None,
                       dq_config=None, deterministic=True, impl="auto",
                       ds_scratch_bytes=None):
    """Host launcher: (dq, dk, dv), each laid out in its input's dimension order.

    A dK/dV config with "DS_STASH": it stores dS, dq_config is the dQ = dS K kernel's, and
    the heads run in chunks whose scratch fits `ds_scratch_bytes` (DS_SCRATCH_BYTES); where
    one KV head's dS alone exceeds it (long sequences), the dK/dV + dQ pair runs instead.
    Otherwise deterministic=False: one dK/dV kernel that also adds dQ into an fp32 buffer
    (atomics or bulk reduce-adds; no dQ kernel; the buffer is then scaled and cast into dq).
    Block configs given select the Triton-language kernels; `impl` as in `_pick`."""
    if dkdv_config is None and dq_config is None:
        gluon = _gluon_backward(impl, q, k, v, do, causal, deterministic)
        if gluon is not None:
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            with _device(q):
                gluon.gluon_backward(do, q, k, v, out, lse, dq, dk, dv, causal=causal,
                                     softmax_scale=softmax_scale, deterministic=deterministic)
            return dq, dk, dv
    _, dkdv_default, dq_default = kernel_configs(q.shape[-1], q.device,
                                                 deterministic=deterministic)
    dkdv_config, dq_config = dkdv_config or dkdv_default, dq_config or dq_default
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    kw = dict(causal=causal, softmax_scale=softmax_scale)
    with _device(q):
        launch_delta(out, do, delta)
        use_tma = _use_tma(dkdv_config, q, k, v, do)
        mode = dq_mode(dkdv_config, deterministic=deterministic, use_tma=use_tma,
                       on_gpu=q.is_cuda)
        if mode == DQ_STASH:
            heads = ds_stash_heads(q.shape[0] * k.shape[2], q.shape[2] // k.shape[2], q.shape[1],
                                   q.element_size(), ds_scratch_bytes or DS_SCRATCH_BYTES)
            if heads == 0:  # one KV head's dS alone is over the cap
                dkdv_config, dq_config = _pair_configs(q)
                use_tma, mode = _use_tma(dkdv_config, q, k, v, do), DQ_NONE
        if mode == DQ_STASH:
            _stashed_backward(q, k, v, do, lse, delta, dq, dk, dv, dkdv_config, dq_config,
                              use_tma, heads, kw)
        elif mode == DQ_NONE:
            launch_dkdv(q, k, v, do, lse, delta, dk, dv, config=dkdv_config, use_tma=use_tma,
                        **kw)
            launch_dq(q, k, v, do, lse, delta, dq, config=dq_config,
                      use_tma=_use_tma(dq_config, q, k, v, do), **kw)
        else:
            dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            launch_dkdv(q, k, v, do, lse, delta, dk, dv, config=dkdv_config, use_tma=use_tma,
                        dq_acc=dq_acc, mode=mode, **kw)
            dq.copy_(dq_acc.mul_(softmax_scale))
    return dq, dk, dv


def _pair_configs(q):
    """The dK/dV + dQ pair's configs for q's head dim (the stash's fallback)."""
    if q.device.type != "cuda":
        return INTERPRETER_CONFIG, INTERPRETER_CONFIG
    d = q.shape[-1]
    return DKDV_CONFIGS.get(d, SMALL_CONFIG), DQ_CONFIGS.get(d, SMALL_CONFIG)


def _ds_scratch(shape, dtype, device):
    """The dS scratch, uninitialized (tests fill it with NaN: no unwritten entry is read)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _stashed_backward(q, k, v, do, lse, delta, dq, dk, dv, dkdv_config, dq_config, use_tma,
                      chunk, kw):
    """DQ_STASH: per chunk of `chunk` (batch, KV head)s, dK/dV storing dS, then dQ = dS K."""
    batch, seqlen, num_heads, _ = q.shape
    kv_heads, group = batch * k.shape[2], num_heads // k.shape[2]
    ds = _ds_scratch((chunk * group, seqlen, ds_stash_stride(seqlen)), q.dtype, q.device)
    dq_tma = _use_tma(dq_config, q, k, ds)
    for first in range(0, kv_heads, chunk):
        count = min(chunk, kv_heads - first)
        launch_dkdv(q, k, v, do, lse, delta, dk, dv, config=dkdv_config, use_tma=use_tma,
                    dq_acc=ds, mode=DQ_STASH, kv_heads=(first, count), **kw)
        launch_dq_ds(ds, k, dq, heads=(first * group, count * group), config=dq_config,
                     use_tma=dq_tma, **kw)


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper; saves q, k, v, out and the log-sum-exp (no s x s tensor)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, seq_first_out, deterministic=True,
                impl="auto"):
        out, lse = attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                     seq_first_out=seq_first_out, impl=impl)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        ctx.softmax_scale = softmax_scale
        ctx.deterministic = deterministic
        ctx.impl = impl
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, causal=ctx.causal,
                                        softmax_scale=ctx.softmax_scale,
                                        deterministic=ctx.deterministic, impl=ctx.impl)
        return dq, dk, dv, None, None, None, None, None


def flash_attention(q, k, v, *, causal=True, softmax_scale=None, seq_first_out=False,
                    deterministic=True, impl="auto"):
    """Fused attention. q [b, s, hq, d], k, v [b, s, hkv, d] -> out [b, s, hq, d].

    softmax_scale defaults to 1/sqrt(d). The output is contiguous, or, with
    `seq_first_out=True`, a [b, s, hq, d] view of a contiguous [s, b, hq, d] buffer.
    deterministic=False: allows dQ by fp32 atomics in the backward where no dS-stash config
    is tuned (not bitwise repeatable; on the H200 slower wherever timed; attention_bwd.py).
    impl: "auto" runs the Gluon kernels (attention_gluon_fwd/_bwd: Hopper, warp-specialized,
    async wgmma) where they support the inputs and the Triton-language ones elsewhere;
    "triton" forces the latter, "gluon" the former (ValueError naming why it cannot run).
    """
    _check_inputs(q, k, v)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    return FlashAttentionFunction.apply(q, k, v, bool(causal), float(softmax_scale),
                                        bool(seq_first_out), bool(deterministic), impl)


def attention_reference(q, k, v, *, causal=True, softmax_scale=None):
    """Float64 reference with the same layout and GQA convention: [b, s, hq, d]."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    group = q.shape[2] // k.shape[2]
    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k, v))  # [b, h, s, d]
    k64 = k64.repeat_interleave(group, dim=1)
    v64 = v64.repeat_interleave(group, dim=1)
    scores = scale * q64 @ k64.transpose(-1, -2)
    if causal:
        s = q.shape[1]
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return (scores.softmax(-1) @ v64).transpose(1, 2)
