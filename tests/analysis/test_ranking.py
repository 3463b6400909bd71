"""Ranking-quality figures: each statistic against a hand computation, and the scorer
against records built from the models' own predictions (exact) and perturbed ones."""

import pytest

from analysis.ranking import kendall_tau, prediction_quality, score, spearman, top_k_regret
from core.config import ClusterConfig, Layout, ModelConfig, as_dict
from sweeper.memory import predict_memory
from sweeper.speed import predict_speed

MODEL = ModelConfig(name="m", num_layers=8, hidden_size=1024, ffn_hidden_size=2816,
                    num_attention_heads=8, num_query_groups=8, vocab_size=32000, seq_length=1024)
CLUSTER = ClusterConfig(name="h100_80gb", device="cuda", gpus_per_node=1, nodes=1,
                        gpu_memory_gb=79.1, peak_tflops=989.4)


def test_statistics_by_hand():
    # One swapped pair of 4: 5 concordant, 1 discordant -> tau = 4/6; Spearman
    # 1 - 6*sum(d^2)/(n(n^2-1)) = 1 - 6*2/60 = 0.8.
    x, y = [1, 2, 3, 4], [1, 3, 2, 4]
    assert kendall_tau(x, y) == pytest.approx(4 / 6)
    assert spearman(x, y) == pytest.approx(0.8)
    assert kendall_tau(x, [4, 3, 2, 1]) == pytest.approx(-1.0)
    # predicted best is index 0 (measured 0.4), measured best 0.5: regret 0.2
    assert top_k_regret([0.9, 0.1, 0.2], [0.4, 0.3, 0.5], 1) == pytest.approx(0.2)
    assert top_k_regret([0.9, 0.1, 0.2], [0.4, 0.3, 0.5], 2) == pytest.approx(0.0)
    assert spearman([1], [1]) is None


def _record(layout: Layout, when: int, *, time_factor=1.0, memory_factor=1.0, status="ok") -> dict:
    memory = predict_memory(MODEL, CLUSTER, layout)
    speed = predict_speed(MODEL, CLUSTER, layout)
    step = speed.step_time_s * time_factor
    return {"trial": layout.name, "status": status, "model": as_dict(MODEL), "cluster": as_dict(CLUSTER),
            "layout": as_dict(layout), "dp": 1, "recorded_at": f"2026-12-01T00:00:{when:02d}",
            "step_time_s": step, "mfu": {"palm": speed.mfu / time_factor},
            "peak_memory_gb_max": memory.reserved_gb * memory_factor,
            "peak_memory_gb": memory.reserved_gb * memory_factor,
            "ranks": [{"peak_memory_allocated_gb": memory.allocated_gb * memory_factor}]}


LAYOUTS = [Layout(mbs=m, gbs=16, recompute=rc, attention="sdpa_cudnn", norm="triton")
           for m in (1, 2, 4) for rc in ("none", "selective", "full")]


def test_exact_records_score_perfectly():
    q = score([_record(l, i) for i, l in enumerate(LAYOUTS)])
    assert q["memory_median_abs_err"] == pytest.approx(0.0, abs=1e-12)
    assert q["step_time_median_abs_err"] == pytest.approx(0.0, abs=1e-12)
    assert q["kendall_tau"] == pytest.approx(1.0) and q["top1_regret"] == 0.0


def test_errors_and_ranking_see_perturbations():
    # Negative control: 10% slower and 5% larger everywhere moves the errors, not the order.
    q = score([_record(l, i, time_factor=1.1, memory_factor=1.05) for i, l in enumerate(LAYOUTS)])
    assert q["step_time_median_abs_err"] == pytest.approx(1 - 1 / 1.1)
    assert q["memory_median_abs_err"] == pytest.approx(1 - 1 / 1.05)
    assert q["kendall_tau"] == pytest.approx(1.0)
    # Reversing the measured order flips tau and costs top-1 regret.
    flipped = [_record(l, i) for i, l in enumerate(LAYOUTS)]
    for r in flipped:
        r["mfu"]["palm"] = 1.0 / r["mfu"]["palm"]
    q = score(flipped)
    assert q["kendall_tau"] < -0.8 and q["top1_regret"] > 0.5


def test_refit_scores_only_unseen_trials():
    recs = [_record(l, i, time_factor=1.3) for i, l in enumerate(LAYOUTS)]
    q0 = prediction_quality(recs)
    q3 = prediction_quality(recs, refit_first=3)
    assert q3["trials"] == len(LAYOUTS) - 3 and q3["refit_on"] == [l.name for l in LAYOUTS[:3]]
    assert q0["step_time_median_abs_err"] == pytest.approx(1 - 1 / 1.3)
    assert q3["step_time_median_abs_err"] < 0.5 * q0["step_time_median_abs_err"]


def test_quality_markdown_is_a_table_and_survives_no_trials():
    from analysis.ranking import quality_markdown, quality_summary

    table = quality_markdown(quality_summary([_record(l, i) for i, l in enumerate(LAYOUTS)]))
    assert table[0].count("|") == table[2].count("|") == 4  # figure, default, refit: no stray pipes
    empty = quality_summary([])
    assert empty["default"]["trials"] == 0 and empty["default"]["spearman"] is None
    assert quality_markdown(empty)[2].endswith("|  |  |")


def test_quality_headline_flattens_the_issue_figures():
    from analysis.ranking import quality_headline, quality_summary

    recs = [_record(l, i, time_factor=1.2) for i, l in enumerate(LAYOUTS)]
    flat = quality_headline(quality_summary(recs))
    assert flat["step_time_median_abs_err"] == pytest.approx(1 - 1 / 1.2)
    assert flat["step_time_median_abs_err_refit"] < flat["step_time_median_abs_err"]
    assert flat["kendall_tau"] == pytest.approx(1.0) and flat["top1_regret"] == 0.0
