"""kernels.rope: the Triton kernel and the torch path against a float64 reference, against
megatron-core's own `apply_rotary_pos_emb`, and inside a GPTModel (TP=2 over gloo) in place
of megatron's RoPE.

On CPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py); the `cuda` test
compares the two paths on a GPU at training size.
"""

import math

import pytest
import torch

from kernels import rope
from kernels.rope import apply_rope, launch_config, rotate
from tests.gloo import run_on_gloo
from tests.kernels.slots import Slots, tap

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ("triton", "torch")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BASE = 10000.0

# Normwise relative error ||out - ref|| / ||ref|| against the exact (float64) rotation.
# Inputs are exact in their dtype and the math is fp32, so the error is the final rounding
# to the dtype (unit roundoff u; 2u for bf16 in Triton's CPU interpreter, which truncates
# fp32 -> bf16, see tests/kernels/test_rmsnorm.py) plus the angle: theta = p * inv_freq is
# formed in fp32 as megatron forms it, off by at most a few ulps of theta <= s - 1, i.e.
# about s * 2^-22 radians, which the rotation passes on as relative error.
_U = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 0.0}


def _tolerance(dtype, s, impl):
    u = _U[dtype] * (2 if dtype == torch.bfloat16 and impl == "triton" and DEVICE == "cpu" else 1)
    return u + s * 2.0**-22 + 1e-6


def _relerr(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _reference(t, base=BASE):
    """Float64, written independently of the kernel: the pairs (x[j], x[j + d/2]) as complex
    numbers x[j] + i x[j + d/2], multiplied by exp(i p base^(-2j/d)) at position p."""
    s, d = t.shape[0], t.shape[-1]
    half = d // 2
    j = torch.arange(half, dtype=torch.float64, device=t.device)
    theta = torch.arange(s, dtype=torch.float64, device=t.device)[:, None] * base ** (-2 * j / d)
    phase = torch.polar(torch.ones_like(theta), theta)[:, None, None, :]
    z = torch.complex(t[..., :half].double(), t[..., half:].double()) * phase
    return torch.cat((z.real, z.imag), dim=-1)


def _fused_qkv(s, b, ng, group, d, dtype, *, seed, device=DEVICE):
    """query [s, b, ng * group, d], key [s, b, ng, d]: views of one fused QKV buffer, as
    megatron's SelfAttention hands them over (query is a copy when ng > 1 and group > 1)."""
    gen = torch.Generator().manual_seed(seed)
    mixed = torch.randn(s, b, ng, (group + 2) * d, generator=gen).to(device, dtype)
    mixed.requires_grad_()
    return (mixed, *_split_qkv(mixed, group, d))


def _split_qkv(mixed, group, d):
    """megatron's split of [s, b, ng, (group + 2) * d] into query and key."""
    s, b, ng = mixed.shape[:3]
    query, key, _ = torch.split(mixed, [group * d, d, d], dim=3)
    return query.reshape(s, b, ng * group, d), key


# (s, b, ng, group, d): odd lengths, MHA, GQA, MQA, a head dim whose half is no power of two
SHAPES = ((1, 1, 1, 1, 16), (37, 2, 2, 2, 32), (67, 3, 1, 4, 64), (5, 2, 3, 1, 128),
          (13, 1, 2, 3, 80))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_reference_forward_and_backward(shape, dtype, impl):
    s, b, ng, group, d = shape
    mixed, query, key = _fused_qkv(s, b, ng, group, d, dtype, seed=sum(shape))
    q_rot, k_rot = apply_rope(query, key, impl=impl)
    assert q_rot.shape == query.shape and k_rot.shape == key.shape
    assert q_rot.dtype == dtype and q_rot.is_contiguous() and k_rot.is_contiguous()
    gen = torch.Generator().manual_seed(7)
    dq = torch.randn(q_rot.shape, generator=gen).to(DEVICE, dtype)
    dk = torch.randn(k_rot.shape, generator=gen).to(DEVICE, dtype)
    (mixed_grad,) = torch.autograd.grad((q_rot, k_rot), mixed, (dq, dk))

    mixed64 = mixed.detach().double().requires_grad_()
    query64, key64 = _split_qkv(mixed64, group, d)
    q64, k64 = _reference(query64), _reference(key64)
    (grad64,) = torch.autograd.grad((q64, k64), mixed64, (dq.double(), dk.double()))
    tol = _tolerance(dtype, s, impl)
    for name, out, ref in (("q", q_rot, q64), ("k", k_rot, k64), ("grad", mixed_grad, grad64)):
        err = _relerr(out, ref.detach())
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.2e} ({shape}, {dtype}, {impl})"


