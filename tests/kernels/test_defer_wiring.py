"""kernels.defer_wiring on a real megatron-core GPTModel (CPU, fp32, gloo, one rank, megatron
DDP, two micro-batches a step): with `layout.wgrad_defer=step` every wired producer's output
reaches its linear in the arena slot (the linear makes no copy: `Arena.copies`), the
linears no producer feeds copy, and main_grad matches the undeferred model's.

Tolerances: deferred vs undeferred differ in summation order only (one K = 2 * tokens GEMM
against two K = tokens GEMMs added, fp32): 1e-5 relative. Wired vs unwired deferral (every
linear copies) hold the same arena contents and run the same flush: bitwise equal. Without a
Deferral, wire changes nothing: bitwise equal to a model it never saw.
Negative controls: unwired producers show up as copies; a producer that writes the next
micro-batch's slot (the wrap-around clobbers a slot already stored) fails the parity.
Under full recompute nothing is wired (every linear copies, main_grad still matches).
attention=flash_attn runs against a torch stand-in of flash-attn-4's interface
(tests/kernels/test_flash_attn.py FakeFA4): writing in place, it fills proj's X slot too;
an interface without `out=` is not wired (the control). The CUDA test reads the same
counts from two whole GPU trials' records.
"""

import pytest
import torch

from tests.gloo import run_on_gloo

TINY = dict(name="tiny", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
            num_query_groups=4, vocab_size=1000, seq_length=16)  # MHA: qkv_grad=fused applies
# Every producer kind: Triton norms, SwiGLU, RoPE's fused QKV gradient, the add+norm fusions;
# with the other fusions of the H200 sweep's deferred mbs-1 layout (conf/sweep/h200_single.yaml).
FUSED = dict(attention="sdpa", norm="triton", swiglu="triton", qkv_grad="fused", add_norm="fused",
             loss="fused", embedding_grad="fused", mbs=2, gbs=4)
STOCK_LAYER = dict(FUSED, add_norm="megatron")  # megatron's TransformerLayer with our norms
LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
FP32_TOL = dict(rtol=1e-5, atol=1e-6)


def _step(layout_kwargs, *, wire=True, call_wire=True, shift_slot=False):
    """One step of the tiny model: (main_grads, arena copies per linear, wire's links,
    losses). The trial build wires a deferred chunk itself (launch.steps.defer_wgrad);
    call_wire calls wire once more after the build, for its report (idempotent), or on a
    chunk without a Deferral. wire=False: the build's wiring is a no-op."""
    from unittest import mock

    from core.config import Layout, ModelConfig
    from kernels import defer_wiring, wgrad_defer
    from launch import cpu_trial
    from launch.data import microbatch

    model_cfg = ModelConfig(**TINY)
    layout = Layout(**layout_kwargs)
    patches = []
    if not wire:  # the control: attach without the wiring, every linear copies
        patches.append(mock.patch.object(defer_wiring, "wire", lambda chunk: []))
    if shift_slot:  # planted: producers write the NEXT micro-batch's slot (wrapping around)
        def next_slot(weight, shape, dtype, which):
            arena = getattr(weight, wgrad_defer.ATTR)
            deferral = arena.deferral
            view = (arena.x if which == "x" else arena.dy)[(deferral.current() + 1) % deferral.slots]
            return view if tuple(view.shape) == tuple(shape) and view.dtype == dtype else None

        patches.append(mock.patch.object(wgrad_defer, "_target", next_slot))
    for patch in patches:
        patch.start()
    try:
        torch.manual_seed(7)
        trainer = cpu_trial.build(model_cfg, layout, seed=7, lr=1e-3, wgrad_fusion=True)
        chunk = trainer.model[0]
        links = defer_wiring.wire(chunk) if call_wire else []
        batches = [microbatch(seed=7, step=0, first=2 * i, mbs=2, seq_length=model_cfg.seq_length,
                              vocab_size=model_cfg.vocab_size, device="cpu") for i in range(2)]
        losses = cpu_trial.forward_backward(trainer, batches, seq_length=model_cfg.seq_length, mbs=2)
    finally:
        for patch in patches:
            patch.stop()
    deferral = getattr(chunk, "wgrad_deferral", None)
    copies = {}
    for name, module in chunk.named_modules():
        arena = getattr(getattr(module, "weight", None), wgrad_defer.ATTR, None)
        if deferral is not None and arena is not None:
            copies[name.split("decoder.")[-1]] = dict(arena.copies)
    # numpy arrays: tensors would cross the process boundary as shared memory of an exited rank
    grads = {name: p.main_grad.numpy().copy() for name, p in chunk.named_parameters()}
    return grads, copies, links, [float(d["loss"]) for d in losses]


