"""analysis.summary: the baseline, the prediction mismatches and what calibration is fit on."""

import pytest

from analysis import summary
from analysis.summary import headline, mismatches


def _row(trial, mfu, *, mbs=2, attention="sdpa_cudnn", norm="triton", status="ok", **extra):
    return {"trial": trial, "status": status, "mfu_palm": mfu, "mbs": mbs, "attention": attention,
            "norm": norm, "device": "H100", **extra}


def test_the_baseline_is_the_best_trial_of_the_stock_spec_only():
    rows = [_row("ours", 0.50),
            _row("stock_attention_our_norm", 0.40, attention="megatron"),  # half stock: not the baseline
            _row("our_attention_stock_norm", 0.35, norm="megatron"),
            _row("stock_slow", 0.10, attention="megatron", norm="megatron"),
            _row("stock_fast", 0.20, attention="megatron", norm="megatron", mbs=4),
            _row("stock_diverged", None, attention="megatron", norm="megatron", status="diverged"),
            _row("stock_oom", None, attention="megatron", norm="megatron", status="oom")]
    result = headline(rows)
    assert result["baseline_trial"] == "stock_fast" and result["baseline_mfu_palm"] == 0.20
    assert headline(rows[:3])["baseline_trial"] is None  # no stock trial ran: no baseline


def test_the_small_micro_batch_ratio_uses_the_best_mbs1_trial_that_ran():
    rows = [_row("best", 0.40, mbs=8), _row("mbs1_slow", 0.10, mbs=1), _row("mbs1", 0.30, mbs=1),
            _row("mbs1_diverged", None, mbs=1, status="diverged")]
    result = headline(rows)
    assert result["best_mbs1_trial"] == "mbs1" and result["mbs1_over_best"] == pytest.approx(0.75)


def _predicted(trial, status, fits, *, reason=None, peak=None):
    return {"trial": trial, "status": status, "reason": reason, "predicted_fits": fits,
            "predicted_memory_gb": 9.0, "peak_memory_gb": peak}


def test_mismatches_are_the_trials_whose_outcome_contradicts_the_memory_prediction():
    rows = [_predicted("oom_predicted_fit", "oom", True),
            _predicted("ok_predicted_oom", "ok", False, peak=7.5),
            _predicted("oom_as_predicted", "oom", False),
            _predicted("ok_as_predicted", "ok", True, peak=7.5),
            _predicted("pruned", "skipped", False, reason="predicted OOM: 9.0 GiB > 8.0 GiB"),
            _predicted("no_prediction", "oom", None),
            _predicted("diverged", "diverged", True)]
    assert mismatches(rows) == [
        "oom_predicted_fit: ran out of memory, predicted to fit (9.0 GiB)",
        "ok_predicted_oom: fit (7.5 GiB), predicted OOM (9.0 GiB)",
    ]


def test_calibration_is_fit_on_ok_and_oom_trials_only(tmp_path, monkeypatch):
    from core.config import ClusterConfig, Layout, ModelConfig, TrialConfig
    from core.records import write_json_atomic
    from core.spec import TrialSpec
    from launch.record import base_record
    from sweeper import calibration, constants

    for mbs, status in enumerate(("ok", "oom", "diverged", "error", "timeout", "skipped"), 1):
        spec = TrialSpec(model=ModelConfig(), cluster=ClusterConfig(), layout=Layout(mbs=mbs),
                         trial=TrialConfig(), trial_dir=str(tmp_path / f"t{mbs}"))
        record = {**base_record(spec, status), "step_time_s": 0.1, "tokens_per_s": 1.0,
                  "mfu": {"palm": 0.1}, "peak_memory_gb_max": 1.0}
        write_json_atomic(tmp_path / f"t{mbs}" / "result.json", record)
    seen = []
    monkeypatch.setattr(calibration, "fit_calibration", lambda recs, m, c: seen.extend(recs) or "fit")
    monkeypatch.setattr(constants, "save_calibration", lambda cal, path: None)
    assert summary._calibrate(tmp_path) == str(tmp_path / "calibration.json")
    assert sorted(r["status"] for r in seen) == ["ok", "oom"]
    assert sorted(r["layout"]["mbs"] for r in seen) == [1, 2]


def test_only_ok_trials_with_an_mfu_are_ranked_and_the_device_comes_from_one_that_ran():
    from analysis.leaderboard import ranked

    rows = [_row("no_device", 0.5, device=None), _row("fast", 0.4), _row("no_mfu", None),
            _row("diverged_but_fast", 0.9, status="diverged")]
    assert [r["trial"] for r in ranked(rows)] == ["no_device", "fast"]
    assert headline(rows)["device"] == "H100"


def test_a_pruned_layout_listed_first_does_not_hide_later_mismatches():
    rows = [_predicted("pruned", "skipped", False, reason="predicted OOM: 9.0 GiB > 8.0 GiB"),
            _predicted("oom_predicted_fit", "oom", True)]
    assert mismatches(rows) == ["oom_predicted_fit: ran out of memory, predicted to fit (9.0 GiB)"]


def test_the_summary_callback_summarizes_the_sweep_directory_unless_nothing_ran(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from sweeper.lock import SweepLock

    def config(dry_run, where):
        return OmegaConf.create({"hydra": {"sweep": {"dir": str(where)}}, "sweep": {"dry_run": dry_run}})

    written = []
    monkeypatch.setattr(summary, "finish_sweep", lambda sweep_dir: written.append(sweep_dir))
    callback = summary.SummaryCallback()
    callback.on_multirun_end(config(True, tmp_path))
    callback.on_multirun_end(config(False, tmp_path / "never_made"))
    assert written == []
    callback.on_multirun_end(config(False, tmp_path))
    assert written == [tmp_path] and not (tmp_path / "sweep.lock").exists()  # taken, and given back
    with SweepLock(tmp_path):  # ... so another live driver's directory is left alone
        callback.on_multirun_end(config(False, tmp_path))
    assert written == [tmp_path]
