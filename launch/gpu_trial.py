"""The GPU trial path: megatron-core's own training machinery on CUDA, over NCCL.

One rank of one trial, mirroring `launch.cpu_trial` with all of megatron-core:
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

import os
import time

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
from launch import flat_step
from launch.data import first_sequence, microbatch
from launch.divergence import StepGuard
from launch.model import build_model, transformer_config
from launch.profile import StepProfiler, scope
from launch.step_graph import MicrobatchGraph
from launch.steps import forward_step as _forward_step  # shared with the CPU path
from launch.steps import loss_func as _loss_func, sync_config as _sync_config, wrap_ddp as _wrap_ddp

PATH = ("cuda-nccl: megatron-core GPTModel, Float16Module, megatron DDP (fp32 grad buffers), "
        "mixed-precision Adam (fused torch kernel), get_forward_backward_func schedules")
GIB = 2**30


def _chunks(spec: TrialSpec, config) -> list[torch.nn.Module]:
    """One model chunk per virtual pipeline stage of this rank, each with its own pre/post process."""
    vpp = spec.layout.vpp if spec.layout.vpp > 1 else None
    chunks = []
    for index in range(vpp or 1):
        vp_stage = index if vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        model = build_model(spec.model, spec.layout, config, vp_stage=vp_stage,
                            pre_process=pre, post_process=post)
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


def _step_batches(spec: TrialSpec, step: int, num_micro: int, dp_rank: int) -> list[dict]:
    """This DP rank's micro-batches of one step, already on the GPU (a prefetching loader's view)."""
    model_cfg, layout = spec.model, spec.layout
    return [microbatch(seed=spec.trial.seed, step=step, mbs=layout.mbs, seq_length=model_cfg.seq_length,
                       vocab_size=model_cfg.vocab_size, device="cuda",
                       first=first_sequence(dp_rank=dp_rank, num_microbatches=num_micro,
                                            mbs=layout.mbs, index=index))
            for index in range(num_micro)]


def _memory() -> dict:
    free, total = torch.cuda.mem_get_info()
    return PeakMemory(allocated_gb=torch.cuda.max_memory_allocated() / GIB,
                      reserved_gb=torch.cuda.max_memory_reserved() / GIB,
                      device_used_gb=(total - free) / GIB).fields()


class Timeline:
    """Seconds between named points of a rank's start-up: where a trial's wall time goes."""

    def __init__(self):
        self.marks: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.marks[name] = round(now - self._last, 3)
        self._last = now


def _process_age_s():
    """Seconds since this rank's process started, or since a spare got this rank (launch.spare)."""
    assigned = os.environ.get("LAYOUT_SWEEP_ASSIGNED_AT")
    if assigned:
        return round(time.time() - float(assigned), 3)
    try:
        import psutil

        return round(time.time() - psutil.Process().create_time(), 3)
    except Exception:  # noqa: BLE001 - a missing figure, not a failed trial
        return None


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


def run_steps(spec: TrialSpec, *, rank: int, world: int) -> dict:
    """PyTorch captures a backward only off the legacy default stream, and megatron's DDP
    keeps the AccumulateGrad nodes it hooks at construction: a CUDA-graph trial builds and
    trains entirely on a side stream (on the default stream the capture failed with
    cudaErrorStreamCaptureImplicit, 2026-11-23)."""
    if spec.layout.cuda_graph:
        with torch.cuda.stream(torch.cuda.Stream()):
            return _run_steps(spec, rank=rank, world=world)
    return _run_steps(spec, rank=rank, world=world)


