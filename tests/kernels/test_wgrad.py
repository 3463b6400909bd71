"""kernels.wgrad: weight-gradient GEMMs accumulating into fp32 gradient buffers, and the linear
modules that bring them into a megatron-core GPTModel through the layer spec.

CPU (fp32, gloo, megatron DDP): a tiny GPTModel built with `wgrad_fusion=True` must end
two micro-batches with the same `main_grad` in every parameter as the stock model from the
same seed and tokens, at tp 1 and at tp 2 with and without sequence parallelism (the
input-gradient all-reduce and reduce-scatter of the copied backward). Both sides compute in
fp32 and differ only in summation order (the GEMM adds into the buffer, or adds its result
to it), so 1e-5 relative holds with a wide margin. The negative control overwrites the
buffer instead of adding to it: the first micro-batch's gradient is then lost, and the
same comparison must fail.
"""

import pytest
import torch

from core.config import Layout, ModelConfig
from kernels import wgrad
from tests.gloo import run_on_gloo

TINY = dict(name="tiny", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
            num_query_groups=2, vocab_size=1000, seq_length=16)
FP32_TOL = dict(rtol=1e-5, atol=1e-7)
CASES = {  # name: (tp, layout axes); world 2 throughout, so tp 1 is dp 2
    "tp1": (1, dict(mbs=2, gbs=8)),
    "tp2": (2, dict(mbs=2, gbs=4)),
    "tp2_sp": (2, dict(mbs=2, gbs=4, sequence_parallel=True)),
    # The Triton norms' weight gradients into main_grad too (kernels.rmsnorm, tagged via the spec).
    "tp1_triton_norm": (1, dict(mbs=2, gbs=8, norm="triton")),
}


def test_16_bit_buffer_accumulates_the_weight_gradient():
    gen = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(32, n, generator=gen).to(torch.bfloat16) for n in (6, 4))
    main = torch.randn(4, 6, generator=gen).to(torch.bfloat16)
    expected = main.double() + dy.double().t() @ x.double()
    wgrad.wgrad_gemm_accum_fp16(x, dy, main)
    assert main.dtype == torch.bfloat16  # accumulated in place, in the 16-bit buffer
    # One rounding of the sum to bf16 (unit roundoff 2^-9 relative) plus the product's
    # own: within 2^-7 of the largest entry. Without the `main +` it is off by ~1.
    assert (main.double() - expected).abs().max() <= 2.0**-7 * expected.abs().max()


def test_fp32_buffer_of_fp32_inputs_accumulates_in_place():
    gen = torch.Generator().manual_seed(1)
    x, dy, main = torch.randn(40, 6, generator=gen), torch.randn(40, 5, generator=gen), torch.randn(5, 6, generator=gen)
    before = main.clone()
    wgrad.accumulate(x, dy, main)
    expected = before.double() + dy.double().t() @ x.double()
    assert torch.allclose(main.double(), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(main, before + 0.5 * (dy.t() @ x), rtol=1e-3)  # it is the whole product
    with pytest.raises(RuntimeError, match="no weight-gradient accumulation"):
        wgrad.accumulate(x.double(), dy.double(), main)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only behaviour")
def test_without_cuda_no_trial_fuses_and_megatron_is_left_alone():
    from megatron.core.tensor_parallel import layers

    before = (layers._grad_accum_fusion_available, getattr(layers, "fused_weight_gradient_mlp_cuda", None))
    assert not wgrad.available("cuda") and not wgrad.available("cpu")
    assert (layers._grad_accum_fusion_available, getattr(layers, "fused_weight_gradient_mlp_cuda", None)) == before


def test_only_megatrons_own_output_layer_takes_the_subclass():
    with pytest.raises(TypeError, match="ColumnParallelLinear"):
        wgrad.fuse_output_layer(torch.nn.Linear(2, 2))


def _main_grads(layout, *, fused: bool) -> tuple[dict, set]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from launch import cpu_trial
    from launch.data import first_sequence, microbatch

    model_cfg = ModelConfig(**TINY)
    torch.manual_seed(7)
    trainer = cpu_trial.build(model_cfg, layout, seed=7, lr=1e-3, wgrad_fusion=fused)
    num_micro = layout.num_microbatches(dist.get_world_size())
    dp_rank = ps.get_data_parallel_rank()
    batches = [microbatch(seed=7, step=0, mbs=layout.mbs, seq_length=model_cfg.seq_length,
                          vocab_size=model_cfg.vocab_size, device="cpu",
                          first=first_sequence(dp_rank=dp_rank, num_microbatches=num_micro,
                                               mbs=layout.mbs, index=i))
               for i in range(num_micro)]
    assert num_micro == 2  # two micro-batches: the second must add to the first
    cpu_trial.forward_backward(trainer, batches, seq_length=model_cfg.seq_length, mbs=layout.mbs)
    grads = {name: p.main_grad.numpy().copy() for name, p in trainer.model[0].named_parameters()}
    kinds = {f"{type(m).__module__}.{type(m).__name__}" for m in trainer.model[0].modules()
             if "ParallelLinear" in type(m).__name__}
    # Norm weights tagged to add their gradient into main_grad themselves.
    kinds |= {f"tagged {type(m).__name__}" for m in trainer.model[0].modules()
              if getattr(getattr(m, "weight", None), "fused_main_grad", False)}
    return grads, kinds


def _compare(rank, tol):
    import numpy as np
    from megatron.core import parallel_state as ps

    out = {}
    for name, (tp, axes) in CASES.items():
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp)
        layout = Layout(tp=tp, attention="sdpa", **{"norm": "torch", **axes})
        stock, stock_kinds = _main_grads(layout, fused=False)
        fused, fused_kinds = _main_grads(layout, fused=True)
        out[name] = {
            "mismatched": sorted(n for n in stock if not np.allclose(fused[n], stock[n], **tol)),
            "params": len(stock),
            "fused_kinds": sorted(fused_kinds), "stock_kinds": sorted(stock_kinds),
        }
    return out


