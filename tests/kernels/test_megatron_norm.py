"""kernels.megatron_norm inside megatron-core: a TP=2 TransformerBlock on gloo, sequence-parallel
weight-grad reduction, the spec signature, and (on a GPU) megatron's selective recompute."""

import pytest
import torch

from tests.gloo import run_on_gloo

HIDDEN = 64
SEQ, BATCH = 8, 2


def _config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    values = dict(
        num_layers=2, hidden_size=HIDDEN, ffn_hidden_size=96, num_attention_heads=4,
        normalization="RMSNorm", layernorm_epsilon=1e-5, use_cpu_initialization=True,
        add_bias_linear=False, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, hidden_dropout=0.0, attention_dropout=0.0,
        bias_dropout_fusion=False, masked_softmax_fusion=False, bias_activation_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
    )
    values.update(overrides)
    return TransformerConfig(**values)


def _causal_core_attention():
    """A tiny causal core attention (megatron's DotProductAttention needs CUDA)."""
    from megatron.core.transformer.module import MegatronModule

    class CausalSDPA(MegatronModule):
        def __init__(self, config, layer_number, attn_mask_type, attention_type,
                     attention_dropout=None, softmax_scale=None, **kwargs):
            super().__init__(config=config)

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None, **kwargs):
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)

    return CausalSDPA


def _block(config, norm_cls):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock, TransformerBlockSubmodules)

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = _causal_core_attention()
    spec.submodules.input_layernorm = ModuleSpec(module=norm_cls)
    spec.submodules.pre_mlp_layernorm = ModuleSpec(module=norm_cls)
    submodules = TransformerBlockSubmodules(
        layer_specs=[spec] * config.num_layers, layer_norm=ModuleSpec(module=norm_cls))
    return TransformerBlock(config, submodules)


def _block_matches_torch_norm(rank):
    """TP=2: a 2-layer block with TritonRMSNorm everywhere vs. the same with TorchRMSNorm."""
    from kernels.megatron_norm import TorchRMSNorm, TritonRMSNorm

    config = _config(tensor_model_parallel_size=2)
    ours, theirs = _block(config, TritonRMSNorm), _block(config, TorchRMSNorm)
    norms = [m for m in ours.modules() if isinstance(m, TritonRMSNorm)]
    assert len(norms) == 2 * config.num_layers + 1  # input, pre-MLP per layer, final
    assert ours.final_layernorm is norms[-1]
    for norm in norms:  # non-trivial weights, so dw and w's use in dx are both exercised
        norm.weight.data.uniform_(0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())

    torch.manual_seed(7)  # same input and output grad on both TP ranks, as megatron feeds them
    x = torch.randn(SEQ, BATCH, HIDDEN)
    dy = torch.randn(SEQ, BATCH, HIDDEN)
    outputs = []
    for block in (ours, theirs):
        xr = x.clone().requires_grad_()
        y = block(xr, attention_mask=None)
        y.backward(dy)
        grads = {n: p.grad.clone() for n, p in block.named_parameters()}
        outputs.append((y.detach(), xr.grad, grads))
    (y1, dx1, g1), (y2, dx2, g2) = outputs
    # fp32 throughout; the two norms differ only in fp32 rounding order (~1e-7 relative),
    # amplified by at most a few through five norms and two layers: 1e-5 leaves ample room.
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx1, dx2, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-5, atol=1e-5, msg=name)
    return sorted(n for n in g1 if "layernorm" in n)


