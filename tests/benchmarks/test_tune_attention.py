"""benchmarks/tune_attention.py on CPU: its candidate tables and how winners are installed
(the timing itself needs a GPU)."""

import json

import pytest

from benchmarks import tune_attention as tune
from kernels import attention as A

# Each variant flag of a kernel, timed on and off in the same tuner run.
FLAGS = {"fwd": ("PIPELINE", "SUBTILE"), "dkdv": ("DEFER",), "dq": ("DEFER",)}


@pytest.mark.parametrize("kind, d", [(k, d) for k in FLAGS for d in (64, 128)])
def test_each_variant_is_timed_beside_the_plain_kernel(kind, d):
    configs = tune.candidates(kind, d)
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)
    plain = [c for c in configs if not any(c.get(f) for f in FLAGS[kind])]
    assert plain, "no config without the variants: nothing to compare against"
    for flag in FLAGS[kind]:
        assert any(c.get(flag) for c in configs), f"{flag} never timed"
    # the blocks of today's default are among the plain candidates
    default = {"fwd": A.FWD_CONFIGS, "dkdv": A.DKDV_CONFIGS, "dq": A.DQ_CONFIGS}[kind][d]
    keys = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
    assert any(all(c[k] == default[k] for k in keys) for c in configs)


def test_install_puts_winners_into_the_kernel_tables(monkeypatch):
    for name in ("FWD_CONFIGS", "DKDV_CONFIGS", "DQ_CONFIGS", "DKDV_ATOMIC_CONFIGS"):
        monkeypatch.setattr(A, name, dict(getattr(A, name)))
    winner = tune.candidates("fwd", 128)[-1]
    before = dict(A.DQ_CONFIGS)
    tune.install({"128": {"fwd": winner}})
    assert A.FWD_CONFIGS[128] == winner
    assert A.kernel_configs(128, type("D", (), {"type": "cuda"})())[0] == winner
    assert A.DQ_CONFIGS == before  # kinds not tuned keep their configs