def _fused_module_tags() -> dict:
    """The weights our fused norm and loss modules differentiate themselves, and whether each is
    tagged to add into main_grad, with the switch off and on (tp 1)."""
    from megatron.core import parallel_state as ps

    from launch import cpu_trial

    ps.destroy_model_parallel()
    ps.initialize_model_parallel()
    layout = Layout(attention="sdpa", norm="torch", mbs=2, gbs=8, loss="fused", add_norm="fused")
    tags = {}
    for fused in (False, True):
        trainer = cpu_trial.build(ModelConfig(**TINY), layout, seed=7, lr=1e-3, wgrad_fusion=fused)
        tags[fused] = {name: getattr(p, "fused_main_grad", None) or getattr(p, "fused_ce_main_grad", None)
                       for name, p in trainer.model[0].named_parameters()
                       if hasattr(p, "fused_main_grad") or hasattr(p, "fused_ce_main_grad")}
    return tags


def _compare_both_ways(rank, tol):
    """The comparison, its negative control and the fused modules' tags, in one spawn (each
    spawn costs ~10 s of imports)."""
    from unittest import mock

    def overwrite(total_input, grad_output, main_grad, **_):  # forgets what the buffer held
        main_grad.copy_(grad_output.t() @ total_input)

    real = _compare(rank, tol)
    with mock.patch.object(wgrad, "accumulate", overwrite):
        control = _compare(rank, tol)
    return real, control, _fused_module_tags()


@pytest.fixture(scope="module")
def compared():
    return run_on_gloo(_compare_both_ways, world_size=2, args=(FP32_TOL,))[0]


@pytest.mark.parametrize("case", CASES)
def test_fused_linears_give_the_stock_models_gradients(compared, case):
    result = compared[0][case]
    assert result["mismatched"] == [], result
    # The fusion really ran: our four linears and the output layer, none of megatron's left;
    # and the Triton norms (all 2 x layers + 1) tagged where they are the layout's norm.
    tagged = ["tagged TritonRMSNorm"] if case == "tp1_triton_norm" else []
    assert result["fused_kinds"] == ["kernels.wgrad.ColumnParallelLinear", "kernels.wgrad.RowParallelLinear"] + tagged
    assert all(kind.startswith("megatron.") for kind in result["stock_kinds"])


@pytest.mark.parametrize("case", CASES)
def test_an_overwriting_gemm_is_caught(compared, case):
    row = compared[1][case]
    # Every fused weight loses the first micro-batch (4 linears a layer and the output
    # layer); norms and embeddings are not fused.
    assert len(row["mismatched"]) == 4 * TINY["num_layers"] + 1, row


def test_the_fused_norm_and_loss_take_the_same_switch(compared):
    off, on = compared[2][False], compared[2][True]
    # Two norms per fused layer and the output layer's weight (the fused loss differentiates it).
    assert len(on) == 2 * TINY["num_layers"] + 1 and set(on) == set(off)
    assert all(on.values()) and not any(off.values())


