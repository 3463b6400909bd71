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


def test_the_stash_pair_is_kept_only_where_it_beats_the_pair(monkeypatch):
    # resolve() keeps the DQ_STASH pair where its tuned total is lower; where it was tuned and
    # lost, install() takes the head dim out of the stash tables, so the old pair runs again;
    # where it was not tuned, the tables keep what they have.
    for name in ("DKDV_CONFIGS", "DQ_CONFIGS", "DKDV_STASH_CONFIGS", "DQ_DS_CONFIGS"):
        monkeypatch.setattr(A, name, dict(getattr(A, name)))
    stash, dq_ds = dict(tune.candidates("dkdv_stash", 128)[0]), tune.candidates("dq_ds", 128)[0]
    plain = {"dkdv": tune.candidates("dkdv", 128)[0], "dq": tune.candidates("dq", 128)[0]}

    def tuned(stash_ms):
        kinds = dict(plain, dkdv_stash=stash, dq_ds=dq_ds)
        tune.resolve(kinds, {"dkdv": 2.0, "dq": 1.0, "dkdv_stash": stash_ms, "dq_ds": 0.5})
        return kinds

    won = tuned(2.0)  # 2.5 ms against 3.0
    assert won["dkdv_stash"] is stash and won["dq_ds"] is dq_ds
    lost = tuned(2.6)  # 3.1 ms against 3.0
    assert lost["dkdv_stash"] is None and lost["dq_ds"] is None
    tune.install({"128": lost})
    assert 128 not in A.DKDV_STASH_CONFIGS and 128 not in A.DQ_DS_CONFIGS
    gpu = type("D", (), {"type": "cuda"})()
    assert A.kernel_configs(128, gpu)[1:] == (plain["dkdv"], plain["dq"])
    untuned = dict(plain)
    tune.resolve(untuned, {"dkdv": 2.0, "dq": 1.0})
    assert untuned == plain
