"""core.spec: the typed Prediction, its JSON in spec.json and result.json, and old records on disk."""

import dataclasses
import json
import tarfile

import pytest

from core.config import ClusterConfig, ConfigError, Layout, ModelConfig, TrialConfig
from core.paths import REPO_ROOT
from core.record_check import record_problem
from core.spec import Prediction, TrialSpec

RESULTS = REPO_ROOT / "benchmarks" / "results"
TERMS = {"weights": 2.5, "grads": 5.0, "activations": 1.25}
# As sweeper.plan.prediction_for writes it since 2026-12-01, keys in the order of the JSON.
NEW = {"peak_memory_gb": 10.0, "reserved_gb": 9.0, "allocated_gb": 8.5, "fits": True,
       "step_time_s": 0.5, "mfu": 0.42, "memory_terms_gb": TERMS}


def _first(tgz: str, name: str) -> dict:
    """The first `name` (spec.json, result.json) in a recorded sweep's trials archive."""
    with tarfile.open(RESULTS / tgz) as archive:
        member = next(m for m in archive if m.name.endswith("/" + name))
        return json.load(archive.extractfile(member))


def test_a_prediction_round_trips_in_the_json_shape_and_order_it_is_written_in():
    prediction = Prediction.from_dict(NEW)
    assert (prediction.fits, prediction.mfu, prediction.memory_terms_gb) == (True, 0.42, TERMS)
    assert list(prediction.to_dict().items()) == list(NEW.items())
    with pytest.raises(dataclasses.FrozenInstanceError):
        prediction.mfu = 0.9  # the sweep's prediction is made once, before the trial


def test_an_old_prediction_without_the_allocator_figures_is_written_back_as_read():
    old = {k: v for k, v in NEW.items() if k not in ("reserved_gb", "allocated_gb")}
    prediction = Prediction.from_dict(old)
    assert prediction.reserved_gb is None and prediction.to_dict() == old
    assert "reserved_gb" not in json.dumps(prediction.to_dict())  # no null keys an old reader lacked


@pytest.mark.parametrize("bad, message", [
    ({**NEW, "fits": "yes"}, "prediction.fits must be true or false, got 'yes'"),
    ({**NEW, "mfu": float("inf")}, "prediction.mfu must be a finite number, got inf"),
    ({**NEW, "memory_terms_gb": {"weights": "big"}}, "prediction.memory_terms_gb.weights must be a number"),
    ({**NEW, "memory_terms_gb": [1.0]}, "prediction.memory_terms_gb must be an object of names"),
    ({**NEW, "peak_gb": 1.0}, "unknown field prediction.peak_gb"),
    ({k: v for k, v in NEW.items() if k != "step_time_s"}, "prediction.step_time_s is missing"),
    ([0.42], "prediction must be an object"),
])
def test_a_bad_prediction_is_one_line_naming_the_field(bad, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace(".", r"\.")):
        Prediction.from_dict(bad)


def test_a_spec_saves_and_loads_its_prediction_typed(tmp_path):
    spec = TrialSpec(model=ModelConfig(), cluster=ClusterConfig(), layout=Layout(), trial=TrialConfig(),
                     trial_dir=str(tmp_path), prediction=Prediction.from_dict(NEW))
    path = spec.save()
    assert json.loads(path.read_text())["prediction"] == NEW
    assert TrialSpec.load(path) == spec and isinstance(TrialSpec.load(path).prediction, Prediction)
    data = json.loads(path.read_text())
    data["prediction"]["mfu"] = "high"
    with pytest.raises(ConfigError, match="prediction.mfu must be a number"):
        TrialSpec.from_dict(data)
    unpredicted = dataclasses.replace(spec, prediction=None)
    assert TrialSpec.load(unpredicted.save()).prediction is None


def test_real_old_records_load_and_write_back_their_prediction_unchanged():
    # 2026-11-23 (H100): before reserved_gb/allocated_gb were predicted; result.json only.
    old = _first("gpu_sweep_2026-11-23_trials.tgz", "result.json")
    assert "reserved_gb" not in old["prediction"] and record_problem(old) is None
    assert Prediction.from_dict(old["prediction"]).to_dict() == old["prediction"]
    # 2026-12-01 (H200): a spec.json of the current shape, loaded whole.
    data = _first("embgrad_mbs1_h200_2026-12-01_trials.tgz", "spec.json")
    spec = TrialSpec.from_dict(data)
    assert spec.prediction.reserved_gb == data["prediction"]["reserved_gb"]
    assert spec.to_dict()["prediction"] == data["prediction"]


def test_a_record_with_a_bad_prediction_is_damaged():
    old = _first("gpu_sweep_2026-11-23_trials.tgz", "result.json")
    assert record_problem({**old, "prediction": None}) is None  # not predicted (invalid) is fine
    assert record_problem({**old, "prediction": {**old["prediction"], "fits": "maybe"}}) == \
        "prediction.fits must be true or false, got 'maybe'"