def _megatron_rope(t, base=BASE):
    """megatron-core's own unfused RoPE, with its frequencies kept on t's device."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                               apply_rope_fusion=False)
    rotary = RotaryEmbedding(kv_channels=t.shape[-1], rotary_percent=1.0, rotary_base=base,
                             use_cpu_initialization=True)
    # RotaryEmbedding.get_emb moves its frequencies to CUDA; these are the same ones
    # (get_freqs_non_repeated, then get_emb's non-interleaved cat) where t lives.
    rotary.inv_freq = rotary.inv_freq.to(t.device)
    freqs = rotary.get_freqs_non_repeated(t.shape[0])
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    # cp_group only matters for packed (thd) sequences; any non-None value skips the lookup
    # of megatron's parallel state, which these tests do not set up.
    return apply_rotary_pos_emb(t, emb, config, cp_group=object())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_matches_megatron_fp32_forward_and_backward(shape, impl):
    # Same fp32 angles as megatron; only cos/sin (libm vs numpy or libdevice) and the
    # rounding of x1*cos - x2*sin differ, a few fp32 ulps.
    s, b, ng, group, d = shape
    mixed, query, key = _fused_qkv(s, b, ng, group, d, torch.float32, seed=3 * s)
    outs = apply_rope(query, key, impl=impl)
    mixed_ref = mixed.detach().clone().requires_grad_()
    query_ref, key_ref = _split_qkv(mixed_ref, group, d)
    refs = (_megatron_rope(query_ref), _megatron_rope(key_ref))
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=2e-6)
    grads = [torch.cos(torch.arange(t.numel(), dtype=torch.float32)).view_as(t).to(DEVICE)
             for t in outs]
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(refs, grads)
    torch.testing.assert_close(mixed.grad, mixed_ref.grad, rtol=1e-6, atol=2e-6)


def test_strided_head_dim_and_expanded_grads():
    # d with a stride of 2 (every other element of a wider buffer); the backward gets
    # expanded gradients (stride 0 everywhere) from sum().
    torch.manual_seed(4)
    wide = torch.randn(9, 2, 3, 64, device=DEVICE)
    q = wide[..., ::2].requires_grad_()
    k = torch.randn(9, 2, 1, 32, device=DEVICE, requires_grad=True)
    q_rot, k_rot = apply_rope(q, k, impl="triton")
    (q_rot.sum() + 2 * k_rot.sum()).backward()
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    (_reference(q64).sum() + 2 * _reference(k64).sum()).backward()
    tol = _tolerance(torch.float32, 9, "triton")
    assert _relerr(q_rot, _reference(q64.detach())) <= tol
    assert _relerr(q.grad, q64.grad) <= tol
    assert _relerr(k.grad, k64.grad) <= tol


def test_several_programs_and_head_blocks():
    # Small tiles force many programs, a partial last token block and a loop over head
    # blocks with a ragged end (5 query heads in blocks of 2).
    torch.manual_seed(5)
    q = torch.randn(11, 3, 5, 16, device=DEVICE)
    k = torch.randn(11, 3, 3, 16, device=DEVICE)
    cfg = launch_config(5, 3, 16, tile_elements=16)
    assert cfg.block_hq == 2 and cfg.block_t == 1
    q_rot, k_rot = rotate(q, k, base=BASE, config=cfg)
    assert _relerr(q_rot, _reference(q)) <= _tolerance(torch.float32, 11, "triton")
    assert _relerr(k_rot, _reference(k)) <= _tolerance(torch.float32, 11, "triton")
    # the inverse rotation undoes it
    q_back, k_back = rotate(q_rot, k_rot, base=BASE, inverse=True, config=cfg)
    torch.testing.assert_close(q_back, q, rtol=0, atol=1e-5)
    torch.testing.assert_close(k_back, k, rtol=0, atol=1e-5)


def test_base_is_honoured_and_bad_inputs_are_rejected():
    torch.manual_seed(6)
    q = torch.randn(7, 1, 2, 16, device=DEVICE)
    k = torch.randn(7, 1, 1, 16, device=DEVICE)
    q_rot, _ = apply_rope(q, k, base=500.0, impl="triton")
    assert _relerr(q_rot, _reference(q, base=500.0)) <= 1e-5
    with pytest.raises(ValueError, match="even"):
        apply_rope(q[..., :15], k[..., :15])
    with pytest.raises(ValueError, match="differ in s, b or d"):
        apply_rope(q, k[:6])
    with pytest.raises(ValueError, match="impl"):
        apply_rope(q, k, impl="cuda")


def test_rotate_writes_into_strided_outputs_and_checks_them():
    """out=: the backward's dq and dk land in slices of one buffer, the same values as fresh."""
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(6, 2, 3, 8, generator=gen), torch.randn(6, 2, 1, 8, generator=gen)
    buffer = torch.zeros(6, 2, 5 * 8)
    q_out = buffer[..., :24].view(6, 2, 3, 8)
    k_out = buffer[..., 24:32].view(6, 2, 1, 8)
    rope.rotate(q, k, base=rope.DEFAULT_BASE, out=(q_out, k_out))
    q_ref, k_ref = rope.rotate(q, k, base=rope.DEFAULT_BASE)
    torch.testing.assert_close(q_out, q_ref, rtol=0, atol=0)
    torch.testing.assert_close(k_out, k_ref, rtol=0, atol=0)
    assert not buffer[..., 32:].any()  # nothing written outside the slices
    with pytest.raises(ValueError, match="unit last stride"):
        rope.rotate(q, k, base=rope.DEFAULT_BASE, out=(q_out.transpose(2, 3), k_out))