def _one_microbatch_grads(rank, zero_kind: str) -> dict:
    """layout.grad_buffer=overwrite at one micro-batch per step (tp 1, dp 2): the buffers are
    first filled with stale values (a previous step's), then one step zeroes them the
    given way. Returns, per parameter, whether its main_grad equals a normal step's."""
    import numpy as np
    from megatron.core import parallel_state as ps

    from launch import cpu_trial, steps
    from launch.cpu_shims import device_redirect
    from launch.data import first_sequence, microbatch

    ps.destroy_model_parallel()
    ps.initialize_model_parallel()
    model_cfg, layout = ModelConfig(**TINY), Layout(attention="sdpa", norm="torch", mbs=4, gbs=8)
    assert layout.num_microbatches(2) == 1
    torch.manual_seed(7)
    trainer = cpu_trial.build(model_cfg, layout, seed=7, lr=1e-3, wgrad_fusion=True)
    batch = microbatch(seed=7, step=0, mbs=layout.mbs, seq_length=model_cfg.seq_length,
                       vocab_size=model_cfg.vocab_size, device="cpu",
                       first=first_sequence(dp_rank=ps.get_data_parallel_rank(), num_microbatches=1,
                                            mbs=layout.mbs, index=0))
    chunk = trainer.model[0]

    def step(zero_buffer):
        with device_redirect():  # as cpu_trial.forward_backward
            steps.forward_backward(trainer.schedule, trainer.model, [batch], num_micro=1,
                                   seq_length=model_cfg.seq_length, mbs=layout.mbs, zero_buffer=zero_buffer)
        return {name: p.main_grad.numpy().copy() for name, p in chunk.named_parameters()}

    def flags_only(ddp_chunk):  # the negative control: nothing zeroed, the GEMMs overwrite
        for w in wgrad.overwritten_weights(ddp_chunk):
            setattr(w, wgrad.OVERWRITE_FLAG, True)

    def zeros_only(ddp_chunk):  # the negative control: all but the linears zeroed, GEMMs add
        wgrad.zero_grad_buffer_except_overwritten(ddp_chunk)
        for w in wgrad.overwritten_weights(ddp_chunk):
            setattr(w, wgrad.OVERWRITE_FLAG, False)

    reference = step(None)
    for p in chunk.parameters():
        p.main_grad.fill_(3.0)  # stale: what the buffer holds before a step
    zero = {"overwrite": wgrad.zero_grad_buffer_except_overwritten, "flags_only": flags_only,
            "zeros_only": zeros_only}[zero_kind]
    got = step(zero)
    return {"matching": sorted(n for n in got if np.allclose(got[n], reference[n], **FP32_TOL)),
            "params": len(got), "overwritten": len(wgrad.overwritten_weights(chunk)),
            "flags_left": sum(bool(getattr(w, wgrad.OVERWRITE_FLAG, False))
                              for w in wgrad.overwritten_weights(chunk))}


def _one_microbatch_all(rank):
    return {kind: _one_microbatch_grads(rank, kind) for kind in ("overwrite", "flags_only", "zeros_only")}


def test_overwriting_gemms_at_one_microbatch_give_a_normal_steps_gradients():
    result = run_on_gloo(_one_microbatch_all, world_size=2)[0]
    fused = 4 * TINY["num_layers"] + 1  # four linears a layer and the output layer
    good = result["overwrite"]
    assert good["overwritten"] == fused
    assert len(good["matching"]) == good["params"], good  # every gradient, fused or not
    assert good["flags_left"] == 0  # each overwrite flag consumed by its one GEMM
    # Controls: with nothing zeroed, the norms and embeddings keep the stale 3.0; with the
    # linears zeroed by nobody, their GEMMs add onto it.
    assert len(result["flags_only"]["matching"]) == fused, result["flags_only"]
    assert len(result["zeros_only"]["matching"]) == good["params"] - fused, result["zeros_only"]


@pytest.mark.cuda
@pytest.mark.parametrize("tokens,out_features,in_features", [(2048, 6144, 2048), (4096, 2048, 5632), (100, 48, 80)])
def test_fp32_accumulation_matches_the_reference_on_gpu(tokens, out_features, in_features):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, in_features, device="cuda", generator=gen).to(torch.bfloat16)
    dy = torch.randn(tokens, out_features, device="cuda", generator=gen).to(torch.bfloat16)
    main = torch.randn(out_features, in_features, device="cuda", generator=gen)
    expected = main + dy.double().t().matmul(x.double()).float()
    for _ in range(2):  # accumulates: a second call adds the same gradient again
        wgrad.accumulate(x, dy, main)
    expected = expected + dy.double().t().matmul(x.double()).float()
    assert torch.allclose(main, expected, rtol=1e-3, atol=1e-2 * tokens ** 0.5)
    assert wgrad.available("cuda")


@pytest.mark.cuda
def test_an_overwriting_gemm_never_reads_the_stale_buffer_on_gpu():
    """layout.grad_buffer=overwrite: beta 0, so cuBLAS does not read the buffer (NaN there
    must not reach the result); the default adds to it."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2048, 2048, device="cuda", generator=gen).to(torch.bfloat16)
    dy = torch.randn(2048, 512, device="cuda", generator=gen).to(torch.bfloat16)
    expected = dy.double().t().matmul(x.double()).float()
    main = torch.full((512, 2048), float("nan"), device="cuda")
    wgrad.accumulate(x, dy, main, overwrite=True)
    assert torch.allclose(main, expected, rtol=1e-3, atol=1e-2 * 2048 ** 0.5)
    wgrad.accumulate(x, dy, main)  # the next use in the step adds
    assert torch.allclose(main, 2 * expected, rtol=1e-3, atol=2e-2 * 2048 ** 0.5)
