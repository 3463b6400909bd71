"""FLOPs per token and MFU, against numbers worked out by hand."""

import pytest

from core.config import ModelConfig
from core.flops import flops_per_token, megatron_flops_per_token, mfu, palm_flops_per_token

# L=2, h=8, f=16, a=2 heads, g=1 KV group (head_dim 4), V=10, s=4.
SMALL = ModelConfig(name="s", num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2,
                    num_query_groups=1, vocab_size=10, seq_length=4)


def test_parameter_count_by_hand():
    # per layer: q 64 + k,v 2*8*4=64 + o 64 = 192; mlp 3*8*16 = 384; norms 16 -> 592
    # 2 layers 1184 + embedding 80 + output 80 + final norm 8 = 1352
    assert SMALL.num_params() == 1352


def test_palm_by_hand():
    # N excludes the input embedding: 1352 - 80 = 1272; 6N = 7632; 12*L*H*T = 12*2*8*4 = 768
    assert palm_flops_per_token(SMALL) == 7632 + 768


def test_megatron_by_hand():
    # 12*L*h^2 = 1536; attention (1 + 1/2 + 4/8/2) * 1 = 1.75; mlp 1.5*2 = 3; logits 10/(2*2*8) = 0.3125
    assert megatron_flops_per_token(SMALL) == pytest.approx(1536 * (1.75 + 3 + 0.3125))


def test_megatron_matches_the_anchor_mfu():
    # shared/anchors: 1.36B Llama-like, gbs 16 x 2048 tokens in 0.75 s on one H100 -> 36.9% (Megatron).
    model = ModelConfig(name="1b3", num_layers=24, hidden_size=2048, ffn_hidden_size=5632,
                        num_attention_heads=16, num_query_groups=16, vocab_size=32000, seq_length=2048)
    value = mfu(model, 16 * 2048 / 0.75, 989.4, 1)["megatron"]
    assert value == pytest.approx(0.371, abs=0.002)


def test_palm_counts_full_attention_so_it_exceeds_megatron_at_long_sequences():
    long = ModelConfig(name="l", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                       num_query_groups=4, vocab_size=10, seq_length=4096)
    assert palm_flops_per_token(long) > megatron_flops_per_token(long)


def test_mfu_scales_with_devices_and_rejects_unknown_convention():
    one = mfu(SMALL, 1e9, 1.0, 1)
    two = mfu(SMALL, 1e9, 1.0, 2)
    assert two["palm"] == pytest.approx(one["palm"] / 2)
    with pytest.raises(ValueError):
        flops_per_token(SMALL, "chinchilla")
