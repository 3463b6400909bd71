"""Train a layout for a few steps on gloo ranks and return its losses and full gradients.

Every layout starts from the same weights, loaded by GLOBAL parameter name (megatron's CPU
init differs per pp, since each stage seeds its own layers), trains on the same tokens, and
returns per step the loss and every gradient gathered over its TP shards, keyed by global
name: a tp=pp=dp=1 run and a 3D run are then compared name by name.

    results = run_on_gloo(train_layouts, world_size=4, args=([case, ...],))

Runs inside a `tests.gloo` rank: megatron's parallel state is re-initialised per case, so
several layouts share one spawned group.
"""

from __future__ import annotations

import dataclasses
import zlib

import torch

from core.config import Layout, ModelConfig

# 4 layers so pp=4 and pp=2*vpp=2 each hold one layer per chunk; 4 heads / 2 KV groups so
# tp=2 splits both; hidden 64 keeps a 3-step run of 8 ranks within seconds on 2 cores.
MODEL = ModelConfig(name="parity", num_layers=4, hidden_size=64, ffn_hidden_size=128,
                    num_attention_heads=4, num_query_groups=2, vocab_size=128, seq_length=32)
GBS = 8
STEPS = 3
SEED = 7
# The sweep's default lr. Adam's first steps move each weight by about lr * sign(grad), so a
# roundoff-sized change of a near-zero gradient moves a weight by up to 2 * lr: at lr 1e-3 that
# alone put tp=2 at 1.3e-5 after step 2 (7e-7 at step 0); at 1e-4 it stays below TOL.
LR = 1e-4


@dataclasses.dataclass(frozen=True)
class Case:
    """One layout to train; `perturb` scales one weight (a negative control), `batched_p2p`
    forces megatron's default batched p2p (the swap regression)."""

    layout: Layout
    perturb: str | None = None
    batched_p2p: bool = False

    @property
    def label(self) -> str:
        l = self.layout
        parts = [f"tp{l.tp}", f"pp{l.pp}"] + ([f"vpp{l.vpp}"] if l.vpp > 1 else [])
        parts += ["sp"] if l.sequence_parallel else []
        if l.recompute == "full":
            parts.append(f"full-{l.recompute_method}")
        elif l.recompute != "none":
            parts.append(l.recompute)
        parts += [f"perturbed:{self.perturb}"] if self.perturb else []
        parts += ["batched-p2p"] if self.batched_p2p else []
        return "·".join(parts)


def case(*, perturb=None, batched_p2p=False, **axes) -> Case:
    return Case(Layout(gbs=GBS, mbs=1, attention="sdpa", norm="torch", **axes), perturb, batched_p2p)


def _is_fc1(name: str) -> bool:
    # SwiGLU's fc1 holds [gate; up] per TP rank: its shards interleave, not concatenate.
    return name.endswith("mlp.linear_fc1.weight")


def reference_weight(name: str, shape) -> torch.Tensor:
    """The full (unsharded) starting value of a parameter, from its global name alone."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=gen)
    return 1.0 + 0.1 * noise if len(shape) == 1 else 0.05 * noise


def _shard(full: torch.Tensor, name: str, dim: int, tp: int, rank: int) -> torch.Tensor:
    if _is_fc1(name):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]])
    return full.chunk(tp, dim=dim)[rank]


def _unshard(shards: list[torch.Tensor], name: str, dim: int) -> torch.Tensor:
    if _is_fc1(name):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(shards, dim=dim)


def global_params(model: list) -> dict:
    """{global name: parameter} of this rank's chunks: local layer indices become global ones."""
    out = {}
    for chunk in model:
        gpt = chunk.module
        numbers = {str(i): layer.layer_number - 1 for i, layer in enumerate(gpt.decoder.layers)}
        for name, param in gpt.named_parameters():
            parts = name.split(".")
            if parts[:2] == ["decoder", "layers"]:
                parts[2] = str(numbers[parts[2]])
            out[".".join(parts)] = param
    return out


def _split(param) -> tuple[int, bool]:
    return getattr(param, "partition_dim", 0), bool(getattr(param, "tensor_model_parallel", False))


