"""attention=flash_attn: flash-attn-4 behind our core-attention adapter.

On CPU: the sweeper records it as skipped where flash-attn-4 is missing (never faked),
the package probe finds it without importing it, and the layer spec picks the adapter.
The adapter's own autograd Function (kernels.attention_fa4.FA4Function: the output written
in place, no copy) and its fallback run against `FakeFA4`, a torch stand-in for the
installed interface (installed by the test, the sweeper never sees it).
On a GPU with flash-attn-4 (marked cuda): the adapter on megatron's fused-QKV views
against a float64 reference, and inside a GPTModel against SDPA-cuDNN.
"""

import dataclasses
import math
import sys

import pytest
import torch

from core import choices
from core.config import ClusterConfig, Layout, ModelConfig
from kernels import attention_fa4
from sweeper import validity

MODEL = ModelConfig(name="m", num_layers=2, hidden_size=256, ffn_hidden_size=688,
                    num_attention_heads=4, num_query_groups=2, vocab_size=1000, seq_length=256)
GPU = ClusterConfig(name="gpu", device="cuda", gpus_per_node=1)
CPU = ClusterConfig()


def test_missing_flash_attn_4_is_skipped_with_its_reason(monkeypatch):
    layout = Layout(attention="flash_attn", mbs=1, gbs=1)
    monkeypatch.setattr(choices, "fa4_installed", lambda: False)
    assert validity.unsupported_reason(GPU, layout) == "flash-attn-4 not installed"
    assert validity.unsupported_reason(CPU, layout) == "flash-attn-4 not installed"
    monkeypatch.setattr(choices, "fa4_installed", lambda: True)
    assert validity.unsupported_reason(GPU, layout) is None
    assert "attention=flash_attn" in validity.unsupported_reason(CPU, layout)  # needs CUDA
    # other attention kernels do not depend on it
    monkeypatch.setattr(choices, "fa4_installed", lambda: False)
    assert validity.unsupported_reason(GPU, dataclasses.replace(layout, attention="triton")) is None


def test_head_dims_flash_attn_4_cannot_take_are_invalid():
    layout = Layout(attention="flash_attn", mbs=1, gbs=2)
    assert validity.invalid_reason(MODEL, layout, 2) is None  # head_dim 64
    odd = dataclasses.replace(MODEL, hidden_size=4 * 20)  # head_dim 20: not a multiple of 8
    assert "head_dim 8..256 in steps of 8" in validity.invalid_reason(odd, layout, 2)
    wide = dataclasses.replace(MODEL, hidden_size=4 * 512, num_attention_heads=4)
    assert "got 512" in validity.invalid_reason(wide, layout, 2)


def test_installed_finds_the_package_without_importing_it(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    package = tmp_path / "flash_attn" / "cute"
    package.mkdir(parents=True)
    assert not attention_fa4.installed()  # a namespace folder without the interface
    # an interface that would fail if imported: installed() must not run it
    (package / "interface.py").write_text("raise RuntimeError('imported')\n")
    assert attention_fa4.installed()
    assert "flash_attn.cute" not in sys.modules


@pytest.mark.skipif(attention_fa4.installed(), reason="flash-attn-4 is installed here")
def test_building_the_adapter_without_flash_attn_4_fails_in_one_line():
    from megatron.core.transformer.enums import AttnMaskType

    from kernels.layer_spec import applies_rope, core_attention_spec
    from kernels.megatron_attention import FlashAttn4CoreAttention
    from tests.kernels.test_megatron_attention import _config

    spec = core_attention_spec("flash_attn", rope_base=10000.0)
    assert spec.module is FlashAttn4CoreAttention and spec.params["rope"] and applies_rope(
        "flash_attn")
    with pytest.raises(ImportError, match="^flash-attn-4 not installed") as err:
        spec.module(config=_config(), layer_number=1, attn_mask_type=AttnMaskType.causal,
                    attention_type="self", **spec.params)
    assert "\n" not in str(err.value)


# ------------------------------------------------- FA4Function on CPU, against a fake


def _attention(q, k, v, softmax_scale, causal):
    """[b, s, h, d] attention in fp32 torch, GQA by repeated KV heads; (out, lse [b, h, s])."""
    group = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) * softmax_scale
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2), scores.logsumexp(-1)


