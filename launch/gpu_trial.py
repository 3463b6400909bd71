"""The GPU trial path: megatron-core's own training machinery on CUDA, over NCCL.

One rank of one trial, mirroring `launch.cpu_trial` with all of megatron-core (the step
loop itself is `launch.loop`'s, shared with the CPU path):
- the model: `launch.model.build_model` (the layout's kernels through the layer spec),
  one chunk per virtual pipeline stage, each wrapped in megatron's Float16Module;
- data parallelism: megatron's DistributedDataParallel (contiguous fp32 grad buffers,
  gradient reduction overlapped with the backward when dp > 1);
- the optimizer: megatron's mixed-precision Adam (bf16 params, fp32 main weights and
  grads), distributed (ZeRO-1) when `layout.distributed_optimizer`;
- the schedule: `get_forward_backward_func()` (no pipelining, 1F1B, or interleaved
  1F1B when vpp > 1); recompute and sequence parallelism come from the config;
- `layout.cuda_graph`: one micro-batch's forward and backward is captured once and
  replayed for every micro-batch (`launch.step_graph`), so a launch-bound step at small
  micro-batches costs GPU time, not Python time. The steps run on a side stream: a
  warm-up on the legacy default stream made the backward's capture fail
  (cudaErrorStreamCaptureImplicit, benchmarks/results/gpu_sweep_2026-11-23.md).

Step time: CUDA-synchronised wall clock per step (record.py takes the median of the
measured ones). Peak memory: the allocator's max reserved (`peak_memory_gb`) and max
allocated, and device memory in use per `torch.cuda.mem_get_info` at the end (CUDA
context, NCCL buffers and other processes included).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.module import Float16Module

from core.config import Layout, ModelConfig
from core.records import PeakMemory
from core.spec import TrialSpec
from kernels import wgrad
from launch import flat_step, loop, steps
from launch.divergence import StepGuard
from launch.loop import StepParts, Timeline, inject_failure
from launch.model import build_model, transformer_config
from launch.profile import StepProfiler  # noqa: F401 - benchmarks/diag_step_overhead.py hooks it here
from launch.step_graph import MicrobatchGraph
from launch.steps import loss_func as _loss_func  # shared with the CPU path

PATH = ("cuda-nccl: megatron-core GPTModel, Float16Module, megatron DDP (fp32 grad buffers), "
        "mixed-precision Adam (fused torch kernel), get_forward_backward_func schedules")
GIB = 2**30


def _chunks(spec: TrialSpec, config, *, wgrad_fusion: bool) -> list[torch.nn.Module]:
    """One model chunk per virtual pipeline stage of this rank, each with its own pre/post process."""
    chunks = []
    for vp_stage, pre, post in steps.chunk_stages(spec.layout):
        model = build_model(spec.model, spec.layout, config, vp_stage=vp_stage,
                            pre_process=pre, post_process=post, wgrad_fusion=wgrad_fusion)
        model.cuda(torch.cuda.current_device())
        chunks.append(Float16Module(config, model))
    return chunks


def _use_fused_adam(optimizer) -> None:
    """Switch megatron's torch-Adam fallback (no Apex/TE here) to torch's fused kernel.

    megatron-core builds torch.optim.Adam(W) with its default multi-tensor ("foreach")
    path: about ten passes over the fp32 state. The fused kernel makes one pass, the
    same arithmetic; torch reads these flags at every step.
    """
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    for opt in inner:
        torch_opt = getattr(opt, "optimizer", None)
        if not isinstance(torch_opt, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in torch_opt.param_groups:
            group["foreach"] = False
            group["fused"] = True


def _memory() -> dict:
    free, total = torch.cuda.mem_get_info()
    return PeakMemory(allocated_gb=torch.cuda.max_memory_allocated() / GIB,
                      reserved_gb=torch.cuda.max_memory_reserved() / GIB,
                      device_used_gb=(total - free) / GIB).fields()


def dense_matmul_flops_per_token(model: ModelConfig) -> float:
    """6 FLOPs per dense weight per token (forward + backward); embedding lookup and norms excluded."""
    h, L = model.hidden_size, model.num_layers
    return 6.0 * (model.num_params() - model.vocab_size * h - (2 * L + 1) * h)


def attention_flops_per_token(model: ModelConfig) -> float:
    """Causal scores and values, forward + backward (3x forward), half of the s x s square."""
    return 3.0 * 4.0 * model.num_layers * model.seq_length * model.hidden_size / 2


def achieved_rates(breakdown: dict, model: ModelConfig, layout: Layout, world: int) -> dict:
    """TFLOP/s per GPU inside the matmul and attention kernels of a profiled step.

    Held against the device's measured matmul ceiling, this splits an MFU gap into
    slow kernels (the rate) and time outside them (the other categories, idle).
    Recompute FLOPs are not counted, so with recompute the rates read low.
    """
    seconds = breakdown.get("categories", {})
    tokens = layout.gbs * model.seq_length / world  # per GPU; model-parallel splits share a step
    rates = {}
    for key, flops, category in (("matmul_tflops", dense_matmul_flops_per_token(model), "matmul"),
                                 ("attention_tflops", attention_flops_per_token(model), "attention")):
        if seconds.get(category):
            rates[key] = round(flops * tokens / seconds[category] / 1e12, 1)
    return rates


def parts(spec: TrialSpec, world: int, setup: Timeline) -> StepParts:
    """This rank's trainer as `launch.loop` drives it."""
    model_cfg, layout, trial = spec.model, spec.layout, spec.trial
    # Graph-safe RNG states in every trial: the same weights whether or not a trial
    # captures CUDA graphs, so losses compare across that axis too.
    model_parallel_cuda_manual_seed(trial.seed, use_cudagraphable_rng=True)
    config = transformer_config(model_cfg, layout, device="cuda")
    # Weight gradients straight into DDP's fp32 buffers where the GEMM checks out (kernels/wgrad.py).
    wgrad_fusion = wgrad.available("cuda")
    if layout.wgrad_defer == "step" and not wgrad_fusion:
        raise RuntimeError("wgrad_defer=step needs the weight-gradient fusion: the fp32-output "
                           "GEMM does not check out on this device (kernels.wgrad.check)")
    chunks = _chunks(spec, config, wgrad_fusion=wgrad_fusion)
    guard = StepGuard(spec, chunks)  # a non-finite loss or grad norm ends the trial `diverged`
    setup.mark("build_model")
    inject_failure(spec)

    dp = parallel_state.get_data_parallel_world_size()
    overlap = steps.overlap_grad_reduce(layout, dp, device="cuda")
    model = steps.wrap_ddp(chunks, config, distributed_optimizer=layout.distributed_optimizer,
                           overlap=overlap)
    steps.sync_config(config, model, overlap=overlap)
    num_micro = layout.num_microbatches(world)
    steps.defer_wgrad(model, config, layout, seq_length=model_cfg.seq_length, num_micro=num_micro)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=trial.lr, bf16=True, params_dtype=torch.bfloat16,
                        use_distributed_optimizer=layout.distributed_optimizer),
        model,
    )
    _use_fused_adam(optimizer)
    # optimizer_step=flat: the same update without megatron's per-tensor loops (launch/flat_step.py).
    megatron_step = ((lambda: flat_step.step(optimizer)) if layout.optimizer_step == "flat"
                     else optimizer.step)
    setup.mark("ddp_and_optimizer")

    if layout.cuda_graph:
        # Step 0 runs eagerly; step 1 captures its first micro-batch, then replays.
        schedule = MicrobatchGraph(loss_func=_loss_func, eager_steps=1)
    else:
        schedule = get_forward_backward_func()
    device = torch.cuda.current_device()
    # grad_buffer=overwrite (one micro-batch per step, or wgrad_defer=step: sweeper.validity):
    # our linears' GEMMs write their fp32 gradients, so only the others are zeroed (kernels/wgrad.py).
    zero_buffer = wgrad.zero_grad_buffer_except_overwritten if layout.grad_buffer == "overwrite" else None

    def barrier() -> None:
        dist.barrier(device_ids=[device])
        torch.cuda.synchronize()

    def forward_backward(batches: list[dict]) -> list:
        return steps.forward_backward(schedule, model, batches, num_micro=num_micro,
                                      seq_length=model_cfg.seq_length, mbs=layout.mbs,
                                      zero_grad=optimizer.zero_grad, zero_buffer=zero_buffer)

    def optimizer_step():
        _, grad_norm, _ = megatron_step()  # the norm is reduced over every rank of the model
        return grad_norm

    def memory() -> dict:  # read after the last step, when the deferral's copy counts are final
        deferral = getattr(model[0], "wgrad_deferral", None)
        return {**_memory(), **({"wgrad_defer": deferral.report()} if deferral is not None else {})}

    return StepParts(model=model, guard=guard, device="cuda", barrier=barrier,
                     synchronize=torch.cuda.synchronize, forward_backward=forward_backward,
                     optimizer_step=optimizer_step, memory=memory,
                     fields={"trial_path": PATH, "wgrad_fusion": wgrad_fusion})


def run_steps(spec: TrialSpec, *, rank: int, world: int) -> dict:
    """PyTorch captures a backward only off the legacy default stream, and megatron's DDP
    keeps the AccumulateGrad nodes it hooks at construction: a CUDA-graph trial builds and
    trains entirely on a side stream (on the default stream the capture failed with
    cudaErrorStreamCaptureImplicit, 2026-11-23)."""
    layout = spec.layout
    if layout.cuda_graph and spec.trial.warmup_steps < 2:
        raise ValueError("cuda_graph needs warmup_steps >= 2: step 0 runs eagerly, step 1 is captured")
    stream = torch.cuda.stream(torch.cuda.Stream()) if layout.cuda_graph else contextlib.nullcontext()
    with stream:
        record = loop.run(spec, rank=rank, world=world, build=parts)
    if "breakdown" in record:
        record["breakdown"]["rates"] = achieved_rates(record["breakdown"], spec.model, layout, world)
    return record
