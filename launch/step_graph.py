"""One micro-batch's forward and backward as a CUDA graph, replayed for every micro-batch.

`layout.cuda_graph`. At small micro-batches a step is bound by Python, not the GPU:
thousands of kernel launches per micro-batch. On an H100 (2026-11-23, llama_1b3, gbs 16,
benchmarks/diag_step_overhead.py) the host needed 2.43 s for a step at mbs 1 and the
GPU waited on it; even at mbs 4 the host time (0.65 s) was 97% of the step.

Without pipelining every micro-batch runs the same forward and backward; only the
tokens differ. So the first micro-batch of the second step is captured once, and every
micro-batch after that is a copy of its tokens into the graph's static inputs and one
replay. Megatron DDP's backward hooks add each weight gradient into its fp32 grad
buffer with an `add_` kernel: captured with the rest, so gradients still accumulate
across replays. What megatron's no-pipelining schedule does after the last
micro-batch (`finalize_model_grads`: DP reduction, SP norm grads) and the optimizer
step stay eager (megatron's grad-norm clipping reads the norm on the host).

Memory: the graph's private pool holds one micro-batch's activations and workspaces,
about what an eager step peaks at. megatron-core's FullCudaGraphWrapper captures all
micro-batches of a step as one graph instead: its pool then held every micro-batch's
activations at once (67 GiB at mbs 1 against 28 GiB eager, 2026-11-23).

Step 0 runs eagerly through the same function (cuDNN plans, Triton and torch.compile
kernels, autotuning all happen outside the capture). Gradient reduction is not
overlapped with the backward (a graph holds no asynchronous collectives), and the
trial runs on a side stream (see `launch.gpu_trial.run_steps`).

`layout.wgrad_defer=step` (kernels/wgrad_defer.py): each micro-batch writes its own arena
slot, so one graph cannot serve them all. Then micro-batch i has its own graph, captured in
step 1 with slot i current (the chunk's pre-hook advances it during the capture) and
replayed for micro-batch i after that; a replay runs no Python, so the slot is set here.
The graphs share one memory pool, captured and replayed in the same order: nothing a graph
leaves in that pool is read after another graph runs (the loss is cloned at once; the
arenas and main_grad live outside it), so the pool holds one micro-batch's activations, as
the single graph's does. Flush runs eagerly, in front of finalize_model_grads_func.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.random import get_all_rng_states
from megatron.core.utils import get_model_config


class MicrobatchGraph:
    """A drop-in for megatron's `get_forward_backward_func()` result when pp == 1.

    `model` is the list holding the one DDP-wrapped chunk; `loss_func(output)` returns
    (loss, info) like a megatron forward-step's loss function. Called with the same
    keyword arguments as megatron's schedule; `data_iterator` yields batch dicts
    (tokens, labels, position_ids). Returns one {"loss": tensor} per micro-batch.
    """

    def __init__(self, *, loss_func, eager_steps: int = 1):
        self.loss_func = loss_func
        self.eager_steps = eager_steps
        self.graphs = []  # one, or one per micro-batch slot (wgrad_defer)
        self.static_losses = []
        self.static_batch = None
        self.pool = None
        self._steps = 0

    @property
    def graph(self):
        return self.graphs[0] if self.graphs else None

    def _forward_backward(self, chunk, batch: dict, num_microbatches: int) -> torch.Tensor:
        output = chunk(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        loss, _ = self.loss_func(output)
        # Megatron's schedule scales each micro-batch's loss by 1/num_microbatches
        # before its backward (calculate_per_token_loss off); the reported loss is not.
        (loss / num_microbatches).backward()
        return loss.detach()

    def _capture(self, chunk, batch: dict, num_microbatches: int) -> None:
        if self.static_batch is None:
            self.static_batch = {key: value.clone() for key, value in batch.items()}
        else:
            self._load(batch)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the graph's private pool should not sit beside eager blocks
        graph = torch.cuda.CUDAGraph()
        for state in get_all_rng_states().values():  # graph-safe RNG (dropout, if any)
            graph.register_generator_state(state)
        # Captured on the trial's own (side) stream: megatron DDP's gradient hooks sit on
        # AccumulateGrad nodes made there. "thread_local": NCCL's watchdog thread may
        # query events while this thread captures.
        with torch.cuda.graph(graph, pool=self.pool, stream=torch.cuda.current_stream(),
                              capture_error_mode="thread_local"):
            self.static_losses.append(self._forward_backward(chunk, self.static_batch, num_microbatches))
        self.graphs.append(graph)

    def _load(self, batch: dict) -> None:
        for key, value in batch.items():
            self.static_batch[key].copy_(value, non_blocking=True)

    def __call__(self, *, forward_step_func=None, data_iterator, model, num_microbatches: int,
                 seq_length=None, micro_batch_size=None, forward_only: bool = False):
        if forward_only or len(model) != 1:
            raise ValueError("MicrobatchGraph trains one model chunk (pp == vpp == 1)")
        chunk = model[0]
        batches = data_iterator[0] if isinstance(data_iterator, list) else data_iterator
        deferral = _deferral(chunk)
        losses = []
        for index, batch in enumerate(batches):
            if self._steps < self.eager_steps:
                losses.append(self._forward_backward(chunk, batch, num_microbatches))
                continue
            which = index if deferral is not None else 0
            if which == len(self.graphs):
                self._capture(chunk, batch, num_microbatches)
            else:
                self._load(batch)
            self.graphs[which].replay()
            if deferral is not None:
                deferral.slot = index  # the replay's baked-in slot; flush reads how many ran
            losses.append(self.static_losses[which].clone())
        self._steps += 1
        config = get_model_config(chunk)
        if config.finalize_model_grads_func is not None:
            config.finalize_model_grads_func(model, None)
        return [{"loss": loss} for loss in losses]


def _deferral(chunk):
    """The chunk's kernels.wgrad_defer.Deferral (one graph per slot), or None (one graph)."""
    return getattr(chunk, "wgrad_deferral", None)