def _all(rank):
    out = {}
    for name, kwargs in (("fused", FUSED), ("stock_layer", STOCK_LAYER)):
        out[name, "off"] = _step(kwargs, call_wire=False)
        out[name, "wired"] = _step(dict(kwargs, wgrad_defer="step"))
    out["fused", "unwired"] = _step(dict(FUSED, wgrad_defer="step"), wire=False)
    out["fused", "shifted"] = _step(dict(FUSED, wgrad_defer="step"), shift_slot=True)
    out["fused", "off_wired"] = _step(FUSED)  # wire called on a chunk without a Deferral
    out["recomputed", "off"] = _step(dict(FUSED, recompute="full"), call_wire=False)
    out["recomputed", "wired"] = _step(dict(FUSED, recompute="full", wgrad_defer="step"))
    return out


@pytest.fixture(scope="module")
def runs():
    return run_on_gloo(_all, world_size=1)[0]


def _copies(runs, case, which):
    return runs[case, which][1]


def test_every_wired_producer_writes_into_its_slot(runs):
    """Fused layers: only the attention output (proj's X) is copied, once per micro-batch;
    every other X and dY (8 of a layer's 8 tensors less that one) arrived in its slot."""
    copies = _copies(runs, "fused", "wired")
    assert sorted(copies) == sorted(f"layers.{i}.{part}.{linear}" for i in range(2)
                                    for part, linear in (("self_attention", "linear_qkv"),
                                                         ("self_attention", "linear_proj"),
                                                         ("mlp", "linear_fc1"), ("mlp", "linear_fc2")))
    for name, count in copies.items():
        expected = {"x": 2, "dy": 0} if name.endswith("linear_proj") else {"x": 0, "dy": 0}
        assert count == expected, name
    # 7 tensors a layer; layer 1's QKV input twice: the handed-over norm and, where the hand-over
    # is not taken, its own input norm (both write the same slot).
    links = runs["fused", "wired"][2]
    consumers = [consumer for _, consumer in links]
    assert len(set(consumers)) == 2 * 7 and len(consumers) == 2 * 7 + 1
    assert sorted(p for p, c in links if c.endswith("layers.1.linear_qkv.x")) == [
        "module.decoder.layers.0.next_add_norm.y", "module.decoder.layers.1.input_layernorm.y"]


def test_the_stock_layer_copies_what_megatron_adds(runs):
    """megatron's own layer: the bias-dropout-add and autograd's residual sum make proj's and
    FC2's dY new tensors (copied); the norms, SwiGLU and RoPE still write their slots."""
    for name, count in _copies(runs, "stock_layer", "wired").items():
        expected_x = 2 if name.endswith("linear_proj") else 0
        expected_dy = 2 if name.endswith(("linear_proj", "linear_fc2")) else 0
        assert count == {"x": expected_x, "dy": expected_dy}, name


def test_unwired_producers_show_up_as_copies(runs):
    """Negative control of the counts: without the wiring every X and dY is copied."""
    copies = _copies(runs, "fused", "unwired")
    assert len(copies) == 8 and all(count == {"x": 2, "dy": 2} for count in copies.values())


@pytest.mark.parametrize("case", ["fused", "stock_layer"])
def test_deferred_main_grad_matches_the_undeferred_model(runs, case):
    off, wired = runs[case, "off"][0], runs[case, "wired"][0]
    unwired = runs["fused", "unwired"][0] if case == "fused" else None
    assert off.keys() == wired.keys()
    for name, grad in off.items():
        grad = torch.from_numpy(grad)
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(torch.from_numpy(wired[name]), grad, **FP32_TOL, msg=name)
        # The same arena contents by copy or by producer, the same flush: the same bits.
        assert unwired is None or (wired[name] == unwired[name]).all(), name
    assert runs[case, "wired"][3] == runs[case, "off"][3]  # the forward is unchanged: same losses


def test_a_producer_writing_another_slot_fails_the_parity(runs):
    """Negative control of the parity: producers writing the next micro-batch's slot clobber
    the first micro-batch's tensors (the last one wraps around onto slot 0): every decoder
    linear has a producer, each one's main_grad is off; nothing else is."""
    off, shifted = runs["fused", "off"][0], runs["fused", "shifted"][0]
    mismatched = sorted(name for name, grad in off.items()
                        if not torch.allclose(torch.from_numpy(shifted[name]), torch.from_numpy(grad), **FP32_TOL))
    assert len(mismatched) == 8 and all(name.split(".")[-2] in LINEARS for name in mismatched), mismatched