def _run_steps(spec: TrialSpec, *, rank: int, world: int) -> dict:
    model_cfg, layout, trial = spec.model, spec.layout, spec.trial
    if layout.cuda_graph and trial.warmup_steps < 2:
        raise ValueError("cuda_graph needs warmup_steps >= 2: step 0 runs eagerly, step 1 is captured")
    setup = Timeline()
    setup.marks["process_start_to_trial"] = _process_age_s()  # interpreter, imports, NCCL init
    torch.manual_seed(trial.seed)
    # Graph-safe RNG states in every trial: the same weights whether or not a trial
    # captures CUDA graphs, so losses compare across that axis too.
    model_parallel_cuda_manual_seed(trial.seed, use_cudagraphable_rng=True)
    config = transformer_config(model_cfg, layout, device="cuda")
    chunks = _chunks(spec, config)
    guard = StepGuard(spec, chunks)  # a non-finite loss or grad norm ends the trial `diverged`
    setup.mark("build_model")
    if trial.fail_if_name_contains and trial.fail_if_name_contains in spec.name:
        raise RuntimeError(f"injected failure: trial name contains {trial.fail_if_name_contains!r}")

    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    # Overlap needs a reduction to hide; a captured graph holds no asynchronous collectives.
    overlap = dp > 1 and not layout.cuda_graph
    model = _wrap_ddp(chunks, config, distributed_optimizer=layout.distributed_optimizer, overlap=overlap)
    _sync_config(config, model, overlap=overlap)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=trial.lr, bf16=True, params_dtype=torch.bfloat16,
                        use_distributed_optimizer=layout.distributed_optimizer),
        model,
    )
    _use_fused_adam(optimizer)
    # optimizer_step=flat: the same update without megatron's per-tensor loops (launch/flat_step.py).
    optimizer_step = ((lambda: flat_step.step(optimizer)) if layout.optimizer_step == "flat"
                      else optimizer.step)
    setup.mark("ddp_and_optimizer")

    if layout.cuda_graph:
        # Step 0 runs eagerly; step 1 captures its first micro-batch, then replays.
        forward_backward = MicrobatchGraph(loss_func=_loss_func, eager_steps=1)
    else:
        forward_backward = get_forward_backward_func()
    num_micro = layout.num_microbatches(world)
    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    dp_group = parallel_state.get_data_parallel_group()
    device = torch.cuda.current_device()
    profiler = StepProfiler(spec, model, rank=rank)
    measured = trial.warmup_steps + trial.measure_steps

    step_times, losses, profiler_error = [], [], None
    for step in range(measured + profiler.extra_steps):
        batches = _step_batches(spec, step, num_micro, dp_rank)
        dist.barrier(device_ids=[device])
        torch.cuda.synchronize()
        profiler.begin(step)
        start = time.perf_counter()
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        step_losses = forward_backward(
            forward_step_func=_forward_step,
            data_iterator=[iter(batches) for _ in model],
            model=model,
            num_microbatches=num_micro,
            seq_length=model_cfg.seq_length,
            micro_batch_size=layout.mbs,
            forward_only=False,
        )
        with scope("optimizer"):
            _, grad_norm, _ = optimizer_step()  # the norm is reduced over every rank of the model
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        try:
            profiler.end(step)
        except Exception as exc:  # noqa: BLE001 - a failed breakdown must not fail a measured trial
            profiler_error = f"{type(exc).__name__}: {exc}"[:500]
        if step == 0:
            setup.mark("first_step")
        if step >= measured:  # the profiled step is an extra one, never timed
            continue
        step_times.append(elapsed)
        if last_stage:
            total = torch.stack([d["loss"] for d in step_losses]).sum() / num_micro
            dist.all_reduce(total, group=dp_group)
            losses.append(float(total) / dp)
        guard.after_step(step, loss=losses[-1] if last_stage else None, grad_norm=grad_norm)
    record = {"step_times_s": step_times, **_memory(), "trial_path": PATH, "setup_s": setup.marks,
              "wgrad_fusion": config.gradient_accumulation_fusion}
    if profiler_error:
        record["breakdown_error"] = profiler_error
    if losses:
        record["losses"] = losses
    record.update(profiler.record())
    record.update(guard.record())
    if "breakdown" in record:
        record["breakdown"]["rates"] = achieved_rates(record["breakdown"], model_cfg, layout, world)
    return record