def _sequence_parallel_grad_is_reduced(rank, sequence_parallel):
    """Each TP rank normalises its half of the sequence; megatron's grad finalisation must
    sum the weight's gradient over TP exactly when the weight is tagged sequence_parallel."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import (
        _allreduce_non_tensor_model_parallel_grads)  # the step finalize_model_grads runs

    from kernels.megatron_norm import TorchRMSNorm, TritonRMSNorm

    config = _config(tensor_model_parallel_size=2, sequence_parallel=sequence_parallel)
    torch.manual_seed(11)
    x = torch.randn(SEQ, BATCH, HIDDEN)
    dy = torch.randn(SEQ, BATCH, HIDDEN)
    weight = torch.empty(HIDDEN).uniform_(0.5, 1.5)

    full = TorchRMSNorm(_config(), HIDDEN)  # whole sequence on one rank: the target
    full.weight.data.copy_(weight)
    full(x).backward(dy)

    norm = TritonRMSNorm(config, HIDDEN)
    norm.weight.data.copy_(weight)
    assert norm.weight.sequence_parallel is sequence_parallel
    shard = slice(rank * SEQ // 2, (rank + 1) * SEQ // 2)
    norm(x[shard]).backward(dy[shard])
    local = norm.weight.grad.clone()

    class Chunk(torch.nn.Module):  # what finalize_model_grads receives: a DDP-like chunk
        ddp_config = DistributedDataParallelConfig()

        def __init__(self, module):
            super().__init__()
            self.module = module

    _allreduce_non_tensor_model_parallel_grads([Chunk(norm)], config)
    return local, norm.weight.grad, full.weight.grad


def _all_tp2_checks(rank):
    """One spawn of two gloo ranks serves every TP=2 test (each spawn costs ~10 s of imports)."""
    return {
        "block": _block_matches_torch_norm(rank),
        True: _sequence_parallel_grad_is_reduced(rank, True),
        False: _sequence_parallel_grad_is_reduced(rank, False),
    }


@pytest.fixture(scope="module")
def tp2_results():
    return run_on_gloo(_all_tp2_checks, world_size=2, tp=2)


def test_block_at_tp2_matches_torch_norm(tp2_results):
    names = [r["block"] for r in tp2_results]
    assert names[0] == names[1] and len(names[0]) == 5


@pytest.mark.parametrize("sequence_parallel", [True, False])
def test_sequence_parallel_weight_grad(tp2_results, sequence_parallel):
    local0, reduced0, full = tp2_results[0][sequence_parallel]
    local1, reduced1, _ = tp2_results[1][sequence_parallel]
    # fp32 sums over 16 vs 8+8 rows; reordering changes only the last bits.
    torch.testing.assert_close(local0 + local1, full, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(local0, full, rtol=1e-3)  # one half alone is not the answer
    if sequence_parallel:
        torch.testing.assert_close(reduced0, full, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(reduced1, full, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(reduced0, local0) and torch.equal(reduced1, local1)


def test_norm_signature_and_parameters():
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from kernels.megatron_norm import TorchRMSNorm, TritonRMSNorm

    config = _config(params_dtype=torch.bfloat16)
    for cls in (TritonRMSNorm, TorchRMSNorm):
        norm = build_module(ModuleSpec(module=cls), config=config, hidden_size=48, eps=1e-6)
        assert norm.eps == 1e-6 and norm.hidden_size == 48
        assert norm.weight.dtype == torch.bfloat16
        assert torch.equal(norm.weight, torch.ones(48, dtype=torch.bfloat16))
        assert norm.weight.sequence_parallel is False
        assert [n for n, _ in norm.named_parameters()] == ["weight"]
    with pytest.raises(ValueError, match="normalization"):
        TritonRMSNorm(_config(normalization="LayerNorm"), HIDDEN)


def test_triton_and_torch_modules_agree_on_cpu_or_gpu():
    from kernels.megatron_norm import TorchRMSNorm, TritonRMSNorm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = _config()
    ours, theirs = TritonRMSNorm(config, 1000).to(device), TorchRMSNorm(config, 1000).to(device)
    torch.manual_seed(5)
    w = torch.rand(1000) + 0.5
    ours.weight.data.copy_(w)
    theirs.weight.data.copy_(w)
    x = torch.randn(3, 2, 1000, device=device)
    dy = torch.randn(3, 2, 1000, device=device)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [m(xi) for m, xi in zip((ours, theirs), xs)]
    for y in ys:
        y.backward(dy)
    # fp32 on both sides; differences are rounding order only.
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_selective_recompute_of_the_norm_on_gpu():
    """megatron's CheckpointWithoutOutput frees the norm's output, recomputes it in backward
    and copies it back into the freed storage; grads must equal a plain run's."""
    from megatron.core import tensor_parallel

    from kernels.megatron_norm import TritonRMSNorm

    norm = TritonRMSNorm(_config(params_dtype=torch.bfloat16), 4096).cuda()
    norm.weight.data.uniform_(0.5, 1.5)
    proj = torch.nn.Linear(4096, 512, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(256, 2, 4096, device="cuda", dtype=torch.bfloat16)
    grads = []
    for recompute in (False, True):
        xr = x.clone().requires_grad_()
        norm.weight.grad, proj.weight.grad = None, None
        if recompute:
            # megatron-core 0.16.1 reads fp8=False as "fp8 on" (`fp8 is not None`) and then
            # needs TransformerEngine; None is its spelling of off.
            checkpoint = tensor_parallel.CheckpointWithoutOutput(fp8=None)
            y = checkpoint.checkpoint(norm, xr)
            out = proj(y)  # saves y for its weight grad
            checkpoint.discard_output_and_register_recompute(out)
            assert y.untyped_storage().size() == 0
        else:
            out = proj(norm(xr))
        out.float().square().sum().backward()
        grads.append((xr.grad, norm.weight.grad, proj.weight.grad))
    for plain, recomputed in zip(*grads):
        assert torch.equal(plain, recomputed)  # same kernels, same inputs: bitwise


def _ddp_main_grads(rank):
    """One gloo rank, megatron DDP (fp32 grad buffer, overlapped reduction: its hook needs a
    grad on every param), two micro-batches through TritonRMSNorm: untagged (DDP's hook adds
    dw), tagged (the kernel adds it; the hook must not), and a planted double add (the
    kernel adds and autograd still gets dw, unflagged) that the same comparison must catch."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from kernels import rmsnorm
    from kernels.megatron_norm import TritonRMSNorm
    from launch.cpu_shims import device_redirect

    torch.manual_seed(13)
    batches = [(torch.randn(SEQ, BATCH, HIDDEN), torch.randn(SEQ, BATCH, HIDDEN)) for _ in range(2)]
    weight = torch.empty(HIDDEN).uniform_(0.5, 1.5)
    original = rmsnorm.RMSNormFunction.backward

    def double_add(ctx, dy):  # adds into main_grad and hands autograd dw, flag cleared
        dx, _, *rest = original(ctx, dy)
        x, w = ctx.saved_tensors
        w.grad_added_to_main_grad = False
        return (dx, rmsnorm.backward(dy, x, w, ctx.eps)[1], *rest)

    out = {}
    for name, fused, backward in (("untagged", False, original), ("tagged", True, original),
                                  ("double_add", True, double_add)):
        config = _config()
        norm = TritonRMSNorm(config, HIDDEN, wgrad_fusion=fused)
        norm.weight.data.copy_(weight)
        with device_redirect():
            ddp = DistributedDataParallel(
                config=config, module=norm,
                ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                         overlap_grad_reduce=True))
        rmsnorm.RMSNormFunction.backward = staticmethod(backward)
        try:
            for i, (x, dy) in enumerate(batches):
                with ddp.no_sync() if i == 0 else torch.enable_grad():
                    ddp(x).backward(dy)
            ddp.finish_grad_sync()
        finally:
            rmsnorm.RMSNormFunction.backward = staticmethod(original)
        w = norm.weight
        out[name] = (w.main_grad.clone(), w.grad, w.fused_main_grad, w.grad_added_to_main_grad)
    return out


@pytest.fixture(scope="module")
def ddp_results():
    return run_on_gloo(_ddp_main_grads, world_size=1)[0]


def test_tagged_norm_adds_into_main_grad_once_through_megatron_ddp(ddp_results):
    untagged, tagged = ddp_results["untagged"], ddp_results["tagged"]
    assert untagged[2] is False and tagged[2] is True  # the module tags only when asked
    assert untagged[3] is False and tagged[3] is True
    assert untagged[1] is None and tagged[1] is None  # DDP's hook cleared both
    # fp32 throughout: the same dw sums (one kernel), added to the buffer by the hook or
    # the kernel; the order of the two fp32 adds is the same, so 1e-6 is ample.
    torch.testing.assert_close(tagged[0], untagged[0], rtol=1e-6, atol=1e-6)
    assert untagged[0].abs().max() > 0.1  # two micro-batches of a real gradient


def test_a_double_add_under_ddp_is_caught(ddp_results):
    """Negative control: the kernel's add plus DDP's add of the same dw doubles main_grad."""
    untagged, doubled = ddp_results["untagged"][0], ddp_results["double_add"][0]
    assert not torch.allclose(doubled, untagged, rtol=1e-3)
    torch.testing.assert_close(doubled, 2 * untagged, rtol=1e-5, atol=1e-5)


def _norm_run(norm, x, dy):
    from tests.kernels.slots import tap

    seen = []
    xr = tap(x.clone().requires_grad_(), seen)
    norm.weight.grad = None
    y = norm(xr)
    y.backward(dy)
    return y, seen[0], norm.weight.grad


@pytest.mark.parametrize("contiguous", [True, False])
def test_triton_norm_writes_y_and_dx_into_targets(contiguous):
    """layout.wgrad_defer: TritonRMSNorm's y (QKV's or FC1's input) and dx (the final norm's:
    the last FC2's dY) land in the slots offered (kernels.rmsnorm's launchers, both their hot
    and their strided paths), bit-identical to fresh tensors, which lie outside them (control)."""
    from kernels.megatron_norm import TritonRMSNorm
    from tests.kernels.slots import Slots

    device = "cuda" if torch.cuda.is_available() else "cpu"
    norm = TritonRMSNorm(_config(), 96).to(device)
    gen = torch.Generator().manual_seed(1)
    norm.weight.data.copy_(torch.rand(96, generator=gen) + 0.5)
    x = torch.randn(5, 3, 96, generator=gen).to(device)
    dy = torch.randn(5, 3, 96, generator=gen).to(device)
    if not contiguous:
        x = torch.randn(3, 5, 96, generator=gen).to(device).transpose(0, 1)
        dy = torch.randn(3, 5, 96, generator=gen).to(device).transpose(0, 1)
    plain = _norm_run(norm, x, dy)
    ys, dxs = Slots(x.shape, x.dtype, device), Slots(x.shape, x.dtype, device)
    norm.y_target, norm.dx_target = ys.target, dxs.target
    ours = _norm_run(norm, x, dy)
    for name, out, expected in zip(("y", "dx", "dw"), ours, plain):
        assert torch.equal(out, expected), name
    assert ys.holds(ours[0]) and dxs.holds(ours[1]) and ys.untouched_elsewhere() and dxs.untouched_elsewhere()
    assert not ys.holds(plain[0]) and not dxs.holds(plain[1])
    norm.y_target = norm.dx_target = Slots((5, 3, 95), x.dtype, device).target  # another shape: ignored
    assert all(torch.equal(o, p) for o, p in zip(_norm_run(norm, x, dy), plain))


def test_rmsnorm_launchers_refuse_a_wrong_out():
    from kernels import rmsnorm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w = torch.randn(4, 64, device=device), torch.ones(64, device=device)
    with pytest.raises(ValueError, match="y must be"):
        rmsnorm.forward(x, w, 1e-5, out=torch.empty(4, 64, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="dx must be"):
        rmsnorm.backward(x, x, w, 1e-5, out=torch.empty(64, 4, device=device).t())


@pytest.mark.cuda
def test_triton_norm_targets_through_the_cached_launch_on_gpu():
    """On CUDA the second call of a shape launches the cached compiled kernel directly
    (kernels.fast_launch): a slot must get the same bits as the fresh output of the first
    (llama_1b3 at mbs 1: [2048, 1, 2048] bf16, and the 2 x 2048 slot views' alignment)."""
    from kernels.megatron_norm import TritonRMSNorm
    from tests.kernels.slots import Slots

    norm = TritonRMSNorm(_config(params_dtype=torch.bfloat16), 2048).cuda()
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2048, 1, 2048, device="cuda").to(torch.bfloat16)
    dy = torch.randn(2048, 1, 2048, device="cuda").to(torch.bfloat16)
    plain = _norm_run(norm, x, dy)
    ys, dxs = Slots(x.shape, x.dtype, "cuda"), Slots(x.shape, x.dtype, "cuda")
    norm.y_target, norm.dx_target = ys.target, dxs.target
    ours = _norm_run(norm, x, dy)
    assert all(torch.equal(o, p) for o, p in zip(ours, plain))
    assert ys.holds(ours[0]) and dxs.holds(ours[1]) and ys.untouched_elsewhere() and dxs.untouched_elsewhere()
