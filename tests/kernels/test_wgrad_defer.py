"""kernels.wgrad_defer: the decoder linears' weight gradients computed once per step from
per-micro-batch arenas, against kernels.wgrad's per-micro-batch accumulation.

CPU units on a toy chunk (decoder = linear -> tanh -> linear, kernels.wgrad's autograd
function, a DDP-like hook that adds `param.grad` unless `grad_added_to_main_grad`):
- parity of main_grad after a 4-micro-batch step, deferred vs not: float64 within 1e-12
  relative (only the summation order differs: one K = 4*tokens GEMM against four K = tokens
  GEMMs added), fp32 within 1e-5;
- the placeholder gradient is never added by the hook;
- a producer writing into the slot (`input_target` / `grad_target`) makes no copy, the
  others are copied (the fallback), and both give the same gradient;
- flush with the overwrite flag writes (beta 0), without it adds;
- negative control: a slot that is not advanced loses micro-batches and parity fails.
"""

import pytest
import torch

from kernels import wgrad, wgrad_defer

S, B, IN, HID, OUT = 5, 2, 6, 7, 3
MICRO = 4
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


class _Tanh(torch.autograd.Function):
    """A producer: its output is the next linear's X, its input gradient the previous linear's dY."""

    @staticmethod
    def forward(ctx, h, consumer, producer_of_h):
        out = wgrad_defer.input_target(consumer, h.shape, h.dtype)
        out = torch.tanh(h, out=out) if out is not None else torch.tanh(h)
        ctx.save_for_backward(out)
        ctx.producer_of_h = producer_of_h
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        target = wgrad_defer.grad_target(ctx.producer_of_h, grad.shape, grad.dtype)
        result = torch.mul(grad, 1 - out * out, out=target) if target is not None else grad * (1 - out * out)
        return result, None, None


class _Linear(wgrad.ColumnParallelLinear):
    """kernels.wgrad's linear without megatron's constructor (no parallel state needed)."""

    def __init__(self, weight):
        torch.nn.Module.__init__(self)
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x):
        return wgrad._LinearIntoMainGrad.apply(x, self.weight, None, False, False, None)


class _Decoder(torch.nn.Module):
    def __init__(self, w1, w2, *, producer: bool):
        super().__init__()
        self.fc1, self.fc2 = _Linear(w1), _Linear(w2)
        self.producer = producer

    def forward(self, x):
        h = self.fc1(x)
        if self.producer:
            a = _Tanh.apply(h, self.fc2.weight, self.fc1.weight)
        else:
            a = torch.tanh(h)
        return self.fc2(a)


class _Chunk(torch.nn.Module):
    def __init__(self, dtype, *, producer=False, device="cpu"):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.decoder = _Decoder(torch.randn(HID, IN, generator=gen, dtype=dtype).to(device),
                                torch.randn(OUT, HID, generator=gen, dtype=dtype).to(device),
                                producer=producer)
        self.hook_adds = 0
        # 16-bit weights: fp32 buffers, as megatron DDP's grad_reduce_in_fp32.
        grad_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        for p in self.parameters():  # megatron DDP's buffers and backward hook, in miniature
            p.main_grad = torch.zeros_like(p, dtype=grad_dtype)
            p.grad_added_to_main_grad = False
            p.register_post_accumulate_grad_hook(self._ddp_hook)

    def _ddp_hook(self, p):
        if not p.grad_added_to_main_grad:
            p.main_grad.add_(p.grad)
            self.hook_adds += 1
        p.grad = None

    def forward(self, x):
        return self.decoder(x)


def _batches(dtype, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(S, B, IN, generator=gen, dtype=dtype).to(device) for _ in range(MICRO)]


def _step(chunk, batches, deferral=None):
    for x in batches:
        (chunk(x) ** 2).sum().backward()
    if deferral is not None:
        deferral.flush()
    return [p.main_grad.clone() for p in chunk.parameters()]