def load_reference(params: dict, *, perturb: str | None) -> None:
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, param in params.items():
            dim, split = _split(param)
            shape = list(param.shape)
            if split:
                shape[dim] *= tp
            full = reference_weight(name, shape)
            if name == perturb:
                full = full * (1 + 1e-3)
            param.copy_(_shard(full, name, dim, tp, rank) if split else full)


def _gathered_grads(params: dict) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp, group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()
    grads = {}
    for name, param in sorted(params.items()):
        grad = param.main_grad.detach().clone()
        dim, split = _split(param)
        if split and tp > 1:
            shards = [torch.empty_like(grad) for _ in range(tp)]
            dist.all_gather(shards, grad, group=group)
            grad = _unshard(shards, name, dim)
        grads[name] = grad
    return grads


def _batches(step: int, num_micro: int, dp_rank: int) -> list[dict]:
    from launch.data import first_sequence, microbatch

    return [microbatch(seed=SEED, step=step, mbs=1, seq_length=MODEL.seq_length,
                       vocab_size=MODEL.vocab_size, device="cpu",
                       first=first_sequence(dp_rank=dp_rank, num_microbatches=num_micro, mbs=1,
                                            index=index))
            for index in range(num_micro)]


def _train(c: Case) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from launch import cpu_trial, steps

    layout = c.layout
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=layout.tp,
                                 pipeline_model_parallel_size=layout.pp,
                                 virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None)
    trainer = cpu_trial.build(MODEL, layout, seed=SEED, lr=LR)
    if c.batched_p2p:
        trainer.config.batch_p2p_comm = True
    params = global_params(trainer.model)
    load_reference(params, perturb=c.perturb)
    num_micro = layout.num_microbatches(dist.get_world_size())
    reports = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    losses, grads = [], []
    for step in range(STEPS):
        batches = _batches(step, num_micro, ps.get_data_parallel_rank())
        step_losses = cpu_trial.forward_backward(trainer, batches, seq_length=MODEL.seq_length, mbs=1)
        step_grads = _gathered_grads(params)
        loss = steps.step_loss(step_losses, num_micro)
        cpu_trial.optimizer_step(trainer)
        losses.append(None if loss is None else float(loss))
        grads.append(step_grads if reports else {})
    dist.barrier()
    return {"losses": losses, "grads": grads}


def train_layouts(rank: int, cases: list[Case]) -> list[dict]:
    """Every case in turn on this group; `batched_p2p` needs the CUDA sync of megatron's batched
    path skipped (a no-op on CPU), which is patched for that case only."""
    import os

    # RoPE in torch, not the Triton interpreter (75% of the time here): this file checks the
    # parallel machinery; the kernel has its own parity tests (tests/kernels/test_rope.py).
    os.environ["TRITON_INTERPRET"] = "0"
    out = []
    for c in cases:
        saved = torch.cuda.synchronize
        if c.batched_p2p:
            torch.cuda.synchronize = lambda *a, **k: None
        try:
            out.append(_train(c))
        finally:
            torch.cuda.synchronize = saved
    return out


def merge(per_rank: list[list[dict]]) -> list[dict]:
    """One result per case: the loss of the last stage, the gradients of every stage."""
    merged = []
    for results in zip(*per_rank):
        losses = next(r["losses"] for r in results if r["losses"][0] is not None)
        grads = [{} for _ in range(STEPS)]
        for r in results:
            for step, g in enumerate(r["grads"]):
                grads[step].update(g)
        merged.append({"losses": losses, "grads": grads})
    return merged


def compare(result: dict, reference: dict) -> dict:
    """Max over steps and parameters of |g - g_ref|_2 / |g_ref|_2 (norm-wise relative, per
    parameter), and of |loss - loss_ref| / |loss_ref|. A missing parameter counts as inf."""
    grad_rel = 0.0
    for got, want in zip(result["grads"], reference["grads"]):
        if set(got) != set(want):
            return {"grad_rel": float("inf"), "loss_rel": float("inf")}
        for name, ref in want.items():
            diff = (got[name] - ref).norm() / ref.norm().clamp_min(1e-30)
            grad_rel = max(grad_rel, float(diff) if torch.isfinite(diff) else float("inf"))
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], reference["losses"]))
    return {"grad_rel": grad_rel, "loss_rel": loss_rel if loss_rel == loss_rel else float("inf")}
