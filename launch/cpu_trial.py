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
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from core.config import Layout, ModelConfig
from core.records import rss_peak_fields
from core.spec import TrialSpec
from launch import loop, steps
from launch.cpu_shims import device_redirect, install_rng_tracker
from launch.divergence import StepGuard
from launch.loop import StepParts, Timeline, inject_failure
from launch.model import build_model, transformer_config

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


def build(model_cfg: ModelConfig, layout: Layout, *, seed: int, lr: float,
          wgrad_fusion: bool = False) -> Trainer:
    """Model chunks, DDP and optimizer for this rank; megatron's parallel state must be set.
    wgrad_fusion: kernels.wgrad's linears, as on GPU (off in CPU trials; tests turn it on).
    layout.wgrad_defer=step turns it on: the deferred GEMMs are kernels.wgrad's fp32 addmm."""
    wgrad_fusion = wgrad_fusion or layout.wgrad_defer == "step"
    install_rng_tracker()  # before seeding: megatron's seeding then fills the CPU tracker
    model_parallel_cuda_manual_seed(seed)
    config = transformer_config(model_cfg, layout, device="cpu")
    # CPU layouts use our attention (megatron's is CUDA-only: sweeper.validity), which
    # applies RoPE itself; megatron's RotaryEmbedding, which moves to CUDA, is not built.
    chunks = [build_model(model_cfg, layout, config, vp_stage=vp_stage, pre_process=pre,
                          post_process=post, wgrad_fusion=wgrad_fusion)
              for vp_stage, pre, post in steps.chunk_stages(layout)]
    with device_redirect():  # DDP places its grad buffers on torch.cuda.current_device()
        model = steps.wrap_ddp(chunks, config, distributed_optimizer=False, overlap=False)
    steps.sync_config(config, model, overlap=False)
    num_micro = layout.num_microbatches(dist.get_world_size())
    steps.defer_wgrad(model, config, layout, seq_length=model_cfg.seq_length, num_micro=num_micro)
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


def _memory() -> dict:
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return rss_peak_fields(peak_gb)


def parts(spec: TrialSpec, world: int, setup: Timeline) -> StepParts:
    """This rank's trainer as `launch.loop` drives it."""
    model_cfg, layout, trial = spec.model, spec.layout, spec.trial
    trainer = build(model_cfg, layout, seed=trial.seed, lr=trial.lr)
    setup.mark("build_model")
    inject_failure(spec)

    def step(batches: list[dict]) -> list:
        return forward_backward(trainer, batches, seq_length=model_cfg.seq_length, mbs=layout.mbs)

    def adamw() -> None:
        optimizer_step(trainer)  # torch's AdamW computes no global gradient norm

    # The step ends at a barrier: no device work runs behind the host here, and a rank's
    # step time then includes its wait for the slowest rank, as on the GPU.
    return StepParts(model=trainer.model, guard=StepGuard(spec, trainer.model), device="cpu",
                     barrier=dist.barrier, synchronize=dist.barrier, forward_backward=step,
                     optimizer_step=adamw, memory=_memory, local_grads=True,
                     fields={"trial_path": PATH})


def run_steps(spec: TrialSpec, *, rank: int, world: int) -> dict:
    # One rank per core share: oversubscribed threads make CPU step times noise.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.cluster.gpus_per_node))
    return loop.run(spec, rank=rank, world=world, build=parts)
