"""analysis.megatron_args: the layout -> Megatron-LM / megatron-core mapping, one test per axis,
and the megatron-core text held against what the trials build (launch/model.py, launch/gpu_trial.py)."""

import dataclasses
import functools
import types

import pytest
import torch

import analysis.megatron_args as ma
from core.choices import ATTENTION_KERNELS
from core.config import ConfigError, Layout, ModelConfig, TrialConfig
from kernels import layer_spec

MODEL = ModelConfig(num_layers=8, hidden_size=256, ffn_hidden_size=704, num_attention_heads=8,
                    num_query_groups=4, vocab_size=4096, seq_length=256)


def flags(layout: Layout, world: int = 1, model: ModelConfig = MODEL) -> dict[str, list[str]]:
    """The command's flags, each with the values that follow it."""
    out, current = {}, None
    for token in ma.megatron_lm_command(model, layout, world_size=world).args:
        if token.startswith("--"):
            current = out.setdefault(token, [])
        else:
            current.append(token)
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp(tp):
    f = flags(Layout(tp=tp, gbs=8), world=tp)
    assert f["--tensor-model-parallel-size"] == [str(tp)]
    env = ma.megatron_lm_command(MODEL, Layout(tp=tp, gbs=8), world_size=tp).env
    assert ("CUDA_DEVICE_MAX_CONNECTIONS" in env) == (tp > 1)  # validate_args asserts it on Hopper


def test_pp_and_vpp():
    f = flags(Layout(pp=2, vpp=2, gbs=8), world=2)
    assert f["--pipeline-model-parallel-size"] == ["2"]
    assert f["--num-virtual-stages-per-pipeline-rank"] == ["2"]  # Megatron-LM's flag, not mcore's name
    assert "--virtual-pipeline-model-parallel-size" not in f
    assert "--num-virtual-stages-per-pipeline-rank" not in flags(Layout(pp=2, gbs=8), world=2)


def test_cp_mbs_gbs():
    f = flags(Layout(mbs=4, gbs=32), world=2)
    assert f["--context-parallel-size"] == ["1"]
    assert f["--micro-batch-size"] == ["4"] and f["--global-batch-size"] == ["32"]


def test_sequence_parallel_and_distributed_optimizer():
    f = flags(Layout(tp=2, sequence_parallel=True, distributed_optimizer=True, gbs=8), world=2)
    assert "--sequence-parallel" in f and "--use-distributed-optimizer" in f
    f = flags(Layout(tp=2, gbs=8), world=2)
    assert "--sequence-parallel" not in f and "--use-distributed-optimizer" not in f


@pytest.mark.parametrize("recompute,method,layers,want", [
    ("none", "uniform", 1, {}),
    ("selective", "uniform", 1, {"--recompute-granularity": ["selective"], "--recompute-modules": ["core_attn"]}),
    ("full", "uniform", 2, {"--recompute-granularity": ["full"], "--recompute-method": ["uniform"],
                            "--recompute-num-layers": ["2"]}),
    ("full", "block", 3, {"--recompute-granularity": ["full"], "--recompute-method": ["block"],
                          "--recompute-num-layers": ["3"]}),
])
def test_recompute(recompute, method, layers, want):
    layout = Layout(gbs=8, recompute=recompute, recompute_method=method, recompute_num_layers=layers)
    f = flags(layout)
    got = {k: v for k, v in f.items() if k.startswith("--recompute")}
    assert got == want


def test_overlap_grad_reduce_only_with_data_parallelism():
    assert "--overlap-grad-reduce" in flags(Layout(gbs=8), world=2)
    assert "--overlap-grad-reduce" not in flags(Layout(gbs=8), world=1)
    assert "--overlap-grad-reduce" not in flags(Layout(tp=2, gbs=8), world=2)  # dp 1


def test_model_precision_and_vocab():
    f = flags(Layout(gbs=8))
    assert f["--num-layers"] == ["8"] and f["--hidden-size"] == ["256"] and f["--ffn-hidden-size"] == ["704"]
    assert f["--num-attention-heads"] == ["8"] and f["--num-query-groups"] == ["4"]
    assert f["--kv-channels"] == ["32"] and f["--seq-length"] == f["--max-position-embeddings"] == ["256"]
    for flag in ("--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--bf16",
                 "--group-query-attention", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
                 "--no-masked-softmax-fusion", "--no-persist-layer-norm"):
        assert flag in f
    assert f["--normalization"] == ["RMSNorm"] and f["--transformer-impl"] == ["local"]
    assert f["--attention-dropout"] == f["--hidden-dropout"] == ["0.0"]
    assert f["--vocab-size"] == ["4095"]  # NullTokenizer adds EOD: 4096 rows


