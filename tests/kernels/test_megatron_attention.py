"""The megatron-core core-attention adapters: alone, under recompute, and inside a
GPTModel at TP=2 over gloo (CPU, fp32), where Triton must match SDPA."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from kernels.megatron_attention import SDPACoreAttention, TritonCoreAttention
from tests.gloo import run_on_gloo

# Both sides compute in fp32 (the Triton interpreter on CPU, torch's math SDPA);
# only the summation order differs, so relative differences stay near 1e-6.
FP32_TOL = dict(rtol=1e-4, atol=1e-5)


def _config(**overrides):
    fields = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True,
                  perform_initialization=True, bf16=False, gradient_accumulation_fusion=False,
                  bias_activation_fusion=False, masked_softmax_fusion=False,
                  persist_layer_norm=False, apply_rope_fusion=False, normalization="RMSNorm",
                  add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu)
    fields.update(overrides)
    return TransformerConfig(**fields)


def _build(cls, config, **params):
    return cls(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
               attention_type="self", **params)


def _megatron_qkv(s, b, ng, group, hn, seed):
    """query [s, b, np, hn], key/value [s, b, ng, hn]: views of one fused buffer, as handed over."""
    gen = torch.Generator().manual_seed(seed)
    mixed = torch.randn(s, b, ng, (group + 2) * hn, generator=gen, requires_grad=True)
    query, key, value = torch.split(mixed, [group * hn, hn, hn], dim=3)
    return mixed, query.reshape(s, b, ng * group, hn), key, value


@pytest.mark.parametrize("causal", [True, False])
def test_triton_matches_sdpa_on_fused_qkv_views(causal):
    config = _config()
    mask_type = AttnMaskType.causal if causal else AttnMaskType.no_mask
    outs, grads = [], []
    for module in (_build(TritonCoreAttention, config),
                   _build(SDPACoreAttention, config, backend="math")):
        mixed, query, key, value = _megatron_qkv(s=23, b=2, ng=2, group=2, hn=16, seed=0)
        out = module(query, key, value, None, attn_mask_type=mask_type)
        assert out.shape == (23, 2, 4 * 16)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
        outs.append(out.detach())
        grads.append(mixed.grad)
    torch.testing.assert_close(outs[0], outs[1], **FP32_TOL)
    torch.testing.assert_close(grads[0], grads[1], **FP32_TOL)


def test_sdpa_backends_agree_and_unknown_backend_is_rejected():
    config = _config()
    _, query, key, value = _megatron_qkv(s=9, b=1, ng=2, group=2, hn=16, seed=1)
    auto = _build(SDPACoreAttention, config)(query, key, value, None)
    math_ = _build(SDPACoreAttention, config, backend="math")(query, key, value, None)
    torch.testing.assert_close(auto, math_, **FP32_TOL)
    with pytest.raises(ValueError, match="backend"):
        _build(SDPACoreAttention, config, backend="fastest")


@pytest.mark.parametrize("cls", [TritonCoreAttention, SDPACoreAttention])
def test_context_parallel_is_rejected(cls):
    config = _config()
    config.context_parallel_size = 2  # set after construction: no process groups needed
    with pytest.raises(ValueError, match="context parallel"):
        _build(cls, config)


def test_triton_rejects_dropout_and_explicit_masks():
    with pytest.raises(ValueError, match="attention_dropout"):
        _build(TritonCoreAttention, _config(attention_dropout=0.1))
    module = _build(TritonCoreAttention, _config())
    _, query, key, value = _megatron_qkv(s=8, b=1, ng=2, group=2, hn=16, seed=2)
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="causal or unmasked"):
        module(query, key, value, mask, attn_mask_type=AttnMaskType.padding)


def test_safe_under_recompute():
    # Selective recompute runs the forward under no_grad, then again inside backward.
    from torch.utils.checkpoint import checkpoint

    module = _build(TritonCoreAttention, _config())
    results = []
    for recompute in (False, True):
        mixed, query, key, value = _megatron_qkv(s=19, b=2, ng=2, group=2, hn=16, seed=3)
        if recompute:
            out = checkpoint(module, query, key, value, None, use_reentrant=True)
        else:
            out = module(query, key, value, None)
        out.square().sum().backward()
        results.append((out.detach(), mixed.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)


def _node_names(grad_fn) -> set:
    """The names of every autograd node the backward from grad_fn can reach."""
    names, stack, seen = set(), [grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack += [next_fn for next_fn, _ in node.next_functions]
    return names


@pytest.mark.parametrize("group, groups", [(1, 4), (2, 2)])
def test_fused_qkv_grad_matches_and_skips_the_concatenation(group, groups):
    """layout.qkv_grad=fused: the same output and QKV gradient, bit for bit (the same RoPE
    kernel either way; dv is copied instead of concatenated), and with one query head per
    KV group megatron's split backward (the concatenation) is gone from the graph. With 2
    query heads per group q is a reshaped copy, not a view: the flag changes nothing, and
    the unfused graphs keep the split (the control that the graph check can fail)."""
    results = []
    for fused in (False, True):
        module = _build(SDPACoreAttention, _config(), backend="math", rope=True,
                        fused_qkv_grad=fused)
        mixed, query, key, value = _megatron_qkv(s=13, b=2, ng=groups, group=group, hn=16, seed=5)
        out = module(query, key, value, None)
        nodes = _node_names(out.grad_fn)
        out.backward(torch.sin(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
        results.append((out.detach(), mixed.grad, any("Split" in name for name in nodes)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)
    assert [split for _, _, split in results] == [True, group > 1]


def test_fused_qkv_grad_under_recompute_and_without_rope():
    """Recompute hands the module detached inputs: the fused path steps aside, same results."""
    from torch.utils.checkpoint import checkpoint

    module = _build(SDPACoreAttention, _config(), backend="math", rope=True, fused_qkv_grad=True)
    results = []
    for recompute in (False, True):
        mixed, query, key, value = _megatron_qkv(s=11, b=2, ng=4, group=1, hn=16, seed=6)
        out = (checkpoint(module, query, key, value, None, use_reentrant=True) if recompute
               else module(query, key, value, None))
        out.square().sum().backward()
        results.append((out.detach(), mixed.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="rope=True"):
        _build(SDPACoreAttention, _config(), backend="math", fused_qkv_grad=True)


# ------------------------------------------------------------- GPTModel, TP=2


def _gpt_loss_and_grads(rank, attention, config_kwargs, seq_len, device):
    """Build a small GPTModel (same seed), run forward+backward, return loss and grads."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if attention == "triton":
        core = ModuleSpec(module=TritonCoreAttention)
    elif attention == "flash_attn":
        from kernels.megatron_attention import FlashAttn4CoreAttention

        core = ModuleSpec(module=FlashAttn4CoreAttention)
    else:
        core = ModuleSpec(module=SDPACoreAttention, params={"backend": attention})
    spec.submodules.self_attention.submodules.core_attention = core
    torch.manual_seed(1234)
    config = _config(**config_kwargs)
    # megatron's RoPE moves its frequencies to CUDA unconditionally: learned positions on CPU.
    position = "rope" if device == "cuda" else "learned_absolute"
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=128,
                     max_sequence_length=seq_len, position_embedding_type=position).to(device)
    gen = torch.Generator().manual_seed(99)
    tokens = torch.randint(0, 128, (2, seq_len), generator=gen).to(device)
    positions = torch.arange(seq_len, device=device).unsqueeze(0).expand(2, -1)
    losses = model(tokens, positions, attention_mask=None, labels=tokens)
    loss = losses.float().mean()
    loss.backward()
    grads = {name: p.grad.detach().float().cpu() for name, p in model.named_parameters()}
    return loss.item(), grads


