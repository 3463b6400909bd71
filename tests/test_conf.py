"""Every preset composes and converts to the project's dataclasses, which check its types."""

import dataclasses
import itertools
import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from core.config import (
    ClusterConfig,
    ConfigError,
    Layout,
    ModelConfig,
    SweepConfig,
    TrialConfig,
    check_value,
    cluster_from_dict,
    layout_from_dict,
    model_from_dict,
    register_configs,
    sweep_from_dict,
    trial_from_dict,
)

CONF = Path(__file__).resolve().parent.parent / "conf"
register_configs()


def presets(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("name", presets("model"))
def test_every_model_preset(name):
    cfg = _compose([f"model={name}"])
    model = model_from_dict(cfg["model"])
    assert model.name == name
    assert model.num_params() > 0


@pytest.mark.parametrize("name", presets("cluster"))
def test_every_cluster_preset_sets_an_explicit_peak(name):
    raw = (CONF / "cluster" / f"{name}.yaml").read_text()
    assert "peak_tflops:" in raw and "gpu_memory_gb:" in raw and "gpus_per_node:" in raw
    cluster = cluster_from_dict(_compose([f"cluster={name}"])["cluster"])
    assert cluster.name == name and cluster.peak_tflops > 0


def _values(key: str, value) -> list:
    """The values of one sweep axis as Hydra parses them ("1,2" -> [1, 2])."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (override,) = OverridesParser.create().parse_overrides([f"{key}={value}"])
    return list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]


def grid_problems(base_layout: dict, params: dict, grids: list) -> list[str]:
    """Every layout of the main grid and each extra grid (as sweeper.hydra_sweeper expands
    them), with what is wrong with it: an unknown axis, a wrong type or a value outside
    the axis's allowed values (sweeper.validity's axis check)."""
    from sweeper.validity import _check_axes

    problems = []
    for grid in [{}, *grids]:
        axes = {**params, **grid}
        unknown = [k for k in axes if not k.startswith("layout.")]
        problems += [f"{k}: only layout axes are swept" for k in unknown]
        names = [k for k in axes if k.startswith("layout.")]
        for combo in itertools.product(*(_values(k, axes[k]) for k in names)):
            values = {k[len("layout."):]: v for k, v in zip(names, combo)}
            try:
                layout = layout_from_dict({**base_layout, **values})
            except ConfigError as exc:
                problems.append(str(exc))
                continue
            problem = _check_axes(layout)
            if problem:
                problems.append(f"{layout.name}: {problem}")
    return problems


def _preset(name: str) -> tuple[dict, dict, list]:
    raw = yaml.safe_load((CONF / "sweep" / f"{name}.yaml").read_text())
    sweeper = (raw.get("hydra") or {}).get("sweeper") or {}
    return _compose([f"sweep={name}"]), sweeper.get("params") or {}, sweeper.get("grids") or []


@pytest.mark.parametrize("name", presets("sweep"))
def test_every_sweep_preset_expands_to_allowed_values(name):
    cfg, params, grids = _preset(name)
    sweep_from_dict(cfg["sweep"])
    trial_from_dict(cfg["trial"])
    layout_from_dict(cfg["layout"])
    assert params, f"{name} sweeps no axis"
    assert grid_problems(cfg["layout"], params, grids) == []


def test_a_typo_in_a_preset_axis_is_caught():
    cfg, params, grids = _preset("h100_single")
    typo = grid_problems(cfg["layout"], {**params, "layout.attention": "sdpa_cudnn,tritonn"}, grids)
    assert typo and all(p.endswith("got 'tritonn'") and "attention must be one of" in p for p in typo)
    typo_in_grid = [*grids, {"layout.norm": "trition"}]
    assert any("norm must be one of" in p for p in grid_problems(cfg["layout"], params, typo_in_grid))
    assert grid_problems(cfg["layout"], {"layout.mbs": "1,two"}, []) == [
        "layout.mbs must be an integer, got 'two'"]
    assert grid_problems(cfg["layout"], {"layout.mbz": "1"}, []) == [
        "unknown field layout.mbz (known: " + ", ".join(f.name for f in dataclasses.fields(Layout)) + ")"]


def test_known_sizes():
    assert model_from_dict(_compose(["model=llama2_70b"])["model"]).num_query_groups == 8
    m = model_from_dict(_compose(["model=llama_1b3"])["model"])
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.seq_length) == (24, 2048, 5632, 2048)
    assert 1.3e9 < m.num_params() < 1.4e9


def test_a_wrong_type_is_caught_by_the_dataclasses_own_check():
    # One check: Hydra composes the defaults untyped, the dataclass's annotations decide.
    cfg = _compose(["layout.tp=two", "layout.attention=tritonn", "cluster.gpu_memory_gb=80"])
    assert cfg["layout"]["tp"] == "two"  # Hydra let it through
    with pytest.raises(ConfigError, match=r"^layout.tp must be an integer, got 'two'$"):
        layout_from_dict(cfg["layout"])
    with pytest.raises(ConfigError, match=r"^layout.attention must be one of triton, flash_attn, .*, got 'tritonn'$"):
        layout_from_dict({**cfg["layout"], "tp": 2})
    assert cluster_from_dict(cfg["cluster"]).gpu_memory_gb == 80.0  # an int taken as a float
    # the command-line check runs the same one, before Hydra composes anything
    from launch.cli_checks import check_arguments

    assert check_arguments(["layout.tp=two"]) == "layout.tp must be an integer, got 'two'"
    assert check_arguments(["layout.norm=rms"]) == "layout.norm must be one of triton, torch, megatron, got 'rms'"
    assert check_arguments(["layout.norm=triton", "trial.plant=non_causal"]) is None


@pytest.mark.parametrize("cls,name,value,message", [
    (Layout, "tp", True, "must be an integer, got True"),  # a bool is no size
    (Layout, "tp", 2.0, "must be an integer, got 2.0"),
    (Layout, "sequence_parallel", 2, "must be true or false, got 2"),
    (Layout, "attention", True, "must be one of"),
    (ClusterConfig, "peak_tflops", "fast", "must be a number, got 'fast'"),
    (ClusterConfig, "peak_tflops", float("nan"), "must be a finite number, got nan"),
    (ClusterConfig, "device", "tpu", "must be one of cpu, cuda, got 'tpu'"),
    (ModelConfig, "name", ["a"], "must be a string, got ['a']"),
])
def test_check_value_rejects(cls, name, value, message):
    with pytest.raises(ConfigError, match=re.escape(f"x.{name} {message}")):
        check_value(cls, name, value, f"x.{name}")


def test_check_value_takes_what_yaml_and_hydra_write():
    assert check_value(Layout, "sequence_parallel", 1, "k") is True
    assert check_value(ClusterConfig, "gpu_memory_gb", 80, "k") == 80.0
    assert check_value(SweepConfig, "name", 2024, "k") == "2024"  # sweep.name=2024
    assert check_value(SweepConfig, "max_trials", None, "k") is None  # Optional
    assert check_value(TrialConfig, "plant", "nan_weights", "k") == "nan_weights"
    assert check_value(Layout, "wgrad_defer", False, "k") == "off"  # layout.wgrad_defer=off
    with pytest.raises(ConfigError, match="must be one of off, step, got True"):
        check_value(Layout, "wgrad_defer", True, "k")
    with pytest.raises(ConfigError, match="got False"):  # only where "off" is a choice
        check_value(Layout, "attention", False, "k")


def test_dataclass_conversion_rejects_bad_values():
    with pytest.raises(ConfigError, match="model.hidden_size must be positive"):
        model_from_dict({"hidden_size": 0})
    with pytest.raises(ConfigError, match="unknown field layout.foo"):
        layout_from_dict({"foo": 1})
    with pytest.raises(ConfigError, match="not divisible by num_query_groups"):
        model_from_dict({"num_attention_heads": 4, "num_query_groups": 3})
    with pytest.raises(ConfigError, match="trial.plant must be one of nan_weights, non_causal, perturb_weight, got 'nan'"):
        trial_from_dict({"plant": "nan"})
    assert trial_from_dict({"plant": "non_causal"}).plant == "non_causal"


def _preset_layouts(name: str) -> list[Layout]:
    """The layouts of a preset's main grid and extra grids, once each (as the sweeper expands
    them, before validity)."""
    cfg, params, grids = _preset(name)
    layouts = {}
    for grid in [{}, *grids]:
        axes = {**params, **grid}
        names = list(axes)
        for combo in itertools.product(*(_values(k, axes[k]) for k in names)):
            values = {k[len("layout."):]: v for k, v in zip(names, combo)}
            layout = layout_from_dict({**cfg["layout"], **values})
            layouts.setdefault(layout.name, layout)
    return list(layouts.values())


def test_h200_presets_run_the_fused_embedding_with_its_off_runs_at_mbs_1_and_16():
    layouts = _preset_layouts("h200_single")
    assert len(layouts) <= 29  # one 10-minute device call (README: the H200 sweep)
    on = [lay for lay in layouts if lay.embedding_grad == "fused"]
    assert {lay.mbs for lay in on} >= {1, 2, 4, 8, 16}  # the main grid
    # Off, with every other fusion on: exactly the main grid's layout at mbs 1 and 16.
    off = [lay for lay in layouts if lay.embedding_grad == "megatron" and lay.qkv_grad == "fused"]
    assert sorted(lay.mbs for lay in off) == [1, 16]
    assert all(dataclasses.replace(lay, embedding_grad="fused") in on for lay in off)
    parity = [lay for lay in _preset_layouts("h200_parity") if lay.qkv_grad == "fused"]
    assert [lay.embedding_grad for lay in parity] == ["fused", "fused"]
    # 20 steps of every fusion, and of every fusion with the weight-gradient deferral (mbs 1:
    # 4 micro-batches of gbs 4), against the stock spec.
    assert sorted((lay.wgrad_defer, lay.mbs) for lay in parity) == [("off", 2), ("step", 1)]


def test_h200_preset_defers_the_wgrad_at_mbs_1_beside_the_same_layouts_without():
    layouts = _preset_layouts("h200_single")
    deferred = [lay for lay in layouts if lay.wgrad_defer == "step"]
    assert sorted(lay.attention for lay in deferred) == ["flash_attn", "sdpa_cudnn"]
    assert all(lay.mbs == 1 and lay.grad_buffer == "overwrite" for lay in deferred)
    for lay in deferred:  # its control: the same layout, accumulating per micro-batch
        assert dataclasses.replace(lay, wgrad_defer="off", grad_buffer="megatron") in layouts
