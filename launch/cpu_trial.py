"""The CPU trial path: megatron-core's own training machinery over gloo, fp32.

The same megatron-core calls as `launch.gpu_trial` (shared in `launch.steps`):
- the model: `launch.model.build_model`, one chunk per virtual pipeline stage;
- the schedule: `get_forward_backward_func()` (no pipelining, 1F1B, interleaved 1F1B when
  vpp > 1) with megatron's P2PCommunicator; sequence parallelism and selective/full recompute
  (`tensor_parallel.checkpoint`) come from the TransformerConfig;
- data parallelism: megatron's DistributedDataParallel (contiguous fp32 grad buffers),
  reduced by `finalize_model_grads` (which also sums sequence-parallel norm grads over TP).
What differs from the GPU path: fp32 and no fused CUDA kernels, torch's AdamW on the DDP
buffers' gradients (megatron's optimizer allocates on "cuda" in many places), no
overlap of the gradient reduction, and the CPU shims of `launch.cpu_shims` (device
redirect around DDP construction and each step, a CPU RNG tracker, unbatched p2p).

Peak memory on CPU is the rank's peak resident set size (the whole process, not per term).
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from core.config import Layout, ModelConfig
from core.spec import TrialSpec
from launch import steps
from launch.cpu_shims import device_redirect, install_rng_tracker
from launch.divergence import StepGuard
from launch.model import build_model, transformer_config
from launch.profile import StepProfiler, scope

PATH = ("cpu-gloo: megatron-core GPTModel fp32, get_forward_backward_func schedules, "
        "megatron DDP + finalize_model_grads, torch AdamW")


@dataclass
class Trainer:
    """One rank's model chunks (in megatron's DDP), its optimizer and its schedule."""

    config: object
    model: list
    params: list
    optimizer: torch.optim.Optimizer
    schedule: object


def build(model_cfg: ModelConfig, layout: Layout, *, seed: int, lr: float) -> Trainer:
    """Model chunks, DDP and optimizer for this rank; megatron's parallel state must be set."""
    install_rng_tracker()  # before seeding: megatron's seeding then fills the CPU tracker
    model_parallel_cuda_manual_seed(seed)
    config = transformer_config(model_cfg, layout, device="cpu")
    # CPU layouts use our attention (megatron's is CUDA-only: sweeper.validity), which
    # applies RoPE itself; megatron's RotaryEmbedding, which moves to CUDA, is not built.
    chunks = [build_model(model_cfg, layout, config, vp_stage=vp_stage, pre_process=pre,
                          post_process=post)
              for vp_stage, pre, post in steps.chunk_stages(layout)]
    with device_redirect():  # DDP places its grad buffers on torch.cuda.current_device()
        model = steps.wrap_ddp(chunks, config, distributed_optimizer=False, overlap=False)
    steps.sync_config(config, model, overlap=False)
    params = [p for chunk in model for p in chunk.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    return Trainer(config, model, params, optimizer, get_forward_backward_func())


def forward_backward(trainer: Trainer, batches: list[dict], *, seq_length: int, mbs: int) -> list:
    """One step's forward and backward; the reduced grads end in the DDP buffers (`main_grad`)."""
    with device_redirect():
        return steps.forward_backward(trainer.schedule, trainer.model, batches,
                                      num_micro=len(batches), seq_length=seq_length, mbs=mbs)


def optimizer_step(trainer: Trainer) -> None:
    """AdamW on the DDP buffers' gradients. `grad` is released afterwards: the next backward
    must accumulate into a fresh `grad`, which megatron's hook then adds to `main_grad`."""
    for p in trainer.params:
        p.grad = p.main_grad
    trainer.optimizer.step()
    for p in trainer.params:
        p.grad = None


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def run_steps(spec: TrialSpec, *, rank: int, world: int) -> dict:
    model_cfg, layout, trial = spec.model, spec.layout, spec.trial
    # One rank per core share: oversubscribed threads make CPU step times noise.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.cluster.gpus_per_node))
    torch.manual_seed(trial.seed)
    trainer = build(model_cfg, layout, seed=trial.seed, lr=trial.lr)
    if trial.fail_if_name_contains and trial.fail_if_name_contains in spec.name:
        raise RuntimeError(f"injected failure: trial name contains {trial.fail_if_name_contains!r}")
    guard = StepGuard(spec, trainer.model)  # a non-finite loss ends the trial `diverged`
    dp_rank = parallel_state.get_data_parallel_rank()
    num_micro = layout.num_microbatches(world)
    profiler = StepProfiler(spec, trainer.model, rank=rank)
    measured = trial.warmup_steps + trial.measure_steps

    step_times, losses = [], []
    for step in range(measured + profiler.extra_steps):
        # The step's batches are made before the clock starts, as a prefetching loader would.
        batches = steps.step_batches(spec, step, num_micro, dp_rank, device="cpu")
        dist.barrier()
        profiler.begin(step)
        start = time.perf_counter()
        step_losses = forward_backward(trainer, batches, seq_length=model_cfg.seq_length,
                                       mbs=layout.mbs)
        with scope("optimizer"):
            optimizer_step(trainer)
        loss = steps.step_loss(step_losses, num_micro)
        dist.barrier()
        elapsed = time.perf_counter() - start
        profiler.end(step)
        if step < measured:  # a profiled step is an extra one, never timed
            step_times.append(elapsed)
            if loss is not None:
                losses.append(float(loss))
            # No global grad norm here (torch's AdamW): each rank checks its own reduced grads.
            guard.after_step(step, loss=None if loss is None else float(loss), local_grads=True)
    record = {
        "step_times_s": step_times,
        "peak_memory_gb": _peak_rss_gb(),
        "peak_memory_source": "peak RSS (getrusage)",
        "trial_path": PATH,
        **profiler.record(),
        **guard.record(),
    }
    if losses:  # the last pipeline stage's ranks compute the loss
        record["losses"] = losses
    return record
