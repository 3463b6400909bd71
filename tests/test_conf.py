"""Every preset composes into the typed schema and converts to the project's dataclasses."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sweeper.config import (
    ConfigError,
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


@pytest.mark.parametrize("name", presets("sweep"))
def test_every_sweep_preset(name):
    cfg = _compose([f"sweep={name}"])
    sweep_from_dict(cfg["sweep"])
    trial_from_dict(cfg["trial"])
    layout_from_dict(cfg["layout"])


def test_known_sizes():
    assert model_from_dict(_compose(["model=llama2_70b"])["model"]).num_query_groups == 8
    m = model_from_dict(_compose(["model=llama_1b3"])["model"])
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.seq_length) == (24, 2048, 5632, 2048)
    assert 1.3e9 < m.num_params() < 1.4e9


def test_schema_rejects_a_wrong_type():
    with pytest.raises(Exception):
        _compose(["layout.tp=two"])


def test_dataclass_conversion_rejects_bad_values():
    with pytest.raises(ConfigError, match="model.hidden_size must be positive"):
        model_from_dict({"hidden_size": 0})
    with pytest.raises(ConfigError, match="unknown field layout.foo"):
        layout_from_dict({"foo": 1})
    with pytest.raises(ConfigError, match="not divisible by num_query_groups"):
        model_from_dict({"num_attention_heads": 4, "num_query_groups": 3})
