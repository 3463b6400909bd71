"""The CPU trial path: megatron-core's GPTModel trained over gloo, honestly scoped.

What runs here is real megatron-core: its GPTModel, its tensor-parallel
linears and embeddings (TP over gloo), with the project's norm and attention.
Megatron's DDP buffers, optimizer and pipeline schedules need CUDA, so data
parallelism is an all-reduce of gradients done here and the optimizer is
torch's AdamW in fp32. Layouts that need more are reported as skipped by the
sweeper (`sweeper.validity.unsupported_reason`), never faked.

Peak memory on CPU is the rank's peak resident set size.
"""

from __future__ import annotations

import os
import resource
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from launch.data import first_sequence, microbatch
from launch.model import build_model, transformer_config
from launch.profile import StepProfiler, scope
from launch.spec import TrialSpec

PATH = "cpu-gloo: megatron-core GPTModel, TP over gloo, DP by gradient all-reduce, torch AdamW fp32"


def _all_reduce_grads(params: list[torch.nn.Parameter], group, size: int) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if size == 1 or not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    flat /= size
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def run_steps(spec: TrialSpec, *, rank: int, world: int) -> dict:
    model_cfg, layout, trial = spec.model, spec.layout, spec.trial
    # One rank per core share: oversubscribed threads make CPU step times noise.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.cluster.gpus_per_node))
    torch.manual_seed(trial.seed)
    config = transformer_config(model_cfg, layout, device="cpu")
    # CPU layouts use our attention (megatron's is CUDA-only: sweeper.validity), which
    # applies RoPE itself; megatron's RotaryEmbedding, which moves to CUDA, is not built.
    model = build_model(model_cfg, layout, config)
    if trial.fail_if_name_contains and trial.fail_if_name_contains in spec.name:
        raise RuntimeError(f"injected failure: trial name contains {trial.fail_if_name_contains!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=trial.lr)
    dp_group = parallel_state.get_data_parallel_group()
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    num_micro = layout.num_microbatches(world)
    profiler = StepProfiler(spec, [model], rank=rank)
    measured = trial.warmup_steps + trial.measure_steps

    step_times, losses = [], []
    for step in range(measured + profiler.extra_steps):
        # The step's batches are made before the clock starts, as a prefetching loader would.
        batches = [
            microbatch(seed=trial.seed, step=step, mbs=layout.mbs, seq_length=model_cfg.seq_length,
                       vocab_size=model_cfg.vocab_size, device="cpu",
                       first=first_sequence(dp_rank=dp_rank, num_microbatches=num_micro,
                                            mbs=layout.mbs, index=index))
            for index in range(num_micro)
        ]
        dist.barrier()
        profiler.begin(step)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for batch in batches:
            per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            loss = per_token.float().mean() / num_micro
            loss.backward()
            total += loss.detach()
        with scope("dp_comm"):
            _all_reduce_grads(params, dp_group, dp)
        with scope("optimizer"):
            optimizer.step()
        dist.all_reduce(total, group=dp_group)
        dist.barrier()
        elapsed = time.perf_counter() - start
        profiler.end(step)
        if step < measured:  # a profiled step is an extra one, never timed
            step_times.append(elapsed)
            losses.append(float(total) / dp)
    return {
        "step_times_s": step_times,
        "losses": losses,
        "peak_memory_gb": _peak_rss_gb(),
        "peak_memory_source": "peak RSS (getrusage)",
        "trial_path": PATH,
        **profiler.record(),
    }
