"""kernels.embedding: the word embedding's gradient rows added straight into DDP's fp32 buffer.

CPU (TRITON_INTERPRET=1): `accumulate` over two micro-batches with repeated tokens and ids
outside the rank's rows against the float64 dense sum; bit for bit the same over two runs;
a shifted row index (the negative control) fails the same comparison.

gloo (tp 2, world 2, fp32, megatron DDP, two micro-batches of a 40-token vocabulary, so
tokens repeat and half of them belong to the other rank): a GPTModel with
`embedding_grad=fused` ends with every parameter's `main_grad` equal to the stock model's,
with and without sequence parallelism (1e-5 relative: both fp32, only the order of the
sums differs). Also there: DDP does not add the placeholder gradient (a placeholder of ones
leaves the result unchanged), the shifted-row control fails, and grad_buffer=overwrite
still zeroes the embedding's buffer.

CUDA: llama_1b3's shape (vocab 32000, hidden 2048, 2048 tokens, bf16 gradient) against
megatron's path (a dense bf16 gradient added into fp32), eager and in a CUDA graph.
"""

from unittest import mock

import pytest
import torch

from core.config import Layout, ModelConfig
from kernels import embedding
from kernels import main_grad as main_grad_rule
from tests.gloo import run_on_gloo

# fp32 sums of at most a few dozen terms in another order than float64's: a few ulps.
FP32_TOL = dict(rtol=1e-5, atol=1e-6)


def _case(seed=0, b=2, s=12, hidden=40, vocab=30):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=gen)
    ids[0, :5] = 7  # one row many times, inside one sequence and across both
    ids[1, -2:] = 7
    dy = torch.randn(b, s, hidden, generator=gen)
    return ids, dy


@pytest.mark.parametrize("vocab_start, rows", [(0, 30), (15, 15), (3, 10)])  # tp 1; a rank's half; a slice
def test_accumulate_adds_each_tokens_row_over_two_microbatches(vocab_start, rows):
    gen = torch.Generator().manual_seed(1)
    main = torch.randn(rows, 40, generator=gen)
    expected = main.double().clone()
    for seed in (0, 1):
        ids, dy = _case(seed)
        embedding.accumulate(dy, ids, main, vocab_start=vocab_start)
        expected += embedding.reference(dy, ids, rows, vocab_start=vocab_start)
    torch.testing.assert_close(main.double(), expected, **FP32_TOL)
    # Negative control: one row off (the id's offset misread) fails the same comparison.
    shifted = torch.randn(rows, 40, generator=torch.Generator().manual_seed(1))
    for seed in (0, 1):
        ids, dy = _case(seed)
        embedding.accumulate(dy, ids, shifted, vocab_start=vocab_start - 1)
    assert not torch.allclose(shifted.double(), expected, **FP32_TOL)


def test_accumulate_is_bitwise_deterministic_and_takes_a_transposed_gradient():
    ids, _ = _case()
    # [b, s, h] as the backward of megatron's transpose(0, 1) hands it over: not contiguous.
    dy = torch.randn(ids.shape[1], ids.shape[0], 40).transpose(0, 1)
    runs = []
    for _ in range(2):
        main = torch.zeros(30, 40)
        embedding.accumulate(dy, ids, main, vocab_start=0)
        runs.append(main)
    assert torch.equal(runs[0], runs[1])
    torch.testing.assert_close(runs[0].double(), embedding.reference(dy, ids, 30, vocab_start=0), **FP32_TOL)


def test_accumulate_refuses_mismatched_shapes():
    ids, dy = _case()
    with pytest.raises(ValueError, match="does not match"):
        embedding.accumulate(dy[:, :-1], ids, torch.zeros(30, 40), vocab_start=0)


def test_the_function_returns_a_dense_gradient_without_ddp_and_a_placeholder_with_it():
    ids, dy = _case()
    weight = torch.nn.Parameter(torch.randn(30, 40))
    out = embedding.EmbeddingIntoMainGrad.apply(ids, weight, 0, False)
    torch.testing.assert_close(out, torch.nn.functional.embedding(ids, weight.detach()), rtol=0, atol=0)
    out.backward(dy)  # no main_grad: the usual gradient
    torch.testing.assert_close(weight.grad.double(), embedding.reference(dy, ids, 30, vocab_start=0), **FP32_TOL)
    # As megatron's DDP sets them: the gradient goes into main_grad, autograd gets a placeholder.
    weight.grad, weight.main_grad, weight.grad_added_to_main_grad = None, torch.zeros(30, 40), False
    embedding.EmbeddingIntoMainGrad.apply(ids, weight, 0, False).backward(dy)
    assert weight.grad_added_to_main_grad
    torch.testing.assert_close(weight.main_grad.double(), embedding.reference(dy, ids, 30, vocab_start=0),
                               **FP32_TOL)


def test_masked_lookup_is_megatrons():
    """At tp > 1 an id outside the rank's rows looks up zeros, as megatron's does."""
    ids, _ = _case()
    weight = torch.randn(15, 40)
    out = embedding.EmbeddingIntoMainGrad.apply(ids, weight, 15, True)
    inside = ids >= 15
    torch.testing.assert_close(out[inside], weight[ids[inside] - 15], rtol=0, atol=0)
    assert (out[~inside] == 0).all() and (~inside).any()


def test_only_megatrons_own_embedding_takes_the_subclass():
    with pytest.raises(TypeError, match="VocabParallelEmbedding"):
        embedding.fuse_word_embeddings(torch.nn.Embedding(4, 2))


# -- inside a GPTModel, tp 2 over gloo --------------------------------------------------

TINY = dict(name="tiny", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
            num_query_groups=2, vocab_size=40, seq_length=16)
