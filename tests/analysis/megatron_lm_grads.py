"""Megatron-LM's own training step with our --spec on CPU: the main_grad of every parameter.

    PYTHONPATH=<megatron_lm folder>:<repo> TRITON_INTERPRET=1 python megatron_lm_grads.py OUT.pt < case.json

case.json: {"args": pretrain_gpt.py's arguments (one --spec NAME among them, --bf16 dropped:
fp32, as addmm's fp32-output GEMM has no CPU kernel), "runs": [{"id", "spec": NAME, "plant":
null | "double_add"}], "iterations": N}. One process for every run (Megatron-LM's imports take
seconds). Each run builds the model through Megatron-LM's get_model (pretrain_gpt's
model_provider and gpt_builder, megatron-core's DDP configured from the arguments), loads the
first run's weights, and runs N iterations of Megatron-LM's train_step (zero_grad_buffer,
forward_backward_func with pretrain_gpt.forward_step, finalize_model_grads) on the same
batches. The optimizer is a stub (Megatron-LM's needs CUDA): an SGD step from main_grad, so the
runs stay on the same weights. OUT.pt gets, per run: the last iteration's main_grad by
parameter name, the parameters whose gradient went straight into main_grad
(grad_added_to_main_grad after the backward), how many times kernels.rope's fused-QKV backward
ran, and the losses.

What the CPU needs, and nothing else: the GPU taken as Hopper (as check_cpu.py), model
`.cuda()` and CUDA streams as no-ops in get_model, and launch.cpu_shims (CUDA device requests
on the CPU, a CPU RNG tracker). The plant "double_add" makes kernels.wgrad add each weight
gradient twice: the comparison must catch it.
"""

import contextlib
import json
import os
import sys
import types
import warnings
from functools import partial

warnings.filterwarnings("ignore")
for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": "29537"}.items():
    os.environ.setdefault(key, value)

import torch  # noqa: E402

SGD_LR = 1e-2  # the stub optimizer's step: p -= SGD_LR * main_grad


class StubOptimizer:
    """What train_step calls on Megatron-LM's optimizer, as a plain SGD step."""

    def __init__(self, model):
        self.params = [p for chunk in model for p in chunk.parameters() if p.requires_grad]

    def zero_grad(self):
        pass

    def scale_loss(self, loss):
        return loss

    @torch.no_grad()
    def step(self):
        for p in self.params:
            p.add_(p.main_grad.to(p.dtype), alpha=-SGD_LR)
        return True, float(torch.stack([p.main_grad.norm() for p in self.params]).norm()), None


@contextlib.contextmanager
def cuda_as_noop():
    """get_model's `.cuda()` and side stream, as no-ops on the CPU."""
    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    saved = (torch.nn.Module.cuda, torch.cuda.Stream, torch.cuda.stream, torch.cuda.current_stream)
    torch.nn.Module.cuda = lambda self, device=None: self
    torch.cuda.Stream, torch.cuda.current_stream = lambda *a, **k: stream, lambda *a, **k: stream
    torch.cuda.stream = lambda s: contextlib.nullcontext()
    try:
        yield
    finally:
        torch.nn.Module.cuda, torch.cuda.Stream, torch.cuda.stream, torch.cuda.current_stream = saved


@contextlib.contextmanager
def planted(plant):
    from kernels import wgrad

    if plant is None:
        yield
        return
    if plant != "double_add":
        raise ValueError(f"unknown plant {plant!r}")
    once = wgrad.accumulate

    def twice(*args, **kwargs):
        once(*args, **kwargs)
        once(*args, **kwargs)

    wgrad.accumulate = twice
    try:
        yield
    finally:
        wgrad.accumulate = once


def main(out_path: str) -> None:
    case = json.loads(sys.stdin.read())
    sys.argv = ["pretrain_gpt.py", *case["args"]]
    import megatron.training.arguments as margs
    import pretrain_gpt
    from gpt_builders import gpt_builder
    from model_provider import model_provider
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.training import training
    from megatron.training.global_vars import set_global_variables

    from kernels import rope
    from launch import cpu_shims

    margs.get_device_arch_version = lambda: 9  # Hopper, as check_cpu.py
    args = margs.parse_args()
    margs.validate_args(args, {})
    set_global_variables(args)
    args.use_cpu_initialization = True
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    cpu_shims.install_rng_tracker()  # before the seeding, which then seeds the CPU tracker
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)

    gen = torch.Generator().manual_seed(0)
    n_batches = case["iterations"] * args.global_batch_size // args.micro_batch_size
    tokens = torch.randint(0, args.padded_vocab_size, (n_batches, args.micro_batch_size, args.seq_length + 1),
                           generator=gen)
    pretrain_gpt.get_batch = lambda it, vp_stage=None: next(it)
    positions = torch.arange(args.seq_length).expand(args.micro_batch_size, -1)
    batches = [(t[:, :-1], t[:, 1:], torch.ones(t.shape[0], args.seq_length), None, positions, None) for t in tokens]

    qkv_calls = [0]
    fused_apply = rope.RoPEQKVFunction.apply

    def counted(*a):
        qkv_calls[0] += 1
        return fused_apply(*a)

    rope.RoPEQKVFunction.apply = counted
    results, first_state = {}, None
    for run in case["runs"]:
        args.spec = ["kernels.megatron_lm_spec", run["spec"]]
        qkv_calls[0] = 0
        with cpu_shims.device_redirect(), cuda_as_noop():
            torch.manual_seed(args.seed)
            model = training.get_model(partial(model_provider, gpt_builder))
        params = dict(model[0].module.named_parameters())
        if first_state is None:
            first_state = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():  # the same weights in every run, whatever each spec's build drew
            for name, p in params.items():
                p.copy_(first_state[name])
        config = model[0].config
        optimizer = StubOptimizer(model)
        config.grad_scale_func = optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        scheduler = types.SimpleNamespace(step=lambda increment: None)
        fused_params, losses = set(), []
        data = iter(batches)
        with cpu_shims.device_redirect(), planted(run.get("plant")):
            for iteration in range(case["iterations"]):
                loss = training.train_step(pretrain_gpt.forward_step, data, model, optimizer, scheduler, config,
                                           get_forward_backward_func(), iteration=iteration)[0]
                losses.append({k: float(v) for k, v in loss.items()})
                fused_params |= {name for name, p in model[0].module.named_parameters()
                                 if getattr(p, "grad_added_to_main_grad", False)}
                grads = {name: p.main_grad.detach().clone() for name, p in model[0].module.named_parameters()}
        results[run["id"]] = {"main_grad": grads, "fused_params": sorted(fused_params),
                              "rope_qkv_calls": qkv_calls[0], "losses": losses}
    torch.save(results, out_path)
    print("RESULT", json.dumps({k: {"fused_params": len(v["fused_params"]), "rope_qkv_calls": v["rope_qkv_calls"],
                                    "losses": v["losses"]} for k, v in results.items()}))


if __name__ == "__main__":
    main(sys.argv[1])