def _tp2_compare(rank):
    kwargs = dict(tensor_model_parallel_size=2)
    triton_loss, triton_grads = _gpt_loss_and_grads(rank, "triton", kwargs, 21, "cpu")
    sdpa_loss, sdpa_grads = _gpt_loss_and_grads(rank, "math", kwargs, 21, "cpu")
    return triton_loss, sdpa_loss, triton_grads, sdpa_grads


def test_gpt_model_tp2_triton_matches_sdpa():
    # 4 query heads, 2 KV groups: each TP rank holds 2 query heads sharing 1 KV head.
    for triton_loss, sdpa_loss, triton_grads, sdpa_grads in run_on_gloo(
            _tp2_compare, world_size=2, tp=2):
        assert abs(triton_loss - sdpa_loss) <= 1e-5 * abs(sdpa_loss)
        assert triton_grads.keys() == sdpa_grads.keys()
        qkv_grads = [name for name in triton_grads if "linear_qkv.weight" in name]
        assert qkv_grads  # attention's gradients reach the QKV projection
        for name in triton_grads:
            torch.testing.assert_close(triton_grads[name], sdpa_grads[name], **FP32_TOL,
                                       msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------- GPU


def gpu_compare(rank, attention, peer, kwargs, seq_len):
    """GPTModel on CUDA with `attention` and with `peer`: (loss, peer loss, relative error of
    each parameter's gradient)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(123)
    loss, grads = _gpt_loss_and_grads(rank, attention, kwargs, seq_len, "cuda")
    peer_loss, peer_grads = _gpt_loss_and_grads(rank, peer, kwargs, seq_len, "cuda")
    errors = {name: ((grads[name] - peer_grads[name]).norm()
                     / peer_grads[name].norm().clamp_min(1e-12)).item() for name in grads}
    return loss, peer_loss, errors


def _gpu_recompute_compare(rank):
    kwargs = dict(bf16=True, params_dtype=torch.bfloat16, recompute_granularity="selective",
                  hidden_size=256, num_attention_heads=4, num_query_groups=2, kv_channels=64)
    return gpu_compare(rank, "triton", "flash", kwargs, 300)


@pytest.mark.cuda
def test_gpu_gpt_model_bf16_selective_recompute_matches_sdpa_flash():
    # TP=1 runs no collectives, so gloo serves as the (unused) process group.
    triton_loss, sdpa_loss, errors = run_on_gloo(_gpu_recompute_compare, world_size=1, tp=1)[0]
    # bf16 end to end: two different (both correct) kernels differ by bf16 rounding.
    assert abs(triton_loss - sdpa_loss) <= 2e-2 * abs(sdpa_loss)
    assert max(errors.values()) < 5e-2, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_gpu_fused_qkv_grad_matches_at_llama_shape(backend):
    """qkv_grad=fused on the GPU, bf16, llama_1b3's attention (16 heads of 128, one per KV
    group) at s = 2048, mbs 2: the same output and fused-QKV gradient as megatron's split
    backward. The RoPE kernel and the attention kernels are the same on both sides; only
    the attention backward may accumulate in another order between calls (dq by atomics),
    which moves a bf16 value by an ulp at most: normwise relative errors within bf16's unit
    roundoff (2^-8). The control, a gradient that lost dv, is off by far more."""
    config = _config(hidden_size=2048, num_attention_heads=16, num_query_groups=16, kv_channels=128,
                     bf16=True, params_dtype=torch.bfloat16)
    results = []
    for fused in (False, True):
        module = _build(SDPACoreAttention, config, backend=backend, rope=True, fused_qkv_grad=fused)
        gen = torch.Generator().manual_seed(11)
        mixed = torch.randn(2048, 2, 16, 3 * 128, generator=gen).cuda().bfloat16().requires_grad_()
        query, key, value = torch.split(mixed, [128, 128, 128], dim=3)
        out = module(query, key, value, None)
        out.backward(torch.randn(out.shape, generator=gen).cuda().bfloat16())
        results.append((out.detach().float(), mixed.grad.float()))
    (out_ref, grad_ref), (out, grad) = results

    def relerr(x, ref):
        return ((x - ref).norm() / ref.norm()).item()

    assert relerr(out, out_ref) <= 2**-8
    assert relerr(grad, grad_ref) <= 2**-8
    lost_dv = grad.clone()
    lost_dv[..., 2 * 128:] = 0
    assert relerr(lost_dv, grad_ref) > 2**-4
