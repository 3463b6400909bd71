"""Time pruning and ranking 10,000 layouts with the memory and speed models (pure Python).

    python -m benchmarks.bench_estimate [--layouts 10000] [--budget-s 2.0]

Pruning: validity check, then the memory model; ranking: the speed model for the
layouts predicted to fit, sorted by predicted MFU. Exits 1 if the whole takes
longer than the budget (the issue's target: under 2 s on the 2-core dev machine).
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time

from core.config import ClusterConfig, Layout, ModelConfig
from sweeper.memory import predict_memory
from sweeper.speed import predict_speed
from sweeper.validity import invalid_reason

# conf/model/llama2_70b.yaml on conf/cluster/h100_80gb.yaml (4 nodes of 8).
MODEL = ModelConfig(name="llama2_70b", num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
                    num_attention_heads=64, num_query_groups=8, vocab_size=32000, seq_length=4096)
CLUSTER = ClusterConfig(name="h100_80gb", device="cuda", gpus_per_node=8, nodes=4, gpu_memory_gb=79.1,
                        peak_tflops=989.4, intra_node_bw_gbps=450.0, inter_node_bw_gbps=50.0)


def layouts(count: int, seed: int = 0) -> list[Layout]:
    """`count` layouts drawn without replacement from a broad space (34,560 points)."""
    axes = list(itertools.product(
        (1, 2, 4, 8), (1, 2, 4, 8, 16), (1, 2, 4), (1, 2, 4, 8), (256, 512),
        ("none", "selective", "full"), (False, True), (False, True),
        ("triton", "sdpa_cudnn", "megatron"), ("triton", "torch"),
    ))
    picked = random.Random(seed).sample(axes, min(count, len(axes)))
    return [Layout(tp=tp, pp=pp, vpp=vpp, mbs=mbs, gbs=gbs, recompute=rc, sequence_parallel=sp,
                   distributed_optimizer=do, attention=attn, norm=norm)
            for tp, pp, vpp, mbs, gbs, rc, sp, do, attn, norm in picked]


def prune_and_rank(candidates: list[Layout]) -> tuple[list, int, int]:
    world = CLUSTER.world_size
    invalid = oom = 0
    ranked = []
    for layout in candidates:
        if invalid_reason(MODEL, layout, world):
            invalid += 1
            continue
        memory = predict_memory(MODEL, CLUSTER, layout)
        if not memory.fits:
            oom += 1
            continue
        ranked.append((predict_speed(MODEL, CLUSTER, layout).mfu, memory.peak_gb, layout))
    ranked.sort(key=lambda r: -r[0])
    return ranked, invalid, oom


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", type=int, default=10_000)
    parser.add_argument("--budget-s", type=float, default=2.0)
    args = parser.parse_args()
    candidates = layouts(args.layouts)
    # Also time the models alone on every layout, valid or not (the worst case).
    start = time.perf_counter()
    ranked, invalid, oom = prune_and_rank(candidates)
    elapsed = time.perf_counter() - start
    start = time.perf_counter()
    for layout in candidates:
        predict_memory(MODEL, CLUSTER, layout)
        predict_speed(MODEL, CLUSTER, layout)
    models_only = time.perf_counter() - start
    print(f"{len(candidates)} layouts of {MODEL.name} on {CLUSTER.name}: {invalid} invalid, "
          f"{oom} predicted OOM, {len(ranked)} ranked in {elapsed:.3f} s (budget {args.budget_s} s)")
    print(f"memory + speed models on all {len(candidates)}: {models_only:.3f} s")
    for mfu, peak, layout in ranked[:5]:
        print(f"  MFU {100 * mfu:5.1f}%  {peak:5.1f} GiB  {layout.name}")
    return 0 if elapsed <= args.budget_s and models_only <= args.budget_s else 1


if __name__ == "__main__":
    sys.exit(main())
