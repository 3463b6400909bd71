"""Synthetic token batches that do not depend on the layout.

Trials measure speed, not learning, but losses must be comparable across
layouts (loss parity): sequence j of global step t depends only on
(seed, t, j), so any split of the global batch over DP ranks and micro-batches
trains on the same tokens.
"""

from __future__ import annotations

import torch


def _sequence(seed: int, step: int, index: int, seq_length: int, vocab_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 100_003 + index)
    return torch.randint(0, vocab_size, (seq_length + 1,), generator=gen)


def microbatch(*, seed: int, step: int, first: int, mbs: int, seq_length: int, vocab_size: int,
               device: str) -> dict:
    """Sequences first..first+mbs-1 of global step `step`: tokens, labels, positions [mbs, seq]."""
    rows = torch.stack([_sequence(seed, step, first + i, seq_length, vocab_size) for i in range(mbs)])
    batch = {
        "tokens": rows[:, :-1].contiguous(),
        "labels": rows[:, 1:].contiguous(),
        "position_ids": torch.arange(seq_length).unsqueeze(0).expand(mbs, -1).contiguous(),
    }
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def first_sequence(*, dp_rank: int, num_microbatches: int, mbs: int, index: int) -> int:
    """Global index of the first sequence of local micro-batch `index` on a DP rank."""
    return (dp_rank * num_microbatches + index) * mbs
