"""Rotary embeddings that stay on the CPU.

megatron-core 0.16's RotaryEmbedding moves its frequencies to the current CUDA
device on first use; the CPU trial path keeps them where they are. The math is
the same as megatron's non-interleaved RoPE (tested against it in
tests/launch/test_cpu_trial.py).
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding


class CPURotaryEmbedding(RotaryEmbedding):
    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if self.rotary_interleaved:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]


def keep_rope_on_cpu(model) -> None:
    """Switch a CPU-built GPTModel's rotary embedding to the CPU-resident variant (same state)."""
    rope = getattr(model, "rotary_pos_emb", None)
    if isinstance(rope, RotaryEmbedding):
        rope.__class__ = CPURotaryEmbedding
