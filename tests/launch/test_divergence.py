"""A trial whose loss is not finite ends `diverged`: never ok, never ranked, never calibrated on."""

import json
import math

import pytest

from core.config import ClusterConfig, ConfigError, Layout, ModelConfig, TrialConfig
from core.spec import TrialSpec
from launch.divergence import Diverged, StepGuard, first_non_finite, planted
from launch.record import classify, trial_record
from tests.launch.sweeps import records, run_sweep, trial_name


def _spec(tmp_path, **trial) -> TrialSpec:
    return TrialSpec(model=ModelConfig(), cluster=ClusterConfig(), layout=Layout(gbs=4),
                     trial=TrialConfig(warmup_steps=0, measure_steps=3, **trial), trial_dir=str(tmp_path))


def test_first_non_finite_names_the_first_bad_value():
    assert first_non_finite(loss=2.0, grad_norm=None) is None
    assert first_non_finite(loss=2.0, grad_norm=math.inf) == ("grad_norm", math.inf)
    name, value = first_non_finite(loss=math.nan, grad_norm=math.inf)
    assert name == "loss" and math.isnan(value)


def test_the_guard_raises_at_the_step_whose_loss_is_not_finite(tmp_path):
    guard = StepGuard(_spec(tmp_path), chunks=[])
    guard.after_step(0, loss=7.0, grad_norm=1.5)
    guard.after_step(1, loss=6.9, grad_norm=1.4)
    with pytest.raises(Diverged) as caught:
        guard.after_step(2, loss=math.nan, grad_norm=1.3)
    assert caught.value.record == {"diverged_step": 2, "losses": [7.0, 6.9, None]}
    assert "loss is nan at step 2" in str(caught.value)
    assert classify(caught.value) == "diverged"
    assert guard.record() == {"grad_norms": [1.5, 1.4, 1.3]}
    with pytest.raises(Diverged, match="grad_norm is inf at step 3"):
        guard.after_step(3, loss=6.8, grad_norm=math.inf)  # a finite loss does not hide it


def test_the_guard_checks_a_ranks_own_gradients_where_it_has_no_loss(tmp_path):
    import torch

    layer = torch.nn.Linear(3, 2)
    layer.weight.grad = torch.zeros(2, 3)
    guard = StepGuard(_spec(tmp_path), chunks=[layer])
    guard.after_step(0, loss=None, local_grads=True)  # a pipeline stage without the loss
    layer.weight.main_grad = torch.zeros(2, 3)
    layer.weight.main_grad[1, 2] = math.nan  # megatron DDP's buffer wins over .grad
    with pytest.raises(Diverged, match="local_gradients is nan at step 1"):
        guard.after_step(1, loss=None, local_grads=True)


def test_a_plant_applies_only_to_the_trials_it_names(tmp_path):
    name = Layout(gbs=4).name
    assert planted(TrialConfig(plant="non_causal"), name) == "non_causal"
    assert planted(TrialConfig(plant="non_causal", plant_if_name_contains="mbs1_"), name) == "non_causal"
    assert planted(TrialConfig(plant="non_causal", plant_if_name_contains="mbs2_"), name) is None
    assert planted(TrialConfig(), name) is None
    with pytest.raises(ConfigError, match="trial.plant must be one of"):
        planted(TrialConfig(plant="nan"), name)


def test_a_rank_that_diverged_decides_the_trial_over_ranks_stopped_after_it(tmp_path):
    spec = _spec(tmp_path)
    ranks = [{"rank": 0, "status": "error", "secondary": True, "error": "stopped 15 s after rank 1 failed"},
             {"rank": 1, "status": "diverged", "error": "Diverged: loss is nan at step 2",
              "diverged_step": 2, "losses": [7.0, 6.9, None]}]
    record = trial_record(spec, ranks, wall_s=1.0)
    assert record["status"] == "diverged" and record["diverged_step"] == 2
    assert record["reason"] == "rank 1: Diverged: loss is nan at step 2"
    assert record["losses"] == [7.0, 6.9, None] and "mfu" not in record
    # A rank's own timeout still decides, whatever another rank saw.
    ranks[0].update(status="timeout", secondary=False)
    assert trial_record(spec, ranks, wall_s=1.0)["status"] == "timeout"