class FakeFA4:
    """flash_attn.cute and its interface, in torch: `flash_attn_func` (autograd through
    torch, a contiguous output) and `_flash_attn_fwd` / `_flash_attn_bwd` with b36's keywords,
    writing into `out=` as the kernel does. `outs` records every `out` the forward got;
    `without` drops keywords from `_flash_attn_fwd` (another release)."""

    def __init__(self, without=()):
        import types

        self.outs = []
        self.package = types.ModuleType("flash_attn")
        self.cute = types.ModuleType("flash_attn.cute")
        self.interface = types.ModuleType("flash_attn.cute.interface")
        self.package.cute, self.cute.interface = self.cute, self.interface

        def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
            out, lse = _attention(q, k, v, softmax_scale, causal)
            return out.to(q.dtype).contiguous(), lse

        def fwd(q, k, v, softmax_scale=None, causal=False, out=None, return_lse=False):
            self.outs.append(out)
            o, lse = _attention(q, k, v, softmax_scale, causal)
            out.copy_(o)
            return out, lse, None, None, None

        def bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0, dq=None,
                dk=None, dv=None):
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                o = flash_attn_func(*leaves, softmax_scale=softmax_scale, causal=causal)[0]
                return torch.autograd.grad(o, leaves, dout)

        if without:
            code = "def fwd(q, k, v, softmax_scale=None, causal=False, {}): pass".format(
                ", ".join(f"{n}=None" for n in ("out", "return_lse") if n not in without) or "x=None")
            namespace = {}
            exec(code, namespace)  # a signature without the dropped keywords
            fwd = namespace["fwd"]
        self.cute.flash_attn_func = flash_attn_func
        self.interface._flash_attn_fwd, self.interface._flash_attn_bwd = fwd, bwd

    def _modules(self):
        return (("flash_attn", self.package), ("flash_attn.cute", self.cute),
                ("flash_attn.cute.interface", self.interface))

    def install(self, monkeypatch):
        for name, module in self._modules():
            monkeypatch.setitem(sys.modules, name, module)
        attention_fa4.direct_kernels.cache_clear()
        monkeypatch.setattr(attention_fa4, "installed", lambda: True)
        return self

    def install_in_process(self):
        """For a spawned worker (tests/gloo.py), which exits after the test: no undo."""
        sys.modules.update(self._modules())
        attention_fa4.direct_kernels.cache_clear()
        return self


@pytest.fixture(autouse=True)
def _fresh_probe():
    attention_fa4.direct_kernels.cache_clear()
    yield
    attention_fa4.direct_kernels.cache_clear()


def _qkv(s=9, b=2, ng=2, group=2, d=16, seed=3):
    gen = torch.Generator().manual_seed(seed)
    mixed = torch.randn(s, b, ng, (group + 2) * d, generator=gen, requires_grad=True)
    query, key, value = torch.split(mixed, [group * d, d, d], dim=3)
    return mixed, query.reshape(s, b, ng * group, d), key, value


def _run(attend, causal=True, target=None, seed=3):
    mixed, query, key, value = _qkv(seed=seed)
    out = attend(query, key, value, softmax_scale=0.25, causal=causal, target=target)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
    return out, mixed.grad


@pytest.mark.parametrize("causal", [True, False])
def test_fa4_function_writes_into_the_sequence_first_buffer(monkeypatch, causal):
    """GQA 4/2: the kernel's `out` is a [b, s, h, d] view of the very [s, b, h * d] tensor
    returned (no copy after it), same values and gradients as flash_attn_func's path, which
    returns a copy (the control: its output is not the kernel's memory)."""
    fake = FakeFA4().install(monkeypatch)
    attend = attention_fa4.SeqFirstAttention()
    assert attend.writes_in_place
    out, grad = _run(attend, causal)
    (kernel_out,) = fake.outs
    assert out.shape == (9, 2, 4 * 16) and out.is_contiguous()
    assert kernel_out.data_ptr() == out.data_ptr() and kernel_out.shape == (2, 9, 4, 16)
    assert kernel_out.stride() == (4 * 16, 2 * 4 * 16, 16, 1)
    attend.kernels = None  # flash_attn_func and the copy
    ref_out, ref_grad = _run(attend, causal)
    assert len(fake.outs) == 1 and ref_out.data_ptr() != kernel_out.data_ptr()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(_run(attend, not causal)[0], ref_out, atol=1e-3)  # the mask matters


def test_fa4_function_writes_into_a_target(monkeypatch):
    """out_target (wgrad_defer=step): the output lands in the slot offered, same values; a
    target of another shape is ignored (fresh buffer, slot untouched)."""
    from tests.kernels.slots import Slots

    fake = FakeFA4().install(monkeypatch)
    attend = attention_fa4.SeqFirstAttention()
    plain, plain_grad = _run(attend)
    slots = Slots((9, 2, 64), torch.float32, "cpu")
    out, grad = _run(attend, target=slots.target)
    assert slots.holds(out) and fake.outs[-1].data_ptr() == slots.slot.data_ptr()
    assert slots.asked == [((9, 2, 64), torch.float32)] and slots.untouched_elsewhere()
    assert torch.equal(out, plain) and torch.equal(grad, plain_grad)
    wrong = Slots((9, 2, 4, 16), torch.float32, "cpu")
    out, _ = _run(attend, target=wrong.target)
    assert torch.equal(out, plain) and wrong.buffer.isnan().all()


