"""launch.step_graph: one micro-batch captured and replayed must train like the schedule.

On the CPU the eager steps (step 0 of every CUDA-graph trial) are checked against
plain autograd; on a GPU a whole CUDA-graph trial is checked against the same trial
run through megatron's own schedule.
"""

from __future__ import annotations

import math

import pytest
import torch

from launch.step_graph import MicrobatchGraph
from tests.launch.test_gpu_trial import _gpu_trial


class _Config:
    def __init__(self):
        self.finalized = []
        self.finalize_model_grads_func = lambda model, num_tokens: self.finalized.append(list(model))


class _Chunk(torch.nn.Module):
    """Per-token loss of a linear model, called like megatron's GPTModel with labels."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
        self.config = _Config()

    def forward(self, tokens, position_ids, attention_mask, labels):
        return ((tokens @ self.weight).sum(-1) - labels) ** 2


def _loss_func(output):
    loss = output.float().mean()
    return loss, {"loss": loss.detach().clone()}


def _batches(n):
    gen = torch.Generator().manual_seed(0)
    return [{"tokens": torch.randn(2, 5, 4, generator=gen, dtype=torch.float64),
             "labels": torch.randn(2, 5, generator=gen, dtype=torch.float64),
             "position_ids": torch.arange(5).expand(2, 5)} for _ in range(n)]


def test_eager_steps_accumulate_the_mean_gradient_and_report_unscaled_losses():
    chunk, batches = _Chunk(), _batches(3)
    step = MicrobatchGraph(loss_func=_loss_func, eager_steps=1)
    out = step(data_iterator=[iter(batches)], model=[chunk], num_microbatches=3)

    reference = _Chunk()
    reference.weight.data.copy_(chunk.weight.data)
    losses = torch.stack([reference(b["tokens"], b["position_ids"], None, b["labels"]).float().mean()
                          for b in batches])
    losses.mean().backward()

    assert [o["loss"].item() for o in out] == pytest.approx(losses.tolist())
    assert torch.allclose(chunk.weight.grad, reference.weight.grad.to(chunk.weight.grad.dtype))
    assert chunk.config.finalized == [[chunk]]  # megatron's DP/SP reduction, once per step


def test_refuses_pipelined_or_forward_only_use():
    step = MicrobatchGraph(loss_func=_loss_func)
    with pytest.raises(ValueError, match="pp == vpp == 1"):
        step(data_iterator=[iter([])], model=[_Chunk(), _Chunk()], num_microbatches=1)
    with pytest.raises(ValueError, match="pp == vpp == 1"):
        step(data_iterator=[iter([])], model=[_Chunk()], num_microbatches=1, forward_only=True)


@pytest.mark.cuda
def test_cuda_graph_trial_trains_like_the_schedule(tmp_path):
    """Same seed and tokens: replayed micro-batches give the schedule's losses, step after step."""
    eager = _gpu_trial(tmp_path, steps=8, mbs=2)
    graphed = _gpu_trial(tmp_path, steps=8, mbs=2, cuda_graph=True)
    assert eager["status"] == "ok" and graphed["status"] == "ok", (eager.get("reason"), graphed.get("reason"))
    assert len(graphed["losses"]) == 8 and all(math.isfinite(x) for x in graphed["losses"])
    # bf16 model: rounding differs between eager and captured kernels at most.
    for step, (a, b) in enumerate(zip(eager["losses"], graphed["losses"])):
        assert abs(a - b) <= 2.0**-7 * abs(a), (step, eager["losses"], graphed["losses"])


@pytest.mark.cuda
def test_deferred_wgrad_trial_with_per_slot_graphs_trains_like_the_accumulating_one(tmp_path):
    """layout.wgrad_defer=step (4 micro-batches, one graph per slot, the flush overwriting the
    buffers) against the same graphed trial accumulating per micro-batch, with the producers
    that write into the arenas (Triton norms, SwiGLU, fused add+norm and QKV gradient)."""
    axes = dict(mbs=2, cuda_graph=True, attention="sdpa_cudnn", norm="triton", swiglu="triton",
                add_norm="fused", qkv_grad="fused")
    base = _gpu_trial(tmp_path / "base", steps=6, **axes)
    deferred = _gpu_trial(tmp_path / "defer", steps=6, wgrad_defer="step", grad_buffer="overwrite", **axes)
    assert base["status"] == "ok" and deferred["status"] == "ok", (base.get("reason"), deferred.get("reason"))
    assert deferred["layout"]["wgrad_defer"] == "step"
    # bf16 model, fp32 gradients summed in another order: the losses within bf16 rounding.
    for step, (a, b) in enumerate(zip(base["losses"], deferred["losses"])):
        assert abs(a - b) <= 2.0**-7 * abs(a), (step, base["losses"], deferred["losses"])
    assert base["losses"][-1] < base["losses"][0]  # it trains: the comparison is not of constants