@pytest.mark.parametrize("vocab,tp,divisor", [(32000, 1, 128), (32000, 4, 64), (128256, 8, 32), (1024, 2, 128)])
def test_vocab_padding_adds_no_row(vocab, tp, divisor):
    d = ma.vocab_divisor(vocab, tp)
    assert d == divisor and vocab % (d * tp) == 0
    with pytest.raises(ConfigError, match="not divisible by tp"):
        ma.vocab_divisor(1000, 3)


@pytest.mark.parametrize("attention", ATTENTION_KERNELS)
def test_kernels_go_through_the_spec_and_rope_is_applied_once(attention):
    f = flags(Layout(gbs=8, attention=attention, norm="triton"))
    assert f["--spec"] == ["kernels.megatron_lm_spec", f"{attention}_attention_triton_norm_wgrad_fusion"]
    ours = layer_spec.applies_rope(attention)
    assert ma.applies_rope(attention) == ours  # the torch-free copy agrees with the layer spec
    assert f["--position-embedding-type"] == (["none"] if ours else ["rope"])
    assert ("--rotary-base" in f) == (not ours)


def test_notes_and_env_say_what_megatron_lm_cannot_take():
    graph = ma.megatron_lm_command(MODEL, Layout(gbs=8, cuda_graph=True), world_size=1)
    eager = ma.megatron_lm_command(MODEL, Layout(gbs=8), world_size=1)
    assert any("CUDA graph" in n for n in graph.notes) and not any("CUDA graph" in n for n in eager.notes)
    wgrad = [n for n in eager.notes if "kernels/wgrad.py" in n]
    assert len(wgrad) == 1 and "through the spec" in wgrad[0] and "output layer" in wgrad[0]
    assert eager.env["PYTHONPATH"].startswith(str(ma.REPO_ROOT))
    shell = eager.shell().splitlines()
    assert shell[-1].startswith("pretrain_gpt.py --num-layers 8")
    assert all(line.startswith(("# ", "export ")) for line in shell[:-1])


@pytest.mark.parametrize("layout,world,match", [
    (Layout(tp=0, gbs=8), 1, "tp must be a positive integer"),
    (Layout(tp=2, gbs=8), 3, "not divisible by tp"),
    (Layout(gbs=8), 0, "world size must be a positive integer"),
])
def test_a_layout_that_cannot_run_gets_no_command(layout, world, match):
    with pytest.raises(ConfigError, match=match):
        ma.megatron_lm_command(MODEL, layout, world_size=world)


def test_every_layout_field_is_mapped():
    fields = {f.name for f in dataclasses.fields(Layout)}
    assert fields == ma.MAPPED_LAYOUT_FIELDS, (
        f"map {sorted(fields - ma.MAPPED_LAYOUT_FIELDS)} in analysis/megatron_args.py (a flag, the spec, "
        f"or a note saying Megatron-LM cannot take it), then list it in MAPPED_LAYOUT_FIELDS")


def test_constants_match_the_trials():
    from launch import model as trial_model

    assert ma.ROPE_BASE == trial_model.ROPE_BASE and ma.TRIAL_LR == TrialConfig().lr


def _same(a, b) -> bool:
    """Equal values; init methods are partials made afresh in __post_init__, equal by their parts."""
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):
        return (a.func, a.args, a.keywords) == (b.func, b.args, b.keywords)
    return a == b


def _evaluate(source: dict[str, str], **names) -> dict:
    import kernels

    return {k: eval(v, {"torch": torch, "kernels": kernels, **names}) for k, v in source.items()}  # noqa: S307


LAYOUTS = [Layout(gbs=8, attention="sdpa_cudnn", norm="triton"),
           Layout(tp=2, pp=2, vpp=2, gbs=8, sequence_parallel=True, recompute="full",
                  recompute_method="block", recompute_num_layers=1, attention="megatron", norm="megatron"),
           Layout(gbs=8, recompute="selective", distributed_optimizer=True, cuda_graph=True,
                  swiglu="triton", loss="fused", optimizer_step="flat", add_norm="fused", qkv_grad="fused")]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l.name)