def _reference(dtype):
    return _step(_Chunk(dtype), _batches(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("producer", [False, True], ids=["copy", "zero_copy"])
def test_deferred_step_matches_per_microbatch_accumulation(dtype, producer):
    chunk = _Chunk(dtype, producer=producer)
    deferral = wgrad_defer.attach(chunk, slots=MICRO, tokens_shape=(S, B))
    assert len(deferral.arenas) == 2
    got = _step(chunk, _batches(dtype), deferral)
    for g, r in zip(got, _reference(dtype)):
        torch.testing.assert_close(g, r, **TOL[dtype])
    assert chunk.hook_adds == 0  # the placeholder reached the hook marked: never added
    assert deferral.slot == -1
    arena1, arena2 = (deferral.arenas[m.weight] for m in (chunk.decoder.fc1, chunk.decoder.fc2))
    if producer:  # tanh wrote fc2's X and fc1's dY into the slots; the rest was copied
        assert arena2.copies["x"] == 0 and arena1.copies["dy"] == 0
    else:
        assert arena2.copies["x"] == MICRO and arena1.copies["dy"] == MICRO
    assert arena1.copies["x"] == MICRO and arena2.copies["dy"] == MICRO
    report = deferral.report()  # what a GPU trial records
    assert report["linears"] == 2 and report["x_copies_per_microbatch"] == (1 if producer else 2)
    assert report["dy_copies_per_microbatch"] == report["x_copies_per_microbatch"]


def test_the_microbatch_graph_eager_step_flushes_before_finalize():
    """launch.step_graph's eager steps (step 0 of a graphed trial) through the same flush hook."""
    from launch.step_graph import MicrobatchGraph

    chunk = _Chunk(torch.float64)
    finalized = []
    chunk.config = type("Config", (), {})()
    chunk.config.finalize_model_grads_func = lambda model, _: finalized.append(
        [p.main_grad.clone() for p in model[0].parameters()])
    wgrad_defer.attach(chunk, slots=MICRO, tokens_shape=(S, B))
    wgrad_defer.flush_before_finalize(chunk.config)
    wgrad_defer.flush_before_finalize(chunk.config)  # idempotent: one flush per step
    chunk.forward = lambda tokens, position_ids, mask, labels: chunk.decoder(tokens)
    batches = [{"tokens": x, "position_ids": None, "labels": None} for x in _batches(torch.float64)]
    MicrobatchGraph(loss_func=lambda out: ((out ** 2).sum(), {}), eager_steps=1)(
        data_iterator=[iter(batches)], model=[chunk], num_microbatches=1)
    assert len(finalized) == 1  # finalize saw the flushed gradients
    for g, r in zip(finalized[0], _reference(torch.float64)):
        torch.testing.assert_close(g, r, **TOL[torch.float64])


def test_a_slot_not_advanced_loses_microbatches():
    chunk = _Chunk(torch.float64)
    deferral = wgrad_defer.attach(chunk, slots=MICRO, tokens_shape=(S, B))
    deferral.begin_microbatch = lambda: setattr(deferral, "slot", 0)  # planted: stuck at slot 0
    got = _step(chunk, _batches(torch.float64), deferral)
    assert not torch.allclose(got[0], _reference(torch.float64)[0], rtol=1e-3)


def test_flush_overwrites_with_the_flag_and_adds_without():
    dtype = torch.float64
    reference = _reference(dtype)
    for overwrite in (True, False):
        chunk = _Chunk(dtype)
        deferral = wgrad_defer.attach(chunk, slots=MICRO, tokens_shape=(S, B))
        for p in chunk.parameters():
            p.main_grad.fill_(3.0)  # stale contents: overwrite must never read them
            setattr(p, wgrad.OVERWRITE_FLAG, overwrite)
        got = _step(chunk, _batches(dtype), deferral)
        for g, r, p in zip(got, reference, chunk.parameters()):
            torch.testing.assert_close(g, r if overwrite else r + 3.0, **TOL[dtype])
            assert getattr(p, wgrad.OVERWRITE_FLAG) is False


def test_more_forwards_than_slots_is_an_error_and_targets_need_a_slot():
    chunk = _Chunk(torch.float64)
    deferral = wgrad_defer.attach(chunk, slots=2, tokens_shape=(S, B))
    weight = chunk.decoder.fc2.weight
    assert wgrad_defer.input_target(weight, (S, B, HID), torch.float64) is None  # no slot yet
    chunk(_batches(torch.float64)[0])
    view = wgrad_defer.input_target(weight, (S, B, HID), torch.float64)
    assert view is not None and view.data_ptr() == deferral.arenas[weight].x[0].data_ptr()
    assert wgrad_defer.input_target(weight, (S, B, HID + 1), torch.float64) is None
    assert wgrad_defer.input_target(weight, (S, B, HID), torch.float32) is None
    assert wgrad_defer.grad_target(torch.zeros(1), (S, B, OUT), torch.float64) is None
    chunk(_batches(torch.float64)[1])
    with pytest.raises(RuntimeError, match="flush"):
        chunk(_batches(torch.float64)[2])
    with pytest.raises(RuntimeError, match="already"):
        wgrad_defer.attach(chunk, slots=2, tokens_shape=(S, B))


def test_a_forward_without_grad_does_not_advance_the_slot():
    chunk = _Chunk(torch.float64)
    deferral = wgrad_defer.attach(chunk, slots=MICRO, tokens_shape=(S, B))
    with torch.no_grad():
        chunk(_batches(torch.float64)[0])
    assert deferral.slot == -1


def test_the_dp_reduction_never_overlaps_a_deferred_backward():
    from core.config import Layout
    from launch.steps import overlap_grad_reduce

    assert overlap_grad_reduce(Layout(), 2, device="cuda")
    assert not overlap_grad_reduce(Layout(wgrad_defer="step"), 2, device="cuda")  # buckets wait for flush
    assert not overlap_grad_reduce(Layout(cuda_graph=True), 2, device="cuda")
    assert not overlap_grad_reduce(Layout(), 1, device="cuda") and not overlap_grad_reduce(Layout(), 2, device="cpu")


# -- the real build on gloo: megatron GPTModel, DDP, finalize_model_grads ----------------------

TINY = dict(name="tiny", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
            num_query_groups=2, vocab_size=1000, seq_length=16)
GLOO_CASES = {  # name: (tp, layout axes); world 2, four micro-batches per step in each
    "tp1": (1, dict(mbs=2, gbs=16)),
    "tp2_sp": (2, dict(mbs=2, gbs=8, sequence_parallel=True)),
    "tp1_overwrite": (1, dict(mbs=2, gbs=16, grad_buffer="overwrite")),
}
STALE = 3.0  # what the buffers hold before the step (a previous step's gradients)


def _gloo_main_grads(layout, model_cfg) -> tuple[dict, dict]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from launch import cpu_trial, steps
    from launch.cpu_shims import device_redirect

    torch.manual_seed(7)
    trainer = cpu_trial.build(model_cfg, layout, seed=7, lr=1e-3, wgrad_fusion=True)
    num_micro = layout.num_microbatches(dist.get_world_size())
    batches = steps.step_batches(_Spec(model_cfg, layout), 0, num_micro, ps.get_data_parallel_rank(),
                                 device="cpu")
    for p in trainer.params:
        p.main_grad.fill_(STALE)
    overwrite = layout.grad_buffer == "overwrite"
    with device_redirect():
        steps.forward_backward(trainer.schedule, trainer.model, batches, num_micro=num_micro,
                               seq_length=model_cfg.seq_length, mbs=layout.mbs,
                               zero_buffer=wgrad.zero_grad_buffer_except_overwritten if overwrite else None)
    deferral = getattr(trainer.model[0], "wgrad_deferral", None)
    info = {"num_micro": num_micro, "arenas": 0 if deferral is None else len(deferral.arenas),
            "slot_after": None if deferral is None else deferral.slot}
    return {n: p.main_grad.clone() for n, p in trainer.model[0].named_parameters()}, info


class _Spec:
    def __init__(self, model, layout):
        from core.config import TrialConfig

        self.model, self.layout, self.trial = model, layout, TrialConfig(seed=7)


def _gloo_compare(rank):
    import dataclasses
    from unittest import mock

    from megatron.core import parallel_state as ps

    from core.config import Layout, ModelConfig

    model_cfg = ModelConfig(**TINY)
    out = {}
    for control in (False, True):
        for name, (tp, axes) in GLOO_CASES.items():
            ps.destroy_model_parallel()
            ps.initialize_model_parallel(tensor_model_parallel_size=tp)
            layout = Layout(tp=tp, attention="sdpa", norm="torch", **axes)
            if layout.grad_buffer == "overwrite":  # the reference: several micro-batches, zeroed
                reference, _ = _gloo_main_grads(dataclasses.replace(layout, grad_buffer="megatron"), model_cfg)
            else:
                reference, _ = _gloo_main_grads(layout, model_cfg)
            deferred_layout = dataclasses.replace(layout, wgrad_defer="step")
            if control:  # planted: the flush forgets its GEMMs (slots reset, nothing written)
                with mock.patch.object(wgrad_defer.Arena, "flush", lambda self, count: None):
                    deferred, info = _gloo_main_grads(deferred_layout, model_cfg)
            else:
                deferred, info = _gloo_main_grads(deferred_layout, model_cfg)
            info["mismatched"] = sorted(n for n in reference
                                        if not torch.allclose(deferred[n], reference[n], rtol=1e-5, atol=1e-6))
            out[(name, control)] = info
    return out


@pytest.fixture(scope="module")
def gloo_compared():
    from tests.gloo import run_on_gloo

    return run_on_gloo(_gloo_compare, world_size=2)[0]


@pytest.mark.parametrize("case", GLOO_CASES)
def test_a_gloo_trial_build_defers_with_the_same_main_grad(gloo_compared, case):
    # fp32 on both sides, one K = 4 * tokens GEMM against four added: 1e-5 relative.
    info = gloo_compared[(case, False)]
    assert info["num_micro"] == 4
    assert info["arenas"] == 4 * TINY["num_layers"]  # QKV, proj, fc1, fc2; not the output layer
    assert info["slot_after"] == -1  # flushed before finalize_model_grads
    assert info["mismatched"] == [], info


@pytest.mark.parametrize("case", GLOO_CASES)
def test_a_flush_that_computes_nothing_is_caught(gloo_compared, case):
    info = gloo_compared[(case, True)]
    assert len(info["mismatched"]) == 4 * TINY["num_layers"], info
    assert all("decoder.layers" in name for name in info["mismatched"])


# -- CUDA: bf16 into fp32 buffers, eager and under launch.step_graph's per-slot graphs ----------

# bf16 inputs, fp32 accumulation on both sides (bf16 products are exact in fp32): only the
# summation order differs, so 1e-4 relative (K = 40 tokens here) holds with a wide margin.
CUDA_TOL = dict(rtol=1e-4, atol=1e-4)


class _GraphChunk(_Chunk):
    """The toy chunk called as MicrobatchGraph calls GPTModel; its per-token loss is [b, s]."""

    def __init__(self, **kwargs):
        super().__init__(torch.bfloat16, device="cuda", **kwargs)
        self.config = type("Config", (), {"finalize_model_grads_func": staticmethod(lambda model, _: None)})()

    def forward(self, tokens, position_ids, attention_mask, labels):
        return (self.decoder(tokens).float() ** 2).sum(-1).t()


def _graph_steps(chunk, steps: int, *, single_graph=False) -> list[list[torch.Tensor]]:
    from unittest import mock

    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from launch import step_graph

    get_cuda_rng_tracker()  # the capture registers the tracker's generators: it must exist
    schedule = step_graph.MicrobatchGraph(loss_func=lambda out: (out.mean(), {}), eager_steps=1)
    grads = []
    stream = torch.cuda.Stream()  # captures need a side stream, as launch.gpu_trial runs them
    with torch.cuda.stream(stream), mock.patch.object(
            step_graph, "_deferral", (lambda c: None) if single_graph else step_graph._deferral):
        for step in range(steps):
            for p in chunk.parameters():
                p.main_grad.zero_()
            unused = torch.zeros(1, device="cuda")  # the graph's static inputs are all tensors
            batches = [{"tokens": x, "position_ids": unused, "labels": unused}
                       for x in _batches(torch.bfloat16, "cuda", seed=step)]
            schedule(data_iterator=[iter(batches)], model=[chunk], num_microbatches=MICRO)
            torch.cuda.synchronize()
            grads.append([p.main_grad.clone() for p in chunk.parameters()])
    return grads


@pytest.mark.cuda
@pytest.mark.parametrize("producer", [False, True], ids=["copy", "zero_copy"])
def test_cuda_eager_deferral_matches_accumulation(producer):
    chunk = _Chunk(torch.bfloat16, producer=producer, device="cuda")
    deferral = wgrad_defer.attach(chunk, slots=MICRO, tokens_shape=(S, B))
    got = _step(chunk, _batches(torch.bfloat16, "cuda"), deferral)
    want = _step(_Chunk(torch.bfloat16, device="cuda"), _batches(torch.bfloat16, "cuda"))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **CUDA_TOL)
    assert chunk.hook_adds == 0


@pytest.mark.cuda
def test_cuda_per_slot_graphs_train_like_eager_and_one_graph_would_not():
    from kernels import wgrad_defer as defer

    reference = _graph_steps(_GraphChunk(), 3)  # no deferral: one graph, accumulating GEMMs
    for producer in (False, True):
        chunk = _GraphChunk(producer=producer)
        defer.attach(chunk, slots=MICRO, tokens_shape=(S, B))
        defer.flush_before_finalize(chunk.config)
        graphed = _graph_steps(chunk, 3)  # step 0 eager, 1 captures a graph per slot, 2 replays
        for step, (g_step, r_step) in enumerate(zip(graphed, reference)):
            for g, r in zip(g_step, r_step):
                torch.testing.assert_close(g, r, **CUDA_TOL, msg=lambda m: f"step {step}: {m}")
        assert chunk.wgrad_deferral.slot == -1
    # Negative control: one graph for every micro-batch replays slot 0's views.
    chunk = _GraphChunk()
    defer.attach(chunk, slots=MICRO, tokens_shape=(S, B))
    defer.flush_before_finalize(chunk.config)
    wrong = _graph_steps(chunk, 3, single_graph=True)
    assert not torch.allclose(wrong[2][0], reference[2][0], rtol=1e-2, atol=1e-2)


def test_a_strided_input_is_copied_into_its_slot():
    chunk = _Chunk(torch.float64)
    deferral = wgrad_defer.attach(chunk, slots=MICRO, tokens_shape=(S, B))
    deferral.begin_microbatch()
    arena = deferral.arenas[chunk.decoder.fc1.weight]
    strided = torch.randn(B, S, IN, dtype=torch.float64).transpose(0, 1)  # [s, b, in], not contiguous
    assert arena.store_input(strided) == 0 and arena.copies["x"] == 1
    assert torch.equal(arena.x[0], strided)
    flat = torch.randn(S * B, HID, dtype=torch.float64)
    deferral.arenas[chunk.decoder.fc2.weight].store_input(flat)
    assert torch.equal(deferral.arenas[chunk.decoder.fc2.weight].x[0].reshape(S * B, HID), flat)