def _bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _specials(shape, dtype, seed):
    """Random values with -0.0, +-inf, NaN and a subnormal mixed in: a copy that converts
    (fp32 math, a rounding, NaN canonicalisation) would change some bits."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    flat = t.view(-1)
    flat[::7] = -0.0
    flat[1::11] = float("inf")
    flat[2::13] = float("nan")
    flat[3::17] = torch.finfo(dtype).tiny / 4
    return t.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tile", (16, rope.INTERPRETER_TILE_ELEMENTS), ids=("small", "big"))
def test_rotate_copies_v_in_the_same_launch_bit_for_bit(dtype, tile):
    """copy=(dv, dv_out): dv lands unchanged (the same bits) in a strided slice of a QKV-shaped
    buffer, dq and dk as without it; dv itself strided (head dim stride 2), odd token count,
    ragged head blocks (small tiles). Control: the same launch without copy leaves the slice
    as it was, which the bitwise check catches."""
    s, b, hq, hk, d = 7, 3, 6, 3, 16
    gen = torch.Generator().manual_seed(11)
    q, k = (torch.randn(s, b, h, d, generator=gen).to(DEVICE, dtype) for h in (hq, hk))
    dv = _specials((s, b, hk, 2 * d), dtype, 12).to(DEVICE)[..., ::2]
    cfg = launch_config(hq, hk, d, tile_elements=tile)

    def launch(copy: bool):
        buffer = torch.full((s, b, (hq + 2 * hk) * d), 7.0, dtype=dtype, device=DEVICE)
        q_out = buffer[..., :hq * d].view(s, b, hq, d)
        k_out = buffer[..., hq * d:(hq + hk) * d].view(s, b, hk, d)
        v_out = buffer[..., (hq + hk) * d:].view(s, b, hk, d)
        rotate(q, k, base=BASE, inverse=True, config=cfg, out=(q_out, k_out),
               copy=(dv, v_out) if copy else None)
        return q_out, k_out, v_out

    q_out, k_out, v_out = launch(copy=True)
    q_ref, k_ref = rotate(q, k, base=BASE, inverse=True, config=cfg)
    assert torch.equal(_bits(q_out), _bits(q_ref)) and torch.equal(_bits(k_out), _bits(k_ref))
    assert torch.equal(_bits(v_out), _bits(dv))
    skipped = launch(copy=False)[2]
    assert not torch.equal(_bits(skipped), _bits(dv)) and (skipped == 7.0).all()
    with pytest.raises(ValueError, match="copy needs"):
        rotate(q, k, base=BASE, copy=(dv, v_out.transpose(2, 3)))
    with pytest.raises(ValueError, match="copy needs"):
        rotate(q, k, base=BASE, copy=(dv[:, :, :1], v_out[:, :, :1]))


def test_fused_qkv_recognises_only_megatrons_split_views():
    mixed = torch.randn(4, 2, 2, 3 * 8, requires_grad=True)
    q, k, v = torch.split(mixed, [8, 8, 8], dim=3)
    assert rope.fused_qkv(q, k, v) is mixed
    assert rope.fused_qkv(q.detach(), k.detach(), v.detach()) is None  # recompute's inputs
    assert rope.fused_qkv(k, q, v) is None  # swapped: another geometry
    with torch.no_grad():
        assert rope.fused_qkv(q, k, v) is None  # no backward to save


def test_empty_sequence():
    q = torch.empty(0, 2, 4, 16, device=DEVICE)
    k = torch.empty(0, 2, 2, 16, device=DEVICE)
    q_rot, k_rot = apply_rope(q, k, impl="triton")
    assert q_rot.shape == q.shape and k_rot.shape == k.shape


# ------------------------------------------------------------- GPTModel, TP=2


def _gpt_rope_compare(rank, seq_len):
    """Loss and grads of three GPTModels with the same weights and tokens: megatron's RoPE
    (position_embedding_type="rope") with SDPA core attention, and launch.model's build
    (position_embedding_type="none") with SDPA and with Triton core attention rotating."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.spec_utils import ModuleSpec

    from core.config import Layout, ModelConfig
    from kernels.layer_spec import block_spec
    from kernels.megatron_attention import SDPACoreAttention
    from launch.model import ROPE_BASE, build_model, position_embedding_type, transformer_config

    model_cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96,
                            num_attention_heads=4, num_query_groups=2, vocab_size=128,
                            seq_length=seq_len)
    gen = torch.Generator().manual_seed(99)
    tokens = torch.randint(0, model_cfg.vocab_size, (2, seq_len), generator=gen)
    positions = torch.arange(seq_len).unsqueeze(0).expand(2, -1)

    def loss_and_grads(model):
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()
        return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    results, weights = {}, None
    for attention in ("sdpa", "triton"):
        layout = Layout(tp=2, attention=attention)
        assert position_embedding_type(layout) == "none"
        config = transformer_config(model_cfg, layout, device="cpu")
        model = build_model(model_cfg, layout, config)
        assert getattr(model, "rotary_pos_emb", None) is None
        assert all(layer.self_attention.core_attention.rope for layer in model.decoder.layers)
        weights = weights or model.state_dict()
        model.load_state_dict(weights)
        results[attention] = loss_and_grads(model)

    # megatron's RoPE: the same block with the rotation left to GPTModel.
    layout = Layout(tp=2, attention="sdpa")
    config = transformer_config(model_cfg, layout, device="cpu")
    spec = block_spec(config, attention="sdpa", norm=layout.norm, rope_base=ROPE_BASE)
    for layer in spec.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = ModuleSpec(
            module=SDPACoreAttention, params={"backend": "auto", "rope": False})
    model = GPTModel(config=config, transformer_layer_spec=spec,
                     vocab_size=model_cfg.vocab_size, max_sequence_length=seq_len,
                     parallel_output=True, share_embeddings_and_output_weights=False,
                     position_embedding_type="rope", rotary_base=ROPE_BASE)
    model.load_state_dict(weights)
    _keep_rotary_on_cpu(model.rotary_pos_emb)
    results["megatron_rope"] = loss_and_grads(model)
    return results


