"""analysis.rerun: a leaderboard row's command composes back, through conf/, to the trial it names."""

from dataclasses import replace

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from analysis.leaderboard import markdown
from analysis.rerun import COMMAND, _composed, rerun_command, rerun_overrides, value_text
from core.config import cluster_from_dict, layout_from_dict, model_from_dict, register_configs, trial_from_dict
from core.paths import CONF_DIR
from core.spec import TrialSpec
from launch.record import base_record

register_configs()


def _compose(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return OmegaConf.to_container(compose(config_name="config", overrides=overrides), resolve=True)


def _record(**sections) -> dict:
    """A record as the sweeper writes it, from the presets' composition with some fields changed."""
    base = _compose(["model=llama_1b3", "cluster=local_h200"])
    spec = TrialSpec(model=model_from_dict(base["model"]), cluster=cluster_from_dict(base["cluster"]),
                     layout=layout_from_dict(base["layout"]), trial=trial_from_dict(base["trial"]),
                     trial_dir="/tmp/unused", git_commit="0123456789abcdef-dirty")
    for name, changes in sections.items():
        spec = replace(spec, **{name: replace(getattr(spec, name), **changes)})
    return base_record(spec, "ok"), spec


CHANGED = dict(
    model={"seq_length": 4096},
    cluster={"gpu_memory_gb": 80.0, "partition": "gpu"},
    layout={"tp": 2, "pp": 2, "vpp": 2, "mbs": 4, "gbs": 64, "recompute": "full", "recompute_method": "block",
            "sequence_parallel": True, "attention": "triton", "norm": "triton", "swiglu": "triton",
            "add_norm": "fused"},
    trial={"profile": True, "lr": 3e-4, "fail_if_name_contains": "tp2 pp2"},
)


def test_the_command_composes_back_to_the_same_trial():
    record, spec = _record(**CHANGED)
    overrides = rerun_overrides(record)
    assert rerun_command(record) == " ".join([COMMAND, *overrides])
    cfg = _compose(overrides)
    assert layout_from_dict(cfg["layout"]) == spec.layout
    assert model_from_dict(cfg["model"]) == spec.model
    assert cluster_from_dict(cfg["cluster"]) == spec.cluster
    assert trial_from_dict(cfg["trial"]) == spec.trial
    assert cfg["sweep"]["name"] == "rerun"  # not the original sweep directory, where it is done

    # Negative control: without one of its overrides the composition is another trial.
    for dropped in ("layout.tp=2", "model.seq_length=4096", "trial.profile=true"):
        assert dropped in overrides
        cfg = _compose([o for o in overrides if o != dropped])
        assert (layout_from_dict(cfg["layout"]), model_from_dict(cfg["model"]),
                trial_from_dict(cfg["trial"])) != (spec.layout, spec.model, spec.trial)


def test_only_fields_that_differ_are_named_but_the_default_presets_axes_are_pinned():
    record, _ = _record(layout={"tp": 2})
    overrides = rerun_overrides(record)
    assert overrides[:2] == ["model=llama_1b3", "cluster=local_h200"]
    _, swept = _composed(("model=llama_1b3", "cluster=local_h200"))
    assert swept and {o.split("=")[0] for o in overrides if o.startswith("layout.")} == {"layout.tp", *swept}
    assert not [o for o in overrides if o.startswith(("model.", "cluster.", "trial."))]


def test_the_command_is_one_trial_of_the_sweeper_even_with_the_default_presets_axes():
    """The sweeper adds the default sweep preset's axes to the command line: the command pins them all."""
    from tests.sweeper.test_hydra_sweeper import _combos

    record, spec = _record(**CHANGED)
    overrides = rerun_overrides(record)
    params = _compose_hydra_params()
    assert params, "the default sweep preset sweeps no axis: this test shows nothing"
    assert len(_combos(params)) > 1
    (combo,) = _combos(params, arguments=overrides)
    layout = [f"{k}={v}" for k, v in combo.items() if k.startswith("layout.")]
    assert layout_from_dict(_compose(["model=llama_1b3", "cluster=local_h200", *layout])["layout"]) == spec.layout


def _compose_hydra_params() -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", return_hydra_config=True)
    return dict(cfg.hydra.sweeper.params or {})


def test_a_model_that_is_no_preset_is_named_field_by_field():
    record, spec = _record(model={"name": "my_model", "num_layers": 3})
    overrides = rerun_overrides(record)
    assert "model.name=my_model" in overrides and not any(o.startswith("model=") for o in overrides)
    assert model_from_dict(_compose(overrides)["model"]) == spec.model


@pytest.mark.parametrize("value", ["sdpa", "a b", "true", "null", "1e-05", "it's", "x,y", True, None, 0.0003, 7])
def test_values_read_back_as_themselves(value):
    (override,) = OverridesParser.create().parse_overrides([f"k={value_text(value)}"])
    assert override.value() == value and type(override.value()) is type(value)


def test_the_leaderboard_file_lists_each_ranked_rows_commit_and_overrides():
    rows = [{"trial": t, "status": "ok", "mfu_palm": mfu, "mfu_megatron": mfu, "tp": 1, "pp": 1, "vpp": 1,
             "dp": 2, "mbs": 1, "recompute": "none", "sequence_parallel": False, "distributed_optimizer": False,
             "attention": "sdpa", "norm": "torch", "step_time_s": 1.0, "tokens_per_s": 1.0, "tflops_per_gpu": 1.0,
             "peak_memory_gb": 1.0, "predicted_memory_gb": 1.0, "reason": None,
             "command": f"{COMMAND} layout.mbs={t}", "commit": "abcdef0123-dirty"}
            for t, mfu in (("slow", 0.1), ("fast", 0.3))]
    board = markdown(rows, rerun=True)
    assert "1. `abcdef0-dirty` `layout.mbs=fast`" in board and "2. `abcdef0-dirty` `layout.mbs=slow`" in board
    assert "layout.mbs=" not in markdown(rows)  # the console's table stays as it was


def test_the_trace_command_reruns_the_same_trial_with_its_trace_into_its_own_directory(tmp_path):
    from analysis.report import trace_command

    record, spec = _record(layout=CHANGED["layout"])
    words = trace_command(tmp_path, [record], record["trial"]).split()
    assert words[0] == COMMAND and words[-1] == f"hydra.sweep.dir={tmp_path / 'trace-best'}"
    cfg = _compose(words[1:-1])
    assert layout_from_dict(cfg["layout"]) == spec.layout and model_from_dict(cfg["model"]) == spec.model
    assert cfg["trial"]["trace"] is True and cfg["trial"]["profile"] is True