@pytest.mark.parametrize("without", [("out",), ("return_lse",), ("interface",)])
def test_an_interface_without_the_direct_functions_falls_back_in_one_line(monkeypatch, capsys, without):
    fake = FakeFA4(without=() if without == ("interface",) else without).install(monkeypatch)
    if without == ("interface",):
        monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", None)  # import fails
        monkeypatch.delattr(fake.cute, "interface")
    attend = attention_fa4.SeqFirstAttention()
    assert not attend.writes_in_place
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flash-attn-4: flash_attn.cute.interface lacks")
    assert without[0] in lines[0] or without == ("interface",)
    attention_fa4.SeqFirstAttention()
    assert capsys.readouterr().err == ""  # once a process
    out, grad = _run(attend)
    assert fake.outs == []  # flash_attn_func ran
    ref_out, ref_grad = _run(lambda q, k, v, **kw: _seq_first_reference(q, k, v, **kw))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)


def _seq_first_reference(query, key, value, *, softmax_scale, causal, target=None):
    s, b, heads, d = query.shape
    out, _ = _attention(*(t.transpose(0, 1) for t in (query, key, value)), softmax_scale, causal)
    return out.transpose(0, 1).reshape(s, b, heads * d)


def test_the_adapter_uses_fa4_function_and_matches_sdpa(monkeypatch):
    """FlashAttn4CoreAttention with RoPE on megatron's views (fake kernels) against SDPA math."""
    from megatron.core.transformer.enums import AttnMaskType

    from kernels.megatron_attention import FlashAttn4CoreAttention, SDPACoreAttention
    from tests.kernels.test_megatron_attention import _config

    fake = FakeFA4().install(monkeypatch)
    results = []
    for cls, params in ((FlashAttn4CoreAttention, {}), (SDPACoreAttention, {"backend": "math"})):
        module = cls(config=_config(), layer_number=1, attn_mask_type=AttnMaskType.causal,
                     attention_type="self", rope=True, **params)
        mixed, query, key, value = _qkv(s=11, d=16)
        out = module(query, key, value, None)
        out.backward(torch.sin(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
        results.append((out.detach(), mixed.grad))
    assert len(fake.outs) == 1 and fake.outs[0].data_ptr() == results[0][0].data_ptr()
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- GPU

needs_fa4 = pytest.mark.skipif(not attention_fa4.installed(), reason="flash-attn-4 not installed")


@pytest.mark.cuda
@needs_fa4
@pytest.mark.parametrize("group, head_dim", [(1, 128), (4, 64)])
def test_gpu_adapter_on_fused_qkv_views_matches_float64(group, head_dim):
    from megatron.core.transformer.enums import AttnMaskType

    from kernels.attention import attention_reference
    from kernels.megatron_attention import FlashAttn4CoreAttention
    from tests.kernels.test_megatron_attention import _config

    s, b, ng = 333, 2, 2
    heads = ng * group
    config = _config(hidden_size=heads * head_dim, num_attention_heads=heads, num_query_groups=ng,
                     kv_channels=head_dim, bf16=True, params_dtype=torch.bfloat16)
    module = FlashAttn4CoreAttention(config=config, layer_number=1,
                                     attn_mask_type=AttnMaskType.causal, attention_type="self")
    gen = torch.Generator(device="cuda").manual_seed(7)
    mixed = torch.randn(s, b, ng, (group + 2) * head_dim, device="cuda", generator=gen)
    mixed = mixed.to(torch.bfloat16).requires_grad_()
    query, key, value = torch.split(mixed, [group * head_dim, head_dim, head_dim], dim=3)
    query = query.reshape(s, b, heads, head_dim)
    out = module(query, key, value, None)
    assert out.shape == (s, b, heads * head_dim)
    grad = torch.randn(out.shape, device="cuda", generator=gen).to(out.dtype)
    out.backward(grad)

    m64 = mixed.detach().double().requires_grad_()
    q64, k64, v64 = torch.split(m64, [group * head_dim, head_dim, head_dim], dim=3)
    ref = attention_reference(q64.reshape(s, b, heads, head_dim).transpose(0, 1),
                              k64.transpose(0, 1), v64.transpose(0, 1), causal=True,
                              softmax_scale=1 / math.sqrt(head_dim))
    ref = ref.transpose(0, 1).reshape(s, b, heads * head_dim)
    ref.backward(grad.double())

    def rel(x, r):
        return ((x.double() - r).norm() / r.norm()).item()

    # bf16 inputs and output: ~3e-3 relative rounding each; 2e-2 leaves room for the
    # fp32 accumulation order. A kernel ignoring the mask or the KV group is off by > 0.3.
    assert rel(out, ref.detach()) < 2e-2
    assert rel(mixed.grad, m64.grad) < 2e-2


def _gpu_gpt_compare(rank):
    from tests.kernels.test_megatron_attention import gpu_compare

    # GQA 4/2 at head_dim 128; cuDNN takes GQA by repeated KV heads, flash-attn-4 directly.
    kwargs = dict(bf16=True, params_dtype=torch.bfloat16, hidden_size=512, num_attention_heads=4,
                  num_query_groups=2, kv_channels=128)
    return gpu_compare(rank, "flash_attn", "cudnn", kwargs, 512)


@pytest.mark.cuda
@needs_fa4
def test_gpu_gpt_model_flash_attn_matches_sdpa_cudnn():
    from tests.gloo import run_on_gloo

    fa4_loss, sdpa_loss, errors = run_on_gloo(_gpu_gpt_compare, world_size=1, tp=1)[0]
    # bf16 end to end, both kernels correct: they differ by bf16 rounding only.
    assert abs(fa4_loss - sdpa_loss) <= 2e-2 * abs(sdpa_loss)
    assert max(errors.values()) < 5e-2, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


@pytest.mark.cuda
@needs_fa4
@pytest.mark.parametrize("group", [1, 4])
def test_gpu_fa4_function_matches_flash_attn_func_and_sdpa(group, causal=True):
    """Causal (each compile of flash-attn-4's kernels costs device seconds; the fake test above
    covers both masks), bf16, head dim 128, s = 1024, GQA 4 query heads per KV head or MHA, on megatron's
    fused-QKV views. FA4Function runs the very kernels flash_attn_func runs, only its output
    lies in [s, b, h * d] memory: the same output bits. Gradients: the backward accumulates
    dq (and GQA's dk, dv) with atomics in fp32, so calls differ by summation order: normwise
    within bf16's unit roundoff 2^-8. Against fp32 SDPA (math, on the same bf16 inputs): the
    bf16 rounding of the output and of each gradient, within 2e-2 as the float64 test above.
    The kernel's out is the tensor returned (data_ptr), flash_attn_func's is not (a copy)."""
    import torch.nn.functional as F

    s, b, ng, d = 1024, 2, 4 if group == 1 else 2, 128
    heads = ng * group
    gen = torch.Generator(device="cuda").manual_seed(5 + group)
    mixed = torch.randn(s, b, ng, (group + 2) * d, device="cuda", generator=gen).bfloat16()
    grad = torch.randn(s, b, heads * d, device="cuda", generator=gen).bfloat16()
    attend = attention_fa4.SeqFirstAttention()
    assert attend.writes_in_place, "flash-attn-4 4.0.0b36 takes out= (direct_kernels)"
    fwd, bwd = attend.kernels
    seen = []

    def recording_fwd(*args, **kwargs):
        seen.append(kwargs["out"])
        return fwd(*args, **kwargs)

    def run(kernels, sdpa=False):
        m = mixed.detach().clone().requires_grad_()
        query, key, value = torch.split(m, [group * d, d, d], dim=3)
        query = query.reshape(s, b, heads, d)
        if sdpa:
            q, k, v = (t.permute(1, 2, 0, 3).float() for t in (query, key, value))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=d ** -0.5,
                                               enable_gqa=group > 1)
            out = o.permute(2, 0, 1, 3).reshape(s, b, heads * d)
        else:
            attend.kernels = kernels
            out = attend(query, key, value, softmax_scale=d ** -0.5, causal=causal)
        out.backward(grad.to(out.dtype))
        return out.detach(), m.grad

    def rel(x, r):
        return ((x.double() - r.double()).norm() / r.double().norm()).item()

    out, dqkv = run((recording_fwd, bwd))
    assert len(seen) == 1 and seen[0].data_ptr() == out.data_ptr() and out.is_contiguous()
    ref_out, ref_dqkv = run(None)  # flash_attn_func, then the copy
    assert ref_out.data_ptr() != seen[0].data_ptr()
    assert torch.equal(out, ref_out)
    assert rel(dqkv, ref_dqkv) <= 2 ** -8
    sdpa_out, sdpa_dqkv = run(None, sdpa=True)
    assert rel(out, sdpa_out) < 2e-2 and rel(dqkv, sdpa_dqkv) < 2e-2
    lost_dv = dqkv.clone()
    lost_dv[..., (group + 1) * d:] = 0  # control: a gradient without dv is far off
    assert rel(lost_dv, ref_dqkv) > 2 ** -4
