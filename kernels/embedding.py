"""The word embedding's weight gradient added straight into DDP's fp32 buffer, deterministically
(`layout.embedding_grad=fused`).

    main_grad[v] += sum over tokens t with id(t) = vocab_start + v of dy[t]    (fp32, t ascending)

Why: megatron-core's VocabParallelEmbedding backward is torch's embedding backward, a dense
[vocab / tp, hidden] bf16 gradient per micro-batch (zero fill, then the scatter), which DDP's
hook then adds whole into the fp32 `main_grad`. For llama_1b3 that is 65.5 M elements
written, read and added 16 times a step at mbs 1, although a micro-batch of 2048 tokens
touches at most 2048 rows. On an H200 (2026-12-01, benchmarks/results/
profile_diff_mbs1_mbs16_h200_2026-12-01.json) the embedding's backward kernel, its dense add
and fills took about 6 ms of the mbs 1 step. Here the rows are summed in fp32 and added
once into `main_grad`, with no bf16 rounding of the micro-batch's gradient.

How, with no host sync and no data-dependent shape (so a CUDA graph can capture it):
`_keys_kernel` gives each token the key `row * n + t` (row = id - vocab_start, or `rows` for
an id outside this TP rank's range, which sorts last and is skipped), so one sort of unique
keys orders the tokens by row and, within a row, by position: a fixed order, whatever the
sort's stability. `_accumulate_rows_kernel` runs one program per sorted token and hidden
block; the first token of each row sums that row's gradients in that order and adds the
sum into `main_grad` (no atomics: each row has one writer, so two runs agree bit for bit).

Layers: `_keys_kernel`, `_accumulate_rows_kernel`, the host `accumulate`, `EmbeddingIntoMainGrad` (the
lookup forward, megatron's masking, and the backward above), and `VocabParallelEmbedding`,
megatron's with only the lookup swapped (its reduce or reduce-scatter of the output stays
megatron's), given to GPTModel's one instance by `fuse_word_embeddings`. As kernels/wgrad.py
does, a weight whose gradient went into `main_grad` is marked `grad_added_to_main_grad`
and autograd gets a placeholder (so DDP's hook runs and adds nothing); a weight without
`main_grad` (no DDP) gets its dense gradient as usual. `reference` is the dense float64 sum.
Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.mappings import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from kernels import main_grad as main_grad_rule

BLOCK_H = 1024  # hidden columns per program: 4 KB of fp32 sum in registers


@triton.jit
def _keys_kernel(ids_ptr, keys_ptr, n_tokens, vocab_start, n_rows, BLOCK: tl.constexpr):
    """keys[t] = row(t) * n + t, row = id - vocab_start, or n_rows (sorts last) outside them."""
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = t < n_tokens
    local = tl.load(ids_ptr + t, mask=mask, other=0).to(tl.int64) - vocab_start
    row = tl.where((local >= 0) & (local < n_rows), local, n_rows)
    tl.store(keys_ptr + t, row * n_tokens + t, mask=mask)


@triton.jit
def _accumulate_rows_kernel(keys_ptr, dy_ptr, main_grad_ptr, n_tokens, n_rows, hidden,
                            seq, stride_b, stride_s, BLOCK_H: tl.constexpr):
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < hidden
    key = tl.load(keys_ptr + i)
    row = key // n_tokens
    previous = tl.load(keys_ptr + i - 1, mask=i > 0, other=-n_tokens) // n_tokens
    if (row != previous) & (row < n_rows):  # the first token of a row of this rank: its one writer
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        j = i
        current = row
        while current == row:  # this row's tokens, in position order (the sort's keys)
            t = key % n_tokens
            offs = (t // seq) * stride_b + (t % seq) * stride_s + cols
            acc += tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            j += 1
            key = tl.load(keys_ptr + j, mask=j < n_tokens, other=-n_tokens)
            current = key // n_tokens
        out = main_grad_ptr + row * hidden + cols
        total = tl.load(out, mask=mask, other=0.0).to(tl.float32) + acc
        tl.store(out, total.to(main_grad_ptr.dtype.element_ty), mask=mask)


KEYS_BLOCK = 1024  # tokens per program of the key kernel


def accumulate(dy: torch.Tensor, ids: torch.Tensor, main_grad: torch.Tensor, *, vocab_start: int) -> None:
    """main_grad[id - vocab_start] += dy[token] for every token whose id is in this rank's rows.

    dy: [b, s, hidden] (any strides along b and s, unit stride along hidden); ids: [b, s]
    integer token ids of the whole vocabulary; main_grad: [rows, hidden] (fp32 or 16-bit),
    contiguous, added to in place. Four launches: keys, the sort's two, the rows."""
    if dy.shape[:-1] != ids.shape or dy.dim() != 3 or dy.shape[-1] != main_grad.shape[-1]:
        raise ValueError(f"dy {tuple(dy.shape)} does not match ids {tuple(ids.shape)} and "
                         f"main_grad {tuple(main_grad.shape)}")
    if not main_grad.is_contiguous():
        raise ValueError("main_grad must be contiguous")
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    n_rows, hidden = main_grad.shape
    n_tokens = ids.numel()
    if not n_tokens:
        return
    ids = ids if ids.is_contiguous() else ids.contiguous()
    keys = torch.empty(n_tokens, dtype=torch.int64, device=ids.device)
    _keys_kernel[(triton.cdiv(n_tokens, KEYS_BLOCK),)](ids, keys, n_tokens, vocab_start, n_rows, BLOCK=KEYS_BLOCK)
    keys = torch.sort(keys).values  # unique keys: the order is fixed, stable or not
    grid = (n_tokens, triton.cdiv(hidden, BLOCK_H))
    _accumulate_rows_kernel[grid](keys, dy, main_grad, n_tokens, n_rows, hidden,
                                  ids.shape[1], dy.stride(0), dy.stride(1), BLOCK_H=BLOCK_H, num_warps=4)


