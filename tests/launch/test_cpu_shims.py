"""Each CPU shim of launch/cpu_shims.py is needed: without it the CPU trial fails, where and
how the shim says. And a megatron-core whose private names moved fails at set-up (ShimError).

One spawned 2-rank gloo group tries the CPU trial with every shim, then with each one removed
in turn (both ranks fail at the same call, so the group stays in step between attempts).
"""

import traceback

import pytest

from launch import cpu_shims
from tests.gloo import run_on_gloo
from tests.launch.parity import MODEL, case

NO_CUDA = "Torch not compiled with CUDA enabled"


def _attempt(layout, *, batched_p2p=False) -> str:
    """'ok', or the failure and the megatron file it was raised in."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from launch import cpu_trial
    from launch.data import microbatch

    try:
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(pipeline_model_parallel_size=layout.pp)
        trainer = cpu_trial.build(MODEL, layout, seed=1, lr=1e-4)
        trainer.config.batch_p2p_comm = batched_p2p
        batches = [microbatch(seed=1, step=0, first=i, mbs=1, seq_length=MODEL.seq_length,
                              vocab_size=MODEL.vocab_size, device="cpu") for i in range(2)]
        cpu_trial.forward_backward(trainer, batches, seq_length=MODEL.seq_length, mbs=1)
        return "ok"
    except Exception as exc:  # noqa: BLE001 - the failure is the result
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "megatron" in f.filename]
        where = f"{frames[-1].filename.split('megatron/core/')[-1]}:{frames[-1].name}" if frames else "?"
        return f"{where}: {type(exc).__name__}: {exc}"
    finally:
        dist.barrier()


def _each_shim_removed(rank):
    from unittest import mock

    import torch
    from megatron.core.tensor_parallel import random

    from launch import cpu_trial

    megatron_get_states = random._get_all_rng_states
    out = {}
    # The RNG tracker stays installed once installed: remove it first.
    with mock.patch.object(cpu_trial, "install_rng_tracker", lambda: None):
        out["rng_tracker"] = _attempt(case().layout)
    with mock.patch.object(cpu_shims, "_cpu_get_all_rng_states", megatron_get_states):
        out["checkpoint_rng_states"] = _attempt(case(recompute="full").layout)
    with mock.patch.object(cpu_shims, "_TorchOnCpu", lambda: torch):
        out["schedules_cuda_literals"] = _attempt(case().layout)
    with mock.patch.object(cpu_shims, "_cpu_current_device", torch.cuda.current_device):
        out["current_device"] = _attempt(case().layout)
    out["all_shims_pp2_recompute"] = _attempt(case(pp=2, recompute="full").layout)
    out["batched_p2p"] = _attempt(case(pp=2).layout, batched_p2p=True)
    return out


@pytest.fixture(scope="module")
def attempts():
    return run_on_gloo(_each_shim_removed, world_size=2)[0]


def test_with_every_shim_the_cpu_trial_runs(attempts):
    assert attempts["all_shims_pp2_recompute"] == "ok"


@pytest.mark.parametrize("shim, where", [
    ("rng_tracker", "tensor_parallel/random.py:add"),  # megatron's tracker seeds CUDA generators
    ("checkpoint_rng_states", "tensor_parallel/random.py:_get_cuda_rng_state"),  # recompute saves them
    ("schedules_cuda_literals", "pipeline_parallel/schedules.py:forward_backward_no_pipelining"),
    ("current_device", "distributed/param_and_grad_buffer.py:__init__"),  # DDP's grad buffers
    ("batched_p2p", "pipeline_parallel/p2p_communication.py:_communicate"),  # torch.cuda.synchronize()
])
def test_without_the_shim_it_fails_where_the_shim_says(attempts, shim, where):
    assert attempts[shim] == f"{where}: AssertionError: {NO_CUDA}"


def test_moved_private_names_fail_at_set_up(monkeypatch):
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random

    monkeypatch.delattr(random, "_get_all_rng_states")
    with pytest.raises(cpu_shims.ShimError, match="_get_all_rng_states"):
        cpu_shims.install_rng_tracker()
    monkeypatch.undo()
    monkeypatch.setattr(schedules, "torch", object())
    with pytest.raises(cpu_shims.ShimError, match="schedules.torch"):
        with cpu_shims.device_redirect():
            pass


def test_device_redirect_is_scoped():
    import torch

    original = torch.cuda.current_device
    with cpu_shims.device_redirect():
        from megatron.core.pipeline_parallel import schedules

        assert schedules.torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.cuda.current_device is original and schedules.torch is torch
