"""What the CPU and GPU trial paths share: pipeline settings, model chunks, megatron's DDP and
the forward-backward call of one training step.

Both paths train through the same megatron-core calls: `get_forward_backward_func()` (no
pipelining, 1F1B, interleaved 1F1B when vpp > 1) with `P2PCommunicator`, recompute and
sequence parallelism from the TransformerConfig, megatron's DistributedDataParallel and
`finalize_model_grads`. What differs (the optimizer, bf16, CUDA graphs, the CPU shims of
`launch.cpu_shims`) stays in `launch.cpu_trial` and `launch.gpu_trial`; the step loop itself
is `launch.loop`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads

from core.config import Layout
from kernels import defer_wiring, wgrad_defer
from launch.data import first_sequence, microbatch


def p2p_settings(layout: Layout, *, device: str) -> dict:
    """Pipeline p2p fields of the TransformerConfig, chosen here for both paths.

    - megatron's default `batch_p2p_comm=True` is wrong for the interleaved schedule at pp = 2:
      the batched sends and receives between the same two ranks get matched out of order, and
      stage outputs and gradients swap in transit once there are more micro-batches than stages
      (measured over gloo: gradients 3.7e2x off, loss NaN by step 2; upstream Megatron-LM
      issues #750 and #1450 report it on NCCL; Megatron-LM's arguments.py asserts pp > 2 for
      interleaving without overlap for the same reason). So vpp > 1 never batches.
    - on GPU with vpp > 1 we take Megatron-LM's own setting for the interleaved schedule:
      overlapped, unbatched p2p (`batch_p2p_comm = not overlap_p2p_comm`), with pipeline
      outputs deallocated after their send.
    - over gloo, overlapped p2p together with `deallocate_pipeline_outputs=True` gave wrong
      results (the output is freed while the asynchronous send still reads it), and the batched
      form calls `torch.cuda.synchronize()`: the CPU path runs plain blocking sends, nothing
      deallocated.
    """
    if device != "cuda":
        return dict(batch_p2p_comm=False, overlap_p2p_comm=False, deallocate_pipeline_outputs=False)
    interleaved = layout.pp > 1 and layout.vpp > 1
    return dict(batch_p2p_comm=not interleaved, overlap_p2p_comm=interleaved,
                deallocate_pipeline_outputs=True)


def chunk_stages(layout: Layout) -> list[tuple]:
    """(vp_stage, pre_process, post_process) of each model chunk on this rank: one per virtual
    pipeline stage, the first holding the embedding and the last the output layer."""
    vpp = layout.vpp if layout.vpp > 1 else None
    stages = []
    for index in range(vpp or 1):
        vp_stage = index if vpp else None
        stages.append((
            vp_stage,
            parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        ))
    return stages


def wrap_ddp(chunks, config, *, distributed_optimizer: bool, overlap: bool) -> list:
    """Each chunk in megatron's DDP: contiguous fp32 grad buffers, reduced in finalize_model_grads."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap,
        use_distributed_optimizer=distributed_optimizer,
    )
    # Chunks after the first get one bucket each: their reduction overlaps the later
    # chunks' backward anyway (megatron's own choice for vpp > 1).
    return [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=index > 0)
            for index, chunk in enumerate(chunks)]


def sync_config(config, model: list, *, overlap: bool) -> None:
    """The hooks megatron's training loop installs (megatron/training/training.py)."""
    if overlap:
        no_sync = [chunk.no_sync for chunk in model]
        grad_sync = [chunk.start_grad_sync for chunk in model]
        config.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
        config.grad_sync_func = grad_sync[0] if len(model) == 1 else grad_sync
    config.finalize_model_grads_func = finalize_model_grads


def overlap_grad_reduce(layout: Layout, dp: int, *, device: str) -> bool:
    """Whether DDP reduces gradient buckets during the backward: on GPU when there is a DP
    reduction to hide, never inside a CUDA graph (no asynchronous collectives there) and
    never with wgrad_defer=step (the decoder's gradients exist only after the flush)."""
    return (device == "cuda" and dp > 1 and not layout.cuda_graph
            and layout.wgrad_defer == "off")


def defer_wgrad(model: list, config, layout: Layout, *, seq_length: int, num_micro: int) -> None:
    """layout.wgrad_defer=step: arenas of `num_micro` slots on every chunk (after the DDP wrap:
    they need main_grad), the producers linked to them (kernels/defer_wiring.py) and the flush in front of finalize_model_grads (after sync_config set it)."""
    if layout.wgrad_defer != "step":
        return
    for chunk in model:
        wgrad_defer.attach(chunk, slots=num_micro, tokens_shape=(seq_length // layout.cp, layout.mbs))
        defer_wiring.wire(chunk)
    wgrad_defer.flush_before_finalize(config)


def loss_func(output: torch.Tensor):
    """Mean per-token loss of one micro-batch; megatron divides by the micro-batch count."""
    loss = output.float().mean()
    # A copy: megatron scales the returned loss in place (/= num_microbatches) for the backward.
    return loss, {"loss": loss.detach().clone()}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, loss_func


def step_batches(spec, step: int, num_micro: int, dp_rank: int, *, device: str) -> list[dict]:
    """This DP rank's micro-batches of one step, already on the device (a prefetching loader's view)."""
    model_cfg, layout = spec.model, spec.layout
    return [microbatch(seed=spec.trial.seed, step=step, mbs=layout.mbs, seq_length=model_cfg.seq_length,
                       vocab_size=model_cfg.vocab_size, device=device,
                       first=first_sequence(dp_rank=dp_rank, num_microbatches=num_micro,
                                            mbs=layout.mbs, index=index))
            for index in range(num_micro)]


def forward_backward(schedule, model: list, batches: list[dict], *, num_micro: int, seq_length: int,
                     mbs: int, zero_grad=None, zero_buffer=None) -> list[dict]:
    """One step's forward and backward through megatron's schedule; the grads end reduced in
    each chunk's buffer (`finalize_model_grads`). Each chunk reads the same batches: the first
    stage uses the tokens, the last the labels. `zero_grad()`, if given, runs after the
    buffers are zeroed (the GPU path's optimizer.zero_grad, as megatron's training loop).
    `zero_buffer(chunk)` replaces megatron's `chunk.zero_grad_buffer()` (layout.grad_buffer)."""
    for chunk in model:
        if zero_buffer is None:
            chunk.zero_grad_buffer()
        else:
            zero_buffer(chunk)
    if zero_grad is not None:
        zero_grad()
    return schedule(
        forward_step_func=forward_step,
        data_iterator=[iter(batches) for _ in model],
        model=model,
        num_microbatches=num_micro,
        seq_length=seq_length,
        micro_batch_size=mbs,
        forward_only=False,
    )


def step_loss(step_losses: list[dict], num_micro: int) -> float | None:
    """The step's mean per-token loss, averaged over the DP group, on the last pipeline stage;
    None on the other stages, which compute no loss."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = torch.stack([d["loss"] for d in step_losses]).sum() / num_micro
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return float(total) / parallel_state.get_data_parallel_world_size()