class EmbeddingIntoMainGrad(torch.autograd.Function):
    """output[b, s] = weight[ids[b, s] - vocab_start] (zero where the id is not this rank's,
    when `masked`); backward: `accumulate` into weight.main_grad, or a dense gradient."""

    @staticmethod
    def forward(ctx, ids, weight, vocab_start: int, masked: bool):
        if masked:  # megatron's VocabParallelEmbedding at tp > 1
            local = ids - vocab_start
            outside = (local < 0) | (local >= weight.shape[0])
            output = F.embedding(local.masked_fill(outside, 0), weight)
            output.masked_fill_(outside.unsqueeze(-1), 0.0)
        else:
            output = F.embedding(ids, weight)
        ctx.save_for_backward(ids)
        ctx.weight = weight
        ctx.main_grad = getattr(weight, "main_grad", None)  # as kernels.wgrad keeps it
        ctx.vocab_start = vocab_start
        return output

    @staticmethod
    def backward(ctx, dy):
        (ids,) = ctx.saved_tensors
        weight, main_grad = ctx.weight, ctx.main_grad
        if main_grad is None:  # no DDP buffer: the usual dense gradient
            dense = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            accumulate(dy, ids, dense, vocab_start=ctx.vocab_start)
            return None, dense.to(weight.dtype), None, None
        weight.main_grad = main_grad
        accumulate(dy, ids, main_grad, vocab_start=ctx.vocab_start)
        grad_weight = None
        if hasattr(weight, "grad_added_to_main_grad"):  # set by megatron's DDP
            grad_weight = main_grad_rule.handed_over(weight)
        return None, grad_weight, None, None


class VocabParallelEmbedding(tensor_parallel.VocabParallelEmbedding):
    """megatron-core 0.16.1's VocabParallelEmbedding; the lookup's weight gradient goes into
    `main_grad` (`EmbeddingIntoMainGrad`). Deterministic either way, so megatron's
    deterministic_mode (an indexing lookup instead of F.embedding) changes nothing here."""

    def forward(self, input_):
        if not self.weight.requires_grad:  # a frozen embedding: megatron's own path
            return super().forward(input_)
        output_parallel = EmbeddingIntoMainGrad.apply(input_, self.weight, self.vocab_start_index,
                                                      self.tp_group.size() > 1)
        if self.reduce_scatter_embeddings:
            # As megatron's: [b, s, h] -> [s, b, h], then reduce-scatter along the sequence.
            output_parallel = output_parallel.transpose(0, 1).contiguous()
            return reduce_scatter_to_sequence_parallel_region(output_parallel, group=self.tp_group)
        return reduce_from_tensor_model_parallel_region(output_parallel, group=self.tp_group)


def fuse_word_embeddings(embedding: tensor_parallel.VocabParallelEmbedding) -> None:
    """GPTModel's word embedding with our backward: LanguageModelEmbedding builds it from
    megatron's class (not from the layer spec), so this one instance takes our subclass, which
    adds no state. Call after the model is built, before DDP wraps it."""
    if type(embedding) is not tensor_parallel.VocabParallelEmbedding:
        raise TypeError(f"fuse_word_embeddings expects megatron's VocabParallelEmbedding, "
                        f"got {type(embedding).__name__}")
    embedding.__class__ = VocabParallelEmbedding


def reference(dy: torch.Tensor, ids: torch.Tensor, rows: int, *, vocab_start: int) -> torch.Tensor:
    """The dense float64 gradient [rows, hidden] of this rank's rows (ids outside them dropped)."""
    local = ids.reshape(-1) - vocab_start
    keep = (local >= 0) & (local < rows)
    out = torch.zeros(rows, dy.shape[-1], dtype=torch.float64, device=dy.device)
    return out.index_add_(0, local[keep], dy.reshape(-1, dy.shape[-1])[keep].double())
