"""RoPE on one GPU: our fused Triton kernel vs megatron-core's unfused RoPE, in one run.

    GIT_COMMIT=<sha> python -m benchmarks.bench_rope [--out benchmarks/results/rope_<gpu>_<date>.json]

Needs CUDA. GIT_COMMIT names the commit measured (.git may not travel with the tree;
without it `git rev-parse HEAD` is tried).

What it does, all in one process so the numbers compare:
  1. at each shape, q and k as megatron's SelfAttention hands them to core attention
     (views of one fused QKV buffer [s, b, ng, (group + 2) * d], bf16): a device copy of
     the same bytes (q and k, one launch) as the bandwidth roofline;
  2. a small sweep of our launch configurations (tile size, warps) on the launcher alone;
  3. forward and forward+backward through autograd of:
       ours               kernels.rope.apply_rope (one Triton launch each way)
       megatron           megatron-core 0.16's `apply_rotary_pos_emb` on q and on k, unfused
                          (apply_rope_fusion needs Transformer Engine), with the embedding
                          from megatron's RotaryEmbedding computed once, as its lru_cache does
                          in training
       megatron_compiled  torch.compile of that
       torch_compile      torch.compile of kernels.rope.torch_rope (the fp32 reference)
     each timed by benchmarks.common's three timings (`gpu`: CUDA events with the host run ahead and
     L2 flushed; `do_bench`: triton's median; `cpu_us`: host time per call), and checked
     against a float64 rotation (outputs and gradients);
  4. torch.profiler kernel tables of ours and megatron's forward+backward at the first shape.

Bytes a fused RoPE must move, in bf16: forward reads q, k and writes q_rot, k_rot
(2 * (|q| + |k|) * 2 bytes); backward the same for the gradients. Ratios are peer time over
our time (above 1: ours is faster), from timings taken in this run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import time

import torch
import triton

from benchmarks.common import commit, gpu_ms, kernel_table, relerr, tbs, time_all, write_json
from kernels import rope as ours

# (s, b, ng, group, d): llama_1b3 (16 heads, MHA, d = 128, seq 2048) at mbs 1 and 4, and a
# GQA variant (16 query heads over 4 KV heads) at mbs 4.
SHAPES = ((2048, 1, 16, 1, 128), (2048, 4, 16, 1, 128), (2048, 4, 4, 4, 128))
BASE = 10000.0
DTYPE = torch.bfloat16
DEVICE = "cuda"
SWEEP_TILES = (512, 1024, 2048, 4096, 8192)
SWEEP_WARPS = (1, 2, 4, 8)


def _inputs(s, b, ng, group, d, seed):
    """q [s, b, ng * group, d], k [s, b, ng, d] split from one fused QKV buffer (q is a view
    when group == 1, else a copy, as in megatron), both leaves; and their output gradients."""
    torch.manual_seed(seed)
    mixed = torch.randn(s, b, ng, (group + 2) * d, device=DEVICE, dtype=DTYPE)
    query, key, _ = torch.split(mixed, [group * d, d, d], dim=3)
    q = query.reshape(s, b, ng * group, d).requires_grad_()
    k = key.requires_grad_()
    return q, k, torch.randn(q.shape, device=DEVICE, dtype=DTYPE), torch.randn(
        k.shape, device=DEVICE, dtype=DTYPE)


def _rotate64(t, sign=1.0):
    """Float64 rotation by sign * theta (sign -1: the gradient's transpose)."""
    s, d = t.shape[0], t.shape[-1]
    inv_freq = BASE ** (-torch.arange(0, d, 2, dtype=torch.float64, device=t.device) / d)
    theta = torch.arange(s, dtype=torch.float64, device=t.device)[:, None] * inv_freq
    cos, sin = theta.cos()[:, None, None, :], sign * theta.sin()[:, None, None, :]
    x1, x2 = t.double().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def megatron_rope(head_dim: int, s: int):
    """megatron-core's unfused RoPE of q and k, embedding made once by RotaryEmbedding."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=head_dim * 16, num_attention_heads=16,
                               apply_rope_fusion=False)
    emb = RotaryEmbedding(kv_channels=head_dim, rotary_percent=1.0, rotary_base=BASE,
                          use_cpu_initialization=False)(s)
    no_cp = object()  # cp_group is read only for packed (thd) inputs; skips parallel_state

    def rope(q, k):
        return (apply_rotary_pos_emb(q, emb, config, cp_group=no_cp),
                apply_rotary_pos_emb(k, emb, config, cp_group=no_cp))

    return rope


def implementations(head_dim: int, s: int):
    megatron = megatron_rope(head_dim, s)
    return {
        "ours": lambda q, k: ours.apply_rope(q, k, base=BASE),
        "megatron": megatron,
        "megatron_compiled": torch.compile(megatron, dynamic=False),
        "torch_compile": torch.compile(lambda q, k: ours.torch_rope(q, k, base=BASE),
                                       dynamic=False),
    }


def sweep(q, k, nbytes):
    """Forward launcher alone per (tile, warps); the backward is the same kernel."""
    q_heads, k_heads, d = q.shape[2], k.shape[2], q.shape[3]
    rows = []
    for tile in SWEEP_TILES:
        for warps in SWEEP_WARPS:
            cfg = ours.launch_config(q_heads, k_heads, d, tile_elements=tile)._replace(
                num_warps=warps)
            try:
                ms = gpu_ms(lambda cfg=cfg: ours.rotate(q, k, base=BASE, config=cfg), reps=20)
                rows.append(dict(config=cfg._asdict(), tile_elements=tile, ms=ms,
                                 tbs=tbs(nbytes, ms)))
            except Exception as e:  # noqa: BLE001 - a config the compiler rejects
                rows.append(dict(config=cfg._asdict(), error=repr(e)[:200]))
    return rows


def _errors(fn, q, k, dq, dk):
    q_rot, k_rot = fn(q, k)
    torch.autograd.backward((q_rot, k_rot), (dq, dk))
    errs = dict(q=relerr(q_rot, _rotate64(q.detach())), k=relerr(k_rot, _rotate64(k.detach())),
                dq=relerr(q.grad, _rotate64(dq, -1.0)), dk=relerr(k.grad, _rotate64(dk, -1.0)))
    q.grad, k.grad = None, None
    return errs


def measure_shape(shape, *, profile=False):
    s, b, ng, group, d = shape
    q, k, dq, dk = _inputs(*shape, seed=sum(shape))
    elements = q.numel() + k.numel()
    fwd_bytes = 2 * elements * 2
    out = dict(s=s, b=b, q_heads=ng * group, k_heads=ng, head_dim=d, fwd_bytes=fwd_bytes,
               q_strides=list(q.stride()), k_strides=list(k.stride()),
               default_config=ours.launch_config(ng * group, ng, d)._asdict())
    src = torch.randn(elements, device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    out["copy"] = time_all(lambda: dst.copy_(src), fwd_bytes)
    del src, dst
    out["sweep"] = sweep(q.detach(), k.detach(), fwd_bytes)
    best = max((r for r in out["sweep"] if "tbs" in r), key=lambda r: r["tbs"])
    out["sweep_best"] = best
    print(f"{shape} sweep best {best['config']} {best['tbs']:.2f} TB/s", flush=True)

    out["impls"] = {}
    for name, fn in implementations(d, s).items():
        t0 = time.time()
        try:
            errs = _errors(fn, q, k, dq, dk)

            def fwd_bwd(fn=fn):
                torch.autograd.backward(fn(q, k), (dq, dk))

            res = out["impls"][name] = dict(
                fwd=time_all(lambda fn=fn: fn(q, k), fwd_bytes),
                fwdbwd=time_all(fwd_bwd, 2 * fwd_bytes, grad_to_none=[q, k]),
                relerr=errs)
            print(f"{shape} {name:18s} fwd {res['fwd']['gpu_ms'] * 1e3:7.1f} us "
                  f"({res['fwd']['gpu_tbs']:.2f} TB/s) | fwd+bwd {res['fwdbwd']['gpu_ms'] * 1e3:7.1f}"
                  f" us ({res['fwdbwd']['gpu_tbs']:.2f} TB/s) | host {res['fwdbwd']['cpu_us']:.0f}"
                  f" us | err {max(errs.values()):.1e} ({time.time() - t0:.0f}s)", flush=True)
            if profile and name in ("ours", "megatron"):
                out[f"profile_{name}_fwdbwd"] = kernel_table(fwd_bwd, [q, k])
                print(out[f"profile_{name}_fwdbwd"], flush=True)
        except Exception as e:  # noqa: BLE001 - reported; the other peers still run
            out["impls"][name] = dict(error=repr(e)[:300])
            print(f"{shape} {name} failed: {e!r}"[:400], flush=True)
        q.grad, k.grad = None, None
    out["ratios"] = {timing: _ratios(out, timing) for timing in ("gpu", "do_bench")}
    return out


def _ratios(out, timing):
    """Peer time over ours (> 1: ours faster), and ours over the copy's bandwidth."""
    key = f"{timing}_ms"
    mine = out["impls"]["ours"]
    if "fwd" not in mine:
        return {}
    peers = {k: v for k, v in out["impls"].items() if k != "ours" and "fwd" in v}
    ratios = {f"{part}_speedup_over_{k}": v[part][key] / mine[part][key]
              for k, v in peers.items() for part in ("fwd", "fwdbwd")}
    copy_tbs = out["copy"][f"{timing}_tbs"]
    ratios["fwd_over_copy"] = mine["fwd"][f"{timing}_tbs"] / copy_tbs
    ratios["fwdbwd_over_copy"] = mine["fwdbwd"][f"{timing}_tbs"] / copy_tbs
    return ratios


def main():
    props = torch.cuda.get_device_properties(0)
    today = datetime.date.today().isoformat()
    gpu = re.sub(r"[^a-z0-9]+", "_", props.name.lower()).strip("_")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=f"benchmarks/results/rope_{gpu}_{today}.json")
    args = parser.parse_args()
    result = dict(
        benchmark="rope", date=today, git_commit=commit(), device=props.name,
        sm_count=props.multi_processor_count, torch=torch.__version__,
        triton=triton.__version__, dtype="bfloat16", base=BASE,
        method=__doc__.split("What it does")[1].strip(),
        peers=["megatron", "megatron_compiled", "torch_compile"],
    )
    try:
        from importlib.metadata import version

        result["megatron_core"] = version("megatron-core")
    except Exception:  # noqa: BLE001
        result["megatron_core"] = None
    print({k: result[k] for k in ("device", "torch", "triton", "megatron_core", "git_commit")},
          flush=True)
    result["shapes"] = {}
    for i, shape in enumerate(SHAPES):
        key = "x".join(map(str, shape))
        result["shapes"][key] = measure_shape(shape, profile=i == 0)
        torch.cuda.empty_cache()
    result["summary"] = {
        timing: {key: s["ratios"][timing] for key, s in result["shapes"].items()}
        for timing in ("gpu", "do_bench")
    }
    write_json(args.out, result)
    print("summary (gpu timing)", json.dumps(result["summary"]["gpu"], indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