def test_nothing_is_wired_under_recompute_and_the_copies_stay_correct(runs):
    """Full recompute runs each layer's forward twice (without autograd, then in the backward):
    wire links nothing, every linear copies (X at both forwards), main_grad as undeferred."""
    grads, copies, links, _ = runs["recomputed", "wired"]
    assert links == [] and len(copies) == 8
    assert all(count == {"x": 4, "dy": 2} for count in copies.values()), copies
    for name, grad in runs["recomputed", "off"][0].items():
        torch.testing.assert_close(torch.from_numpy(grads[name]), torch.from_numpy(grad), **FP32_TOL, msg=name)


def test_wire_without_a_deferral_changes_nothing(runs):
    grads, copies, links, losses = runs["fused", "off_wired"]
    assert links == [] and copies == {}
    off = runs["fused", "off"]
    assert losses == off[3]
    assert all((grads[name] == grad).all() for name, grad in off[0].items())


def _fa4_runs(rank):
    """attention=flash_attn on CPU through tests/kernels/test_flash_attn.py's FakeFA4 (torch
    stand-ins for flash-attn-4's interface): the direct path (FA4Function writes the output
    where it is told) and an interface without `out=` (flash_attn_func and a copy)."""
    from tests.kernels.test_flash_attn import FakeFA4

    out = {}
    for name, without in (("direct", ()), ("fallback", ("out",))):
        FakeFA4(without=without).install_in_process()
        kwargs = dict(FUSED, attention="flash_attn")
        out[name, "off"] = _step(kwargs, call_wire=False)
        out[name, "wired"] = _step(dict(kwargs, wgrad_defer="step"))
    return out


def test_flash_attn_4_writes_the_attention_output_into_projs_slot():
    """With flash-attn-4 writing in place, proj's X arrives in its slot too: no copy left of
    a layer's 8 tensors, main_grad as undeferred. Control: the fallback (an interface without
    `out=`) is not wired and copies proj's X once per micro-batch, as SDPA does."""
    runs = run_on_gloo(_fa4_runs, world_size=1)[0]
    for name, proj_x in (("direct", 0), ("fallback", 2)):
        grads, copies, links, losses = runs[name, "wired"]
        assert len(copies) == 8 and all(
            count == {"x": proj_x if n.endswith("linear_proj") else 0, "dy": 0} for n, count in copies.items()), name
        wired_out = [p for p, _ in links if p.endswith("core_attention.out")]
        assert len(wired_out) == (2 if proj_x == 0 else 0), name
        off_grads, _, _, off_losses = runs[name, "off"]
        assert losses == off_losses
        for key, grad in off_grads.items():
            torch.testing.assert_close(torch.from_numpy(grads[key]), torch.from_numpy(grad), **FP32_TOL, msg=key)


# -- CUDA: a whole GPU trial (bf16, megatron DDP, cuDNN attention), copies from its record ------

def _gpu_trial(tmp_path, **axes):
    from core.config import ClusterConfig, Layout, ModelConfig, TrialConfig
    from core.spec import TrialSpec
    from launch.trial import run_local

    layout = Layout(gbs=8, mbs=2, attention="sdpa_cudnn", wgrad_defer="step", grad_buffer="overwrite", **axes)
    spec = TrialSpec(
        model=ModelConfig(num_query_groups=4),  # tiny (4 layers, hidden 128), MHA: qkv_grad=fused applies
        cluster=ClusterConfig(name="one_gpu", device="cuda", gpus_per_node=1, gpu_memory_gb=70.0,
                              peak_tflops=989.4),
        layout=layout,
        trial=TrialConfig(warmup_steps=2, measure_steps=2, timeout_s=300),
        trial_dir=str(tmp_path / layout.name),
    )
    return run_local(spec)


@pytest.mark.cuda
def test_gpu_trial_producers_fill_every_slot_but_the_attention_output(tmp_path):
    """bf16 on the GPU, fused layers under per-slot CUDA graphs (the copies counted where Python
    runs: eager step 0 and each slot's capture): per micro-batch only the 4 layers' proj X are
    copied. Control in the same test: megatron's own layer (eager) also copies proj's and FC2's
    dY, 8 a micro-batch, so the count can fail."""
    fused = _gpu_trial(tmp_path / "fused", cuda_graph=True, **{k: v for k, v in FUSED.items()
                                                               if k not in ("mbs", "gbs", "attention")})
    stock = _gpu_trial(tmp_path / "stock", **{k: v for k, v in STOCK_LAYER.items()
                                              if k not in ("mbs", "gbs", "attention")})
    assert fused["status"] == "ok" and stock["status"] == "ok", (fused.get("reason"), stock.get("reason"))
    reports = [record["ranks"][0]["wgrad_defer"] for record in (fused, stock)]
    assert [r["linears"] for r in reports] == [16, 16]
    assert [(r["x_copies_per_microbatch"], r["dy_copies_per_microbatch"]) for r in reports] == [(4, 0), (4, 8)]
