"""Weight-gradient GEMMs that accumulate straight into megatron DDP's fp32 gradient buffers.

Without this, each micro-batch's backward writes every weight gradient in bf16 and
megatron DDP's hook then adds it into the fp32 buffer: one more pass over 10 bytes per
parameter per micro-batch. On an H100 (llama_1b3, gbs 16, 2026-11-23) those adds took
94 ms of a 0.665 s step at mbs 1 (16 micro-batches) against 12 ms at mbs 8: most of
the gap between small and large micro-batches once the step runs as a CUDA graph.

megatron-core fuses the accumulation into the GEMM (`gradient_accumulation_fusion`) only
through Apex's `fused_weight_gradient_mlp_cuda` extension, which is not installed here:
with the flag on and no extension, its ColumnParallelLinear refuses to build. The same
operation is one cuBLAS call through torch: `addmm` with bf16 inputs, an fp32 output
dtype and beta = 1, written in place (`accumulate`). It enters through our own linear
modules, never by replacing megatron's module attributes:

- `ColumnParallelLinear` / `RowParallelLinear` here are megatron's with one change: the
  autograd function of their matmul is `_LinearIntoMainGrad`, megatron's
  LinearWithGradAccumulationAndAsyncCommunication (0.16.1) whose weight gradient goes into
  `weight.main_grad` through `accumulate`. The forward, the input gradient and the tensor-
  and sequence-parallel communication are megatron's, step for step. `kernels.layer_spec`
  puts them in the layer spec (the QKV, attention output and both MLP linears) when a
  trial asks for the fusion (`block_spec(wgrad_fusion=True)`).
- GPTModel builds its output layer from megatron's class itself, not from the spec:
  `fuse_output_layer` gives that one instance our subclass (same weights, same state).
- megatron's own `config.gradient_accumulation_fusion` stays off (it means Apex's
  extension); our fused norm and loss modules take the same `wgrad_fusion` switch.

As megatron's fused path does, a weight whose gradient went into `main_grad` is marked
`grad_added_to_main_grad`, so DDP's hook does not add it again, and autograd gets a dummy
gradient, so that hook still runs on the backward's thread. A weight without `main_grad`
(no DDP around the model) gets its gradient as usual.

`layout.wgrad_defer=step` (kernels/wgrad_defer.py): a weight with an arena and a current
micro-batch slot keeps no input for autograd; its forward puts the (gathered) input in the
slot and its backward the output gradient, both without a copy when a producer already
wrote them there, computes only the input gradient and hands autograd the placeholder; the
weight gradient is one GEMM per step in `Deferral.flush`.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.parallel_state import get_global_memory_buffer
from megatron.core.tensor_parallel import layers as megatron_layers
from megatron.core.utils import get_tensor_model_parallel_group_if_none
from megatron.core.utils import prepare_input_tensors_for_wgrad_compute

from kernels import main_grad as main_grad_rule


# Set on a weight by zero_grad_buffer_except_overwritten; read (and cleared) by its backward.
OVERWRITE_FLAG = "main_grad_overwrite"
# Set on a weight by kernels.wgrad_defer.attach: its Arena (layout.wgrad_defer=step).
ARENA_ATTR = "wgrad_arena"


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor,
                          main_grad: torch.Tensor, beta: float = 1.0) -> None:
    """main_grad (fp32, [out, in]) = beta * main_grad + grad_output[tokens, out]^T @ total_input[tokens, in].
    beta = 0: cuBLAS does not read main_grad (layout.grad_buffer=overwrite)."""
    torch.addmm(main_grad, grad_output.t(), total_input, beta=beta, out_dtype=torch.float32, out=main_grad)


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor,
                          main_grad: torch.Tensor, beta: float = 1.0) -> None:
    """The same for a 16-bit gradient buffer (grad_reduce_in_fp32 off)."""
    main_grad.addmm_(grad_output.t(), total_input, beta=beta)


def accumulate(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor,
               *, overwrite: bool = False) -> None:
    """main_grad += grad_output^T @ total_input, in main_grad's dtype, in place; with
    `overwrite`, main_grad = grad_output^T @ total_input (its old contents never read).

    16-bit inputs into an fp32 buffer: one GEMM with an fp32 output (CUDA only in torch
    2.13: addmm's out_dtype has no CPU kernel). Inputs of the buffer's own dtype (the fp32
    CPU path, or a 16-bit buffer): a plain in-place addmm."""
    beta = 0.0 if overwrite else 1.0
    if main_grad.dtype == torch.float32 and total_input.dtype in (torch.bfloat16, torch.float16):
        wgrad_gemm_accum_fp32(total_input, grad_output, main_grad, beta)
    elif main_grad.dtype == total_input.dtype:
        wgrad_gemm_accum_fp16(total_input, grad_output, main_grad, beta)
    else:
        raise RuntimeError(f"no weight-gradient accumulation of {total_input.dtype} into {main_grad.dtype}")


def check(device: str = "cuda") -> bool:
    """Does the in-place fp32 accumulation give the reference result on this device?"""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(256, 96, device=device, generator=gen).to(torch.bfloat16)
    dy = torch.randn(256, 64, device=device, generator=gen).to(torch.bfloat16)
    main = torch.randn(64, 96, device=device, generator=gen)
    expected = main + dy.float().t() @ x.float()
    try:
        wgrad_gemm_accum_fp32(x, dy, main)
    except (RuntimeError, TypeError, NotImplementedError):  # no fp32-output addmm here
        return False
    return torch.allclose(main, expected, rtol=1e-3, atol=1e-2)


def available(device: str) -> bool:
    """Whether a trial on `device` fuses its weight-gradient accumulation: on CUDA when the
    fp32-output GEMM checks out there. The CPU path keeps megatron's unfused path."""
    return device == "cuda" and torch.cuda.is_available() and check("cuda")


class _LinearIntoMainGrad(torch.autograd.Function):
    """megatron-core 0.16.1's LinearWithGradAccumulationAndAsyncCommunication with
    gradient_accumulation_fusion on, its GEMM accumulating through `accumulate`.
    Not supported (megatron's options our trials never set): deferred embedding wgrad
    (grad_output_buffer) and Megatron-FSDP parameters."""

    @staticmethod
    @megatron_layers.custom_fwd
    def forward(ctx, input, weight, bias, allreduce_dgrad, sequence_parallel, tp_group):
        # Kept here as megatron keeps it: a module used twice must add into the same buffer.
        ctx.main_grad = getattr(weight, "main_grad", None)
        ctx.use_bias = bias is not None
        ctx.allreduce_dgrad = allreduce_dgrad
        ctx.sequence_parallel = sequence_parallel
        ctx.tp_group = tp_group
        ctx.input_shape = input.shape
        arena = _active_arena(weight) if ctx.main_grad is not None else None
        ctx.arena = arena
        if arena is not None:  # layout.wgrad_defer=step: X kept in the arena, not by autograd
            ctx.save_for_backward(weight)
            if sequence_parallel:  # gathered straight into the slot
                total_input = arena.x_slot()
                megatron_layers.dist_all_gather_func(total_input, input.contiguous(), group=tp_group)
                ctx.slot = arena.deferral.current()
            else:
                total_input = input
                ctx.slot = arena.store_input(input)
        else:
            ctx.save_for_backward(input, weight)
            total_input = _gather(input, tp_group) if sequence_parallel else input
        output = torch.matmul(total_input, weight.t())
        return output + bias if bias is not None else output

    @staticmethod
    @megatron_layers.custom_bwd
    def backward(ctx, grad_output):
        if ctx.arena is not None:
            return _deferred_backward(ctx, grad_output)
        input, weight = ctx.saved_tensors
        tp_group, main_grad = ctx.tp_group, ctx.main_grad
        handle = None
        if ctx.sequence_parallel:
            # Gathered again rather than kept from the forward: megatron's memory choice.
            total_input, handle = _gather(input, tp_group, async_op=True)
        else:
            total_input = input
        grad_input = grad_output.matmul(weight)
        if handle is not None:
            handle.wait()
        grad_output, total_input = prepare_input_tensors_for_wgrad_compute(grad_output, total_input)
        grad_input, handle = _start_dgrad_reduction(ctx, grad_input)  # overlaps the GEMM below
        if main_grad is None:  # no DDP buffer: the usual gradient
            grad_weight = grad_output.t().matmul(total_input)
        else:
            weight.main_grad = main_grad
            # layout.grad_buffer=overwrite: the first gradient of this weight in the step
            # writes its buffer, which zero_grad_buffer_except_overwritten left unzeroed.
            overwrite = getattr(weight, OVERWRITE_FLAG, False)
            accumulate(total_input, grad_output, main_grad, overwrite=overwrite)
            if overwrite:
                setattr(weight, OVERWRITE_FLAG, False)  # a second use in the step adds
            grad_weight = None
            if hasattr(weight, "grad_added_to_main_grad"):  # set by megatron's DDP
                grad_weight = main_grad_rule.handed_over(weight)
        grad_bias = grad_output.sum(dim=0) if ctx.use_bias else None
        if handle is not None:
            handle.wait()
        return grad_input, grad_weight, grad_bias, None, None, None


def _start_dgrad_reduction(ctx, grad_input: torch.Tensor):
    """The input gradient's TP reduction, started asynchronously as megatron does: an
    all-reduce, or with sequence parallelism a reduce-scatter into this rank's shard.
    Returns (the tensor that will hold the result, the handle or None)."""
    if ctx.sequence_parallel:
        assert not ctx.allreduce_dgrad
        shard = torch.empty(ctx.input_shape, dtype=grad_input.dtype, device=grad_input.device)
        handle = megatron_layers.dist_reduce_scatter_func(shard, grad_input, group=ctx.tp_group,
                                                          async_op=True)
        return shard, handle
    if ctx.allreduce_dgrad:
        return grad_input, torch.distributed.all_reduce(grad_input, group=ctx.tp_group, async_op=True)
    return grad_input, None


def _active_arena(weight):
    """The weight's Arena when a micro-batch slot is current (kernels/wgrad_defer.py), else
    None: a forward outside a training step (no slot) takes the accumulating path."""
    arena = getattr(weight, ARENA_ATTR, None)
    return arena if arena is not None and arena.deferral.in_step() else None


def _deferred_backward(ctx, grad_output):
    """The input gradient as `_LinearIntoMainGrad.backward`; dY goes to the arena slot of the
    forward and the weight gradient waits for Deferral.flush (autograd gets the placeholder)."""
    (weight,) = ctx.saved_tensors
    grad_input, handle = _start_dgrad_reduction(ctx, grad_output.matmul(weight))  # overlaps the copy
    ctx.arena.store_grad(grad_output, ctx.slot)
    weight.main_grad = ctx.main_grad
    grad_weight = None
    if hasattr(weight, "grad_added_to_main_grad"):  # set by megatron's DDP
        grad_weight = main_grad_rule.handed_over(weight)
    grad_bias = grad_output.sum(dim=tuple(range(grad_output.dim() - 1))) if ctx.use_bias else None
    if handle is not None:
        handle.wait()
    return grad_input, grad_weight, grad_bias, None, None, None


def _gather(input: torch.Tensor, tp_group, *, async_op: bool = False):
    """The sequence-parallel input gathered over TP into megatron's shared buffer."""
    size = list(input.size())
    size[0] *= tp_group.size()
    gathered = get_global_memory_buffer().get_tensor(size, input.dtype, "mpu")
    handle = megatron_layers.dist_all_gather_func(gathered, input, group=tp_group, async_op=async_op)
    return (gathered, handle) if async_op else gathered


def _linear_into_main_grad(input, weight, bias=None, gradient_accumulation_fusion=None,
                           allreduce_dgrad=False, sequence_parallel=False, grad_output_buffer=None,
                           wgrad_deferral_limit=None, async_grad_allreduce=None, tp_group=None):
    """megatron's linear_with_grad_accumulation_and_async_allreduce arguments, into
    `_LinearIntoMainGrad`; megatron's own flag is ignored (it means Apex's extension)."""
    if grad_output_buffer is not None:
        raise ValueError("kernels.wgrad: deferred embedding wgrad (defer_embedding_wgrad_compute) "
                         "is not supported")
    tp_group = get_tensor_model_parallel_group_if_none(tp_group)
    return _LinearIntoMainGrad.apply(input, weight, bias, allreduce_dgrad, sequence_parallel, tp_group)


class ColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """megatron's ColumnParallelLinear; its weight gradient accumulates into `main_grad`."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if not weight.requires_grad:  # a frozen weight: megatron's own path
            return super()._forward_impl(input, weight, *args, **kwargs)
        return _linear_into_main_grad(input, weight, *args, **kwargs)


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    """megatron's RowParallelLinear; its weight gradient accumulates into `main_grad`."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if not weight.requires_grad:  # a frozen weight: megatron's own path
            return super()._forward_impl(input, weight, *args, **kwargs)
        return _linear_into_main_grad(input, weight, *args, **kwargs)


def fuse_output_layer(layer: tensor_parallel.ColumnParallelLinear) -> None:
    """GPTModel's output layer with our backward: GPTModel builds it from megatron's class
    (not from the layer spec), so this one instance takes our subclass, which adds no state
    and changes only `_forward_impl`. Call after the model is built, before DDP wraps it."""
    if type(layer) is not tensor_parallel.ColumnParallelLinear:
        raise TypeError(f"fuse_output_layer expects megatron's ColumnParallelLinear, got {type(layer).__name__}")
    layer.__class__ = ColumnParallelLinear


def overwritten_weights(ddp_chunk) -> list[torch.Tensor]:
    """The weights whose every gradient goes through `_LinearIntoMainGrad`: our linears'
    (not an output layer whose gradient the fused loss adds itself, kernels/fused_ce.py)."""
    cached = getattr(ddp_chunk, "_overwritten_weights", None)
    if cached is None:
        cached = [m.weight for m in ddp_chunk.modules()
                  if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
                  and m.weight is not None and m.weight.requires_grad
                  and hasattr(m.weight, "main_grad")
                  and not getattr(m.weight, "fused_ce_main_grad", False)]
        ddp_chunk._overwritten_weights = cached
    return cached


def zero_grad_buffer_except_overwritten(ddp_chunk) -> None:
    """megatron DDP's zero_grad_buffer (0.16.1), except the fp32 gradients of our linears,
    whose first weight-gradient GEMM of the step overwrites them (`layout.grad_buffer=overwrite`).

    Only for one micro-batch per step (sweeper.validity checks it): a CUDA graph captured
    with overwrite on replays it for every micro-batch. It saves writing zeros over those
    gradients (4 bytes per parameter; the whole buffer's zeroing measured 1.25 ms of a
    llama_1b3 step on an H200, benchmarks/diag_step_phases.py) and the GEMMs' read of them
    (4 more, ~1.3 ms by bandwidth); on vs off in the 2026-12-01 sweep it was inside noise. The other
    gradients (embedding, norms, a fused loss's output layer) are zeroed as megatron does;
    the buckets' padding stays as zeroed at construction (nothing writes it)."""
    weights = overwritten_weights(ddp_chunk)
    others = getattr(ddp_chunk, "_zeroed_grads", None)
    if others is None:  # DDP's buffers never move: the views are found once, not every step
        skip = {id(w) for w in weights}
        others = [p.main_grad for p in ddp_chunk.params_with_grad if id(p) not in skip]
        ddp_chunk._zeroed_grads = others
    if getattr(ddp_chunk.config, "cuda_graph_impl", "none") != "transformer_engine":
        for param in ddp_chunk.params_with_grad:
            param.grad_added_to_main_grad = False
    if others:
        torch._foreach_zero_(others)
    for weight in weights:
        setattr(weight, OVERWRITE_FLAG, True)
    for group in ddp_chunk.bucket_groups + ddp_chunk.expert_parallel_bucket_groups:
        group.reset()
