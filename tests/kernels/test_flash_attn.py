"""attention=flash_attn: flash-attn-4 behind our core-attention adapter.

On CPU: the sweeper records it as skipped where flash-attn-4 is missing (never faked),
the package probe finds it without importing it, and the layer spec picks the adapter.
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