WORD = "module.embedding.word_embeddings.weight"  # as DDP names it


def _main_grads(layout, *, wgrad_fusion=False, zero_after=False):
    from launch import cpu_trial
    from launch.data import microbatch

    model_cfg = ModelConfig(**TINY)
    torch.manual_seed(7)
    trainer = cpu_trial.build(model_cfg, layout, seed=7, lr=1e-3, wgrad_fusion=wgrad_fusion)
    batches = [microbatch(seed=7, step=0, first=2 * i, mbs=2, seq_length=model_cfg.seq_length,
                          vocab_size=model_cfg.vocab_size, device="cpu") for i in range(2)]
    cpu_trial.forward_backward(trainer, batches, seq_length=model_cfg.seq_length, mbs=2)
    chunk = trainer.model[0]
    kind = type(chunk.module.embedding.word_embeddings).__module__
    grads = {name: p.main_grad.numpy().copy() for name, p in chunk.named_parameters()}
    if zero_after:  # grad_buffer=overwrite's zeroing: the embedding is not a linear it skips
        from kernels import wgrad

        wgrad.zero_grad_buffer_except_overwritten(chunk)
        word = chunk.module.embedding.word_embeddings.weight
        zeroed = not any(w is word for w in wgrad.overwritten_weights(chunk)) and not word.main_grad.any()
        return grads, kind, zeroed
    return grads, kind


def _mismatched(a, b):
    import numpy as np

    return sorted(n for n in a if not np.allclose(a[n], b[n], **FP32_TOL))


def _compare(rank):
    out = {}
    for name, sp in (("tp2", False), ("tp2_sp", True)):
        axes = dict(tp=2, mbs=2, gbs=4, attention="sdpa", norm="torch", sequence_parallel=sp)
        stock, stock_kind = _main_grads(Layout(**axes))
        fused, fused_kind, zeroed = _main_grads(Layout(embedding_grad="fused", **axes),
                                                wgrad_fusion=True, zero_after=True)
        out[name] = {"mismatched": _mismatched(stock, fused), "kinds": [stock_kind, fused_kind],
                     "zeroed": zeroed, "nonzero": bool(abs(fused[WORD]).sum() > 0)}
        if sp:
            continue
        fused_layout = Layout(embedding_grad="fused", **axes)
        # DDP must not add what autograd got: a placeholder of ones would show up in main_grad.
        with mock.patch.object(main_grad_rule, "placeholder", torch.ones_like):
            out["ones_placeholder"] = _mismatched(stock, _main_grads(fused_layout)[0])
        accumulate = embedding.accumulate

        def shifted(dy, ids, main_grad, *, vocab_start):  # negative control: one row off
            accumulate(dy, ids, main_grad, vocab_start=vocab_start - 1)

        with mock.patch.object(embedding, "accumulate", shifted):
            out["shifted_row"] = _mismatched(stock, _main_grads(fused_layout)[0])
    return out


@pytest.fixture(scope="module")
def compared():
    return run_on_gloo(_compare, world_size=2, tp=2)


@pytest.mark.parametrize("case", ["tp2", "tp2_sp"])
def test_fused_embedding_gives_the_stock_models_gradients(compared, case):
    for rank in compared:
        row = rank[case]
        assert row["mismatched"] == [] and row["nonzero"], row
        assert row["kinds"] == ["megatron.core.tensor_parallel.layers", "kernels.embedding"]
        assert row["zeroed"]  # grad_buffer=overwrite's zeroing still clears the embedding's buffer


def test_ddp_does_not_add_the_placeholder_and_a_shifted_row_is_caught(compared):
    for rank in compared:
        assert rank["ones_placeholder"] == []
        assert rank["shifted_row"] == [WORD]


# -- on a GPU ---------------------------------------------------------------------------

@pytest.mark.cuda
def test_gpu_fused_embedding_matches_megatrons_at_llama_shape():
    """vocab 32000, hidden 2048, 2048 tokens (one mbs-1 micro-batch), bf16 gradient, fp32
    main_grad. Megatron's path rounds the dense gradient to bf16 before DDP adds it (2^-8
    relative per row sum); ours sums in fp32. Both against float64, then against each other,
    eager and replayed in a CUDA graph (no host sync, fixed shapes), twice bit for bit."""
    vocab, hidden, tokens = 32000, 2048, 2048
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, vocab, (1, tokens), device="cuda", generator=gen)
    ids[0, :64] = 11  # a frequent token
    dy = torch.randn(1, tokens, hidden, device="cuda", generator=gen).to(torch.bfloat16)
    start = torch.randn(vocab, hidden, device="cuda", generator=gen)
    exact = start.double() + embedding.reference(dy, ids, vocab, vocab_start=0)
    weight = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.nn.functional.embedding(ids, weight).backward(dy)
    megatron = start + weight.grad.float()
    scale = exact.abs().max()
    assert (megatron.double() - exact).abs().max() <= 2.0**-8 * scale
    fused = start.clone()
    embedding.accumulate(dy, ids, fused, vocab_start=0)
    assert (fused.double() - exact).abs().max() <= 1e-5 * scale
    assert (fused - megatron).abs().max() <= 2.0**-8 * scale
    graphed = start.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        embedding.accumulate(dy, ids, start.clone(), vocab_start=0)  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            embedding.accumulate(dy, ids, graphed, vocab_start=0)
    torch.cuda.current_stream().wait_stream(stream)
    graphed.copy_(start)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graphed, fused)
    # Negative control: a row off fails the comparison that passed.
    shifted = start.clone()
    embedding.accumulate(dy, ids, shifted, vocab_start=1)
    assert (shifted.double() - exact).abs().max() > 1e-2 * scale