def _keep_rotary_on_cpu(rotary):
    """megatron's RotaryEmbedding.get_emb moves its frequencies to CUDA: the same embedding
    (get_freqs_non_repeated, non-interleaved cat) left on the CPU."""

    def get_emb(max_seq_len, offset=0):
        freqs = rotary.get_freqs_non_repeated(max_seq_len, offset)
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]

    rotary.get_emb = get_emb


def test_gpt_model_tp2_our_rope_matches_megatrons():
    # 4 query heads, 2 KV groups: each TP rank rotates 2 query heads and 1 KV head, the
    # query a copy and the key a strided view of the fused QKV output. Odd sequence length.
    for results in run_on_gloo(_gpt_rope_compare, world_size=2, tp=2, args=(23,)):
        ref_loss, ref_grads = results["megatron_rope"]
        assert math.isfinite(ref_loss)
        for attention in ("sdpa", "triton"):
            loss, grads = results[attention]
            assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), attention
            assert grads.keys() == ref_grads.keys()
            for name in grads:
                # fp32 both sides; SDPA vs SDPA differs only by the rotation's last-bit
                # rounding; Triton attention also by its summation order (as in
                # tests/kernels/test_megatron_attention.py).
                tol = dict(rtol=1e-5, atol=1e-6) if attention == "sdpa" else dict(rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(grads[name], ref_grads[name], **tol,
                                           msg=lambda m, n=name, a=attention: f"{a} {n}: {m}")


def test_only_our_attention_applies_rope():
    from core.choices import ATTENTION_KERNELS
    from core.config import Layout
    from kernels.layer_spec import applies_rope
    from launch.model import position_embedding_type

    for attention in ATTENTION_KERNELS:
        expected = attention != "megatron"
        assert applies_rope(attention) is expected
        assert position_embedding_type(Layout(attention=attention)) == (
            "none" if expected else "rope")
    with pytest.raises(ValueError, match="unknown attention"):
        applies_rope("flash3")


# ---------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize("mbs", (1, 4))
def test_gpu_triton_matches_torch_bf16(mbs):
    # llama_1b3 at TP=1: [2048, mbs, 16, 128] views of the fused QKV output (GQA 16/4).
    s, ng, group, d = 2048, 4, 4, 128
    mixed, query, key = _fused_qkv(s, mbs, ng, group, d, torch.bfloat16, seed=mbs,
                                   device="cuda")
    grads = {}
    outs = {}
    for impl in IMPLS:
        mixed.grad = None
        outs[impl] = apply_rope(query, key, impl=impl)
        dq = torch.cos(torch.arange(query.numel(), device="cuda")).view_as(query).bfloat16()
        dk = torch.sin(torch.arange(key.numel(), device="cuda")).view_as(key).bfloat16()
        torch.autograd.backward(outs[impl], (dq, dk))
        grads[impl] = mixed.grad.clone()
    with torch.no_grad():
        refs = (_reference(query), _reference(key))
    # Both paths compute in fp32 and round once to bf16; the angle's error at s = 2048 is
    # about 2048 * 2^-22 = 5e-4 rad, both paths sharing megatron's fp32 angles.
    tol = _tolerance(torch.bfloat16, s, "triton")
    for impl in IMPLS:
        for out, ref in zip(outs[impl], refs):
            assert _relerr(out, ref) <= tol, impl
    for a, b in zip(outs["triton"], outs["torch"]):
        assert _relerr(a, b.double()) <= 2 * 2.0**-8
    assert _relerr(grads["triton"], grads["torch"].double()) <= 2 * 2.0**-8


# ------------------------------------------------------- output target (wgrad_defer)


def _qkv_grad(mixed, dqkv_target=None):
    """The gradient reaching the fused QKV output through apply_rope_qkv (MHA views)."""
    seen = []
    mixed = tap(mixed.detach().clone().requires_grad_(), seen)
    query, key, value = torch.split(mixed, [mixed.shape[-1] // 3] * 3, dim=3)
    outs = rope.apply_rope_qkv(query, key, value, dqkv_target=dqkv_target)
    gen = torch.Generator().manual_seed(3)
    torch.autograd.backward(outs, [torch.randn(o.shape, generator=gen).to(o) for o in outs])
    return seen[0]


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_fused_qkv_gradient_goes_into_a_target(dtype):
    """qkv_grad=fused with layout.wgrad_defer: dq, dk (rotated back) and dv land in the slot
    offered (the QKV linear's dY; a view inside a larger buffer), bit-identical to the fresh
    buffer of the default path, which lies outside it (control)."""
    mixed = torch.randn(7, 2, 3, 3 * 16, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    plain = _qkv_grad(mixed)
    slots = Slots(mixed.shape, dtype, DEVICE)
    ours = _qkv_grad(mixed, slots.target)
    assert torch.equal(ours, plain) and slots.holds(ours) and not slots.holds(plain)
    assert slots.asked == [(tuple(mixed.shape), dtype)] and slots.untouched_elsewhere()
    wrong = Slots((7, 2, 3 * 3 * 16), dtype, DEVICE)  # the linear's shape before megatron's view
    assert torch.equal(_qkv_grad(mixed, wrong.target), plain) and wrong.buffer.isnan().all()


@pytest.mark.cuda
def test_gpu_fused_qkv_gradient_into_a_target_at_training_size():
    """llama_1b3 (MHA, 16 heads of 128) at mbs 1 in bf16: the same bits with and without a slot."""
    mixed = torch.randn(2048, 1, 16, 3 * 128, device="cuda").to(torch.bfloat16)
    plain = _qkv_grad(mixed)
    slots = Slots(mixed.shape, torch.bfloat16, "cuda")
    ours = _qkv_grad(mixed, slots.target)
    assert torch.equal(ours, plain) and slots.holds(ours) and slots.untouched_elsewhere()