def test_megatron_core_text_is_the_trials_transformer_config(layout, monkeypatch):
    from launch import model as trial_model

    trial = trial_model.transformer_config(MODEL, layout, device="cuda")
    source = ma.megatron_core_kwargs(MODEL, layout, world_size=8)
    printed = trial_model.TransformerConfig(**_evaluate(source["TransformerConfig"]))
    differ = [f.name for f in dataclasses.fields(trial) if not _same(getattr(trial, f.name), getattr(printed, f.name))]
    assert differ == []
    other = dataclasses.replace(layout, recompute="selective" if layout.recompute == "none" else "none")
    wrong = trial_model.TransformerConfig(**_evaluate(ma.megatron_core_kwargs(
        MODEL, other, world_size=8)["TransformerConfig"]))
    assert wrong != trial  # negative control: a different layout's text does not match


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l.name)
def test_megatron_core_text_is_the_trials_gpt_model_and_ddp(layout, monkeypatch):
    from launch import model as trial_model, steps

    built = {}
    # Both sides build the block spec; its layer count would ask the (absent) pipeline groups.
    monkeypatch.setattr(layer_spec, "get_num_layers_to_build",
                        lambda config, vp_stage=None: config.num_layers // (layout.pp * layout.vpp))
    def fake_gpt(**kw):  # records its arguments; add_norm=fused then links its (no) layers
        built.update(kw)
        return types.SimpleNamespace(decoder=types.SimpleNamespace(layers=[]), output_layer="output layer")

    monkeypatch.setattr(trial_model, "GPTModel", fake_gpt)
    monkeypatch.setattr(__import__("kernels.megatron_loss").megatron_loss, "FusedLossGPTModel", fake_gpt)
    fused_output = []
    monkeypatch.setattr(trial_model.wgrad, "fuse_output_layer", fused_output.append)
    config = trial_model.transformer_config(MODEL, layout, device="cpu")
    trial_model.build_model(MODEL, layout, config, wgrad_fusion=True)  # as a GPU trial builds it
    assert fused_output == ["output layer"]
    source = ma.megatron_core_kwargs(MODEL, layout, world_size=8)
    per_chunk = {k: built.pop(k) for k in ("pre_process", "post_process", "vp_stage")}  # set per stage
    assert per_chunk == {"pre_process": True, "post_process": True, "vp_stage": None}
    label = "kernels.megatron_loss.FusedLossGPTModel" if layout.loss == "fused" else "GPTModel"
    assert _evaluate(source[label], config=config) == built
    seen = []
    monkeypatch.setattr(steps, "DistributedDataParallel", lambda **kw: seen.append(kw["ddp_config"]))
    overlap = layout.dp(8) > 1 and not layout.cuda_graph  # launch/gpu_trial.py's rule
    steps.wrap_ddp([None], config, distributed_optimizer=layout.distributed_optimizer, overlap=overlap)
    printed = steps.DistributedDataParallelConfig(**_evaluate(source["DistributedDataParallelConfig"]))
    assert seen == [printed]


def test_every_kernel_choice_has_a_spec_for_megatron_lm():
    from core.choices import FUSION_CHOICES, NORM_KERNELS
    from kernels import megatron_lm_spec

    names = {ma.spec_name(a, n, s, f, q, w) for a in ATTENTION_KERNELS for n in NORM_KERNELS
             for s in FUSION_CHOICES["swiglu"] for f in FUSION_CHOICES["add_norm"]
             for q in FUSION_CHOICES["qkv_grad"] for w in (False, True) if q == "megatron" or a != "megatron"}
    assert names <= set(vars(megatron_lm_spec))  # Megatron-LM reads vars(module)[NAME]
    assert ma.spec_name("sdpa_cudnn", "triton") == "sdpa_cudnn_attention_triton_norm"  # the names before
    assert ma.spec_name("sdpa", "torch", "triton") == "sdpa_attention_torch_norm_triton_swiglu"
    assert ma.spec_name("sdpa", "torch", add_norm="fused") == "sdpa_attention_torch_norm_fused_add_norm"
    assert (ma.spec_name("sdpa", "torch", "triton", "fused", "fused", wgrad_fusion=True)
            == "sdpa_attention_torch_norm_triton_swiglu_fused_add_norm_fused_qkv_grad_wgrad_fusion")
    # qkv_grad=fused is our RoPE's backward: megatron's attention has no such NAME.
    assert ma.spec_name("megatron", "megatron", qkv_grad="fused") not in vars(megatron_lm_spec)


@pytest.mark.parametrize("qkv_grad", ["megatron", "fused"])
def test_printed_spec_carries_qkv_grad_and_wgrad_fusion(qkv_grad):
    layout = Layout(gbs=8, attention="sdpa_cudnn", norm="triton", qkv_grad=qkv_grad)
    name = flags(layout)["--spec"][1]
    assert name == ma.spec_name("sdpa_cudnn", "triton", qkv_grad=qkv_grad, wgrad_fusion=True)
    assert name.endswith("_fused_qkv_grad_wgrad_fusion" if qkv_grad == "fused" else "_norm_wgrad_fusion")
    notes = ma.megatron_lm_command(MODEL, layout, world_size=1).notes
    assert not any("kernels/rope.py" in n for n in notes)  # qkv_grad carries: no caveat for it


def _args(**change):
    return types.SimpleNamespace(**{"num_layers": 8, "pipeline_model_parallel_size": 2,
                                    "virtual_pipeline_model_parallel_size": None, **change})


def test_layers_per_chunk_is_the_uniform_split():
    from kernels.megatron_lm_spec import layers_per_chunk

    assert layers_per_chunk(_args()) == 4
    assert layers_per_chunk(_args(virtual_pipeline_model_parallel_size=2)) == 2
    assert layers_per_chunk(_args(pipeline_model_parallel_size=1)) == 8
    with pytest.raises(ValueError, match="decoder-first-pipeline-num-layers"):
        layers_per_chunk(_args(decoder_first_pipeline_num_layers=3))
    with pytest.raises(ValueError, match="not divisible"):
        layers_per_chunk(_args(pipeline_model_parallel_size=3))


@pytest.mark.parametrize("attention,norm,swiglu,add_norm,qkv_grad,wgrad_fusion", [
    ("sdpa_cudnn", "triton", "megatron", "megatron", "megatron", False),
    ("megatron", "megatron", "megatron", "megatron", "megatron", True),
    ("triton", "torch", "triton", "fused", "megatron", False),
    ("sdpa_cudnn", "triton", "megatron", "fused", "fused", True)])
def test_spec_resolves_to_the_trials_layers_and_final_norm(attention, norm, swiglu, add_norm, qkv_grad,
                                                           wgrad_fusion, monkeypatch):
    from kernels import megatron_lm_spec

    block = vars(megatron_lm_spec)[ma.spec_name(attention, norm, swiglu, add_norm, qkv_grad, wgrad_fusion)]
    monkeypatch.setattr(megatron_lm_spec, "_megatron_lm_args", lambda: _args(virtual_pipeline_model_parallel_size=2))
    want = layer_spec.layer_spec(attention=attention, norm=norm, rope_base=ma.ROPE_BASE, swiglu=swiglu,
                                 add_norm=add_norm, qkv_grad=qkv_grad, wgrad_fusion=wgrad_fusion)
    assert block.layer_specs == [want] * 2
    assert block.layer_norm == layer_spec.norm_module(norm, wgrad_fusion=wgrad_fusion)
    if wgrad_fusion:  # the four linears are kernels.wgrad's (the spec differs from the unfused one)
        from kernels import wgrad

        unfused = layer_spec.layer_spec(attention=attention, norm=norm, rope_base=ma.ROPE_BASE, swiglu=swiglu,
                                        add_norm=add_norm, qkv_grad=qkv_grad)
        assert want.submodules.self_attention.submodules.linear_qkv is wgrad.ColumnParallelLinear
        assert want != unfused


@pytest.mark.parametrize("gpu_gemm_works", [True, False])
def test_wgrad_fusion_falls_back_where_the_gpu_lacks_the_fp32_gemm(gpu_gemm_works, monkeypatch, capsys):
    from kernels import megatron_lm_spec, wgrad

    name = ma.spec_name("sdpa_cudnn", "triton", "triton", "fused", "fused", wgrad_fusion=True)
    block = vars(megatron_lm_spec)[name]
    monkeypatch.setattr(megatron_lm_spec, "_megatron_lm_args", lambda: _args())
    monkeypatch.setattr(megatron_lm_spec.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(wgrad, "check", lambda device="cuda": gpu_gemm_works)
    megatron_lm_spec.wgrad_fusion_usable.cache_clear()
    try:
        layers, norm = block.layer_specs, block.layer_norm
    finally:
        megatron_lm_spec.wgrad_fusion_usable.cache_clear()
    kwargs = dict(attention="sdpa_cudnn", norm="triton", rope_base=ma.ROPE_BASE, swiglu="triton",
                  add_norm="fused", qkv_grad="fused")
    want = layer_spec.layer_spec(**kwargs, wgrad_fusion=gpu_gemm_works)
    assert layers == [want] * len(layers) and layers
    assert norm == layer_spec.norm_module("triton", wgrad_fusion=gpu_gemm_works)
    assert layer_spec.layer_spec(**kwargs, wgrad_fusion=True) != layer_spec.layer_spec(**kwargs)
    said = capsys.readouterr().err
    assert ("no fp32-output addmm" in said) is (not gpu_gemm_works)


def test_spec_outside_megatron_lm_says_so():
    from kernels import megatron_lm_spec

    with pytest.raises(RuntimeError, match="pretrain_gpt.py --spec"):
        megatron_lm_spec.sdpa_attention_torch_norm.layer_specs
