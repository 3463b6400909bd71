"""Parity of every 3D axis on CPU against tp=pp=dp=1: the real megatron-core machinery.

fp32, the same weights (by global name) and tokens, 3 optimizer steps (torch AdamW on megatron
DDP's reduced gradients): the losses and every gradient, gathered over TP shards, match the
single-rank run within TOL relative. Two controls must fail the same comparison: one weight
perturbed by 1e-3 relative, and megatron's default batched p2p at pp=2·vpp=2 with more
micro-batches than stages (the swap bug `launch.steps.p2p_settings` avoids).

Spawned gloo groups (1, 4 and 8 ranks) each run several layouts, so the file costs three
process start-ups, not one per layout.
"""

import pytest

from core.config import Layout
from launch.steps import p2p_settings
from tests.gloo import run_on_gloo
from tests.launch.parity import STEPS, case, compare, merge, train_layouts

# fp32 (unit roundoff 6e-8): TP, SP and DP split the matmul and loss reductions into other
# orders, and the error compounds over 3 Adam steps; measured max 1.25e-6 on this model. The
# perturbed control differs by 1e-3 in one weight; it moves gradients by far more than TOL.
TOL = 1e-5

WORLD4 = [
    case(pp=2),                                              # 1F1B, dp 2
    case(pp=4),                                              # 1F1B over 4 stages
    case(pp=2, vpp=2),                                       # interleaved, 4 micro-batches > 2 stages
    case(tp=2),
    case(tp=2, sequence_parallel=True),
    case(tp=2, pp=2, recompute="selective"),
    case(pp=2, recompute="full", recompute_method="uniform"),
    case(tp=2, sequence_parallel=True, recompute="full", recompute_method="block"),
    case(pp=2, perturb="decoder.layers.2.mlp.linear_fc2.weight"),   # negative control
    case(pp=2, vpp=2, batched_p2p=True),                     # the swap regression
]
WORLD8 = [
    case(tp=2, pp=2),                                        # dp 2
    case(tp=2, pp=2, vpp=2, sequence_parallel=True),
]


@pytest.fixture(scope="module")
def results():
    reference = merge(run_on_gloo(train_layouts, world_size=1, args=([case()],)))[0]
    out = {}
    for world, cases in ((4, WORLD4), (8, WORLD8)):
        for c, result in zip(cases, merge(run_on_gloo(train_layouts, world_size=world, args=(cases,)))):
            out[c.label] = compare(result, reference)
    print("\nlayout | max relative gradient diff | max relative loss diff")
    for label, diff in out.items():
        print(f"{label} | {diff['grad_rel']:.2e} | {diff['loss_rel']:.2e}")
    return out, reference


@pytest.mark.parametrize("label", [c.label for c in WORLD4 + WORLD8
                                   if not (c.perturb or c.batched_p2p)])
def test_layout_matches_single_rank(results, label):
    diffs, reference = results
    assert len(reference["losses"]) == STEPS and len(reference["grads"][0]) == 4 * 6 + 3
    assert diffs[label]["grad_rel"] < TOL and diffs[label]["loss_rel"] < TOL, diffs[label]


def test_perturbed_weight_fails_the_comparison(results):
    diffs, _ = results
    # 1e-3 on one weight moves gradients by about 1e-3 (measured 1.0e-3): 100x TOL
    assert diffs["tp1·pp2·perturbed:decoder.layers.2.mlp.linear_fc2.weight"]["grad_rel"] > 10 * TOL


def test_batched_p2p_swaps_tensors_at_pp2_vpp2(results):
    """Regression: megatron's default batched p2p is wrong for pp=2·vpp=2 with more
    micro-batches than stages, so `p2p_settings` never batches there, on either path."""
    diffs, _ = results
    assert diffs["tp1·pp2·vpp2·batched-p2p"]["grad_rel"] > 1e-2  # far off, not roundoff
    assert diffs["tp1·pp2·vpp2"]["grad_rel"] < TOL
    for device in ("cpu", "cuda"):
        assert p2p_settings(Layout(pp=2, vpp=2), device=device)["batch_p2p_comm"] is False
    assert p2p_settings(Layout(pp=2, vpp=2), device="cuda")["overlap_p2p_comm"] is True
    # overlapped p2p with deallocated outputs was wrong over gloo: never both on CPU
    cpu = p2p_settings(Layout(pp=2, vpp=2), device="cpu")
    assert not (cpu["overlap_p2p_comm"] and cpu["deallocate_pipeline_outputs"])