def test_a_diverged_trial_is_recorded_and_never_ranked_or_calibrated_on(tmp_path):
    """End to end on CPU: NaN weights after step 1 make step 2's loss NaN through the real model
    (with tp 2, both ranks see it at the same step)."""
    sweep_dir = tmp_path / "sweep"
    good, bad = trial_name(tp=1, mbs=2, gbs=4), trial_name(tp=2, mbs=2, gbs=4)
    result = run_sweep(sweep_dir, "layout.tp=1,2", "layout.pp=1", "layout.mbs=2", "layout.gbs=4",
                       "trial.warmup_steps=0", "trial.measure_steps=4", "layout.recompute=none",
                       "layout.attention=sdpa", "layout.norm=torch", "trial.plant=nan_weights",
                       "trial.plant_if_name_contains=tp2_", "trial.plant_step=2")
    assert result.returncode == 0, result.stderr[-3000:]
    recs = records(sweep_dir)
    assert recs[good]["status"] == "ok" and all(math.isfinite(x) for x in recs[good]["losses"])
    diverged = recs[bad]
    assert diverged["status"] == "diverged" and diverged["diverged_step"] == 2
    assert "loss is nan at step 2" in diverged["reason"]
    assert diverged["losses"][:2] == pytest.approx(recs[good]["losses"][:2], rel=1e-4)  # same tokens
    assert diverged["losses"][2] is None and "mfu" not in diverged
    board = json.loads((sweep_dir / "leaderboard.json").read_text())
    assert board["summary"]["ok"] == 1 and board["summary"]["best_trial"] == good
    table = (sweep_dir / "leaderboard.md").read_text().split("\n\nTrials:")[0]
    assert "tp2 pp1" not in table  # not in the ranked table
    assert f"| {bad} | diverged |" in (sweep_dir / "leaderboard.md").read_text()
    # calibration: tests/analysis/test_summary.py checks that only ok and oom records are fit


class _Block(__import__("torch").nn.Module):
    """A stand-in for a model chunk: a norm-like vector, an MLP output weight, and two
    attention modules (one causal, one not) carrying megatron's `attn_mask_type`."""

    def __init__(self):
        import torch
        from megatron.core.transformer.enums import AttnMaskType

        super().__init__()
        self.norm = torch.nn.Parameter(torch.ones(4))
        self.embedding = torch.nn.Parameter(torch.ones(3, 4))
        self.mlp = torch.nn.Module()
        self.mlp.linear_fc2 = torch.nn.Linear(4, 4, bias=False)
        torch.nn.init.constant_(self.mlp.linear_fc2.weight, 2.0)
        self.attention, self.cross = torch.nn.Module(), torch.nn.Module()
        self.attention.attn_mask_type, self.cross.attn_mask_type = AttnMaskType.causal, AttnMaskType.padding


def _planted(tmp_path, plant, **trial):
    spec = _spec(tmp_path, plant=plant, **trial)
    block = _Block()
    return StepGuard(spec, [block]), block


def test_non_causal_unmasks_only_the_causal_attention(tmp_path):
    from megatron.core.transformer.enums import AttnMaskType

    _, block = _planted(tmp_path, "non_causal")
    assert block.attention.attn_mask_type == AttnMaskType.no_mask
    assert block.cross.attn_mask_type == AttnMaskType.padding
    _, untouched = _planted(tmp_path, None)
    assert untouched.attention.attn_mask_type == AttnMaskType.causal
    with pytest.raises(RuntimeError, match="found no causal attention module"):
        StepGuard(_spec(tmp_path, plant="non_causal"), [__import__("torch").nn.Linear(2, 2)])


def test_perturb_weight_scales_the_mlp_output_weight_only(tmp_path):
    from launch.divergence import PERTURBATION

    _, block = _planted(tmp_path, "perturb_weight")
    assert (block.mlp.linear_fc2.weight == 2.0 * (1 + PERTURBATION)).all()
    assert (block.embedding == 1.0).all() and (block.norm == 1.0).all()
    _, other = _planted(tmp_path, "perturb_weight", plant_if_name_contains="mbs8_")  # not this trial
    assert (other.mlp.linear_fc2.weight == 2.0).all()


def test_nan_weights_poison_the_weights_after_the_step_before_plant_step(tmp_path):
    guard, block = _planted(tmp_path, "nan_weights", plant_step=2)
    guard.after_step(0, loss=7.0)
    assert not block.mlp.linear_fc2.weight.isnan().any()
    guard.after_step(1, loss=6.9)  # poisoned now: step 2's forward sees NaN weights
    assert block.mlp.linear_fc2.weight.isnan().all() and not block.embedding.isnan().any()
    other, clean = _planted(tmp_path, "perturb_weight", plant_step=2)
    other.after_step(1, loss=6.9)
    assert not clean.mlp.linear_fc2.weight.isnan().any()


def test_local_gradients_are_summed_over_every_parameter(tmp_path):
    import torch

    block = _Block()
    guard = StepGuard(_spec(tmp_path), [block])
    block.norm.grad = torch.full((4,), -1.0)  # abs: signs cannot cancel
    block.embedding.grad = torch.full((3, 4), 0.5)
    block.mlp.linear_fc2.weight.main_grad = torch.full((4, 4), 0.25)
    assert guard._local_grads_sum() == 4 * 1.0 + 12 * 0.5 + 16 * 0.25
    block.embedding.grad[0, 0] = math.inf
    guard.after_step(0, loss=7.0)  # not asked to look at the gradients
    with pytest.raises(Diverged, match="local_gradients is inf"):
        guard.after_step(1, loss=7.0, local_grads=True)
