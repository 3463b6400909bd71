"""A layout as Megatron-LM and megatron-core take it: the one mapping, for every output format.

    cmd = megatron_lm_command(model, layout, world_size=8)
    print(cmd.shell())            # export lines, comments, then `pretrain_gpt.py ARGS`
    megatron_core_text(model, layout, world_size=8)   # TransformerConfig(...) and friends

The target is Megatron-LM tag core_v0.16.1 (the tag of our megatron-core 0.16.1) without
Transformer Engine or Apex, as `../shared/megatron_lm/` runs it. What it needs, found with
that folder's `check_args.py` (parse_args + validate_args) and `run.sh`:
- `--transformer-impl local` and four defaults off (`--no-rope-fusion`,
  `--no-gradient-accumulation-fusion`, `--no-masked-softmax-fusion`, `--no-persist-layer-norm`);
- `CUDA_DEVICE_MAX_CONNECTIONS=1` when tp > 1 or cp > 1 (validate_args asserts it before
  Blackwell; it is harmless after);
- virtual pipeline as `--num-virtual-stages-per-pipeline-rank N`;
- NullTokenizer adds one token (EOD), so `--vocab-size V-1` builds V rows, and the padding
  multiple (`--make-vocab-size-divisible-by d`, times tp) must divide V so no row is added;
- the kernels through `--spec kernels.megatron_lm_spec NAME` (that module's docstring), with
  this repository on PYTHONPATH. Our attention kernels apply RoPE themselves, so with them
  Megatron-LM's own RoPE is off (`--position-embedding-type none`), as in our trials. NAME
  always ends in `_wgrad_fusion`: every GPU trial runs kernels/wgrad.py's linears (where
  kernels.wgrad.available("cuda")), and Megatron-LM, which needs CUDA, takes them through the
  spec with megatron-core's own DDP; Megatron-LM's --gradient-accumulation-fusion stays off.

What the trials set is read from `launch/model.py` (TransformerConfig, GPTModel) and
`launch/gpu_trial.py` (DDP, optimizer); tests/analysis/test_megatron_args.py holds the
megatron-core text against them field by field.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.choices import spec_name
from core.config import ConfigError, Layout, ModelConfig
from core.paths import REPO_ROOT
from sweeper.validity import invalid_reason

SPEC_MODULE = "kernels.megatron_lm_spec"
ROPE_BASE = 10000  # launch/model.py's ROPE_BASE (kernels.rope.DEFAULT_BASE); a test holds them equal
NORM_EPS = 1e-5  # launch/model.py's layernorm_epsilon
MAX_VOCAB_DIVISOR = 128  # Megatron-LM's default --make-vocab-size-divisible-by
TRIAL_LR = 1e-4  # core.config.TrialConfig.lr's default; a test holds them equal
TRAIN_ITERS = 100  # a placeholder length: set your own
# Every Layout field this module maps (a test fails when Layout gains one it does not).
MAPPED_LAYOUT_FIELDS = frozenset({
    "tp", "pp", "vpp", "cp", "mbs", "gbs", "recompute", "recompute_method", "recompute_num_layers",
    "sequence_parallel", "distributed_optimizer", "attention", "norm", "cuda_graph",
    "swiglu", "loss", "optimizer_step", "add_norm", "qkv_grad", "grad_buffer", "embedding_grad",
    "wgrad_defer"})
OUR_ROPE_ATTENTION = ("triton", "sdpa", "sdpa_flash", "sdpa_cudnn", "flash_attn")


@dataclass(kw_only=True)
class MegatronLMCommand:
    """What a Megatron-LM run of one layout needs: environment, arguments, caveats."""

    env: dict[str, str]  # NAME -> shell value, printed as `export NAME=VALUE`
    args: list[str]  # pretrain_gpt.py's arguments, one token each
    notes: list[str] = field(default_factory=list)  # what the sweep used that Megatron-LM cannot take

    def line(self) -> str:
        return "pretrain_gpt.py " + shlex.join(self.args)

    def shell(self) -> str:
        """Comment lines, export lines, then the command: pasteable into a job script."""
        lines = [f"# {note}" for note in self.notes]
        lines += [f"export {name}={value}" for name, value in self.env.items()]
        return "\n".join(lines + [self.line()])

    def as_dict(self) -> dict:
        return {**asdict(self), "command": self.line()}


def applies_rope(attention: str) -> bool:
    """Our attention kernels rotate q and k themselves (kernels.layer_spec.applies_rope,
    repeated here so this module needs no torch; a test holds them equal)."""
    return attention in OUR_ROPE_ATTENTION


def vocab_divisor(vocab_size: int, tp: int) -> int:
    """The largest power of two d <= 128 with d * tp dividing vocab_size: Megatron-LM pads
    the vocabulary to a multiple of d * tp, and with this d it adds no row."""
    if vocab_size % tp:
        raise ConfigError(f"vocab_size {vocab_size} is not divisible by tp {tp}: Megatron-LM "
                          f"would pad the embedding to more rows than the sweep trained")
    d = MAX_VOCAB_DIVISOR
    while vocab_size % (d * tp):
        d //= 2
    return d


def _check(model: ModelConfig, layout: Layout, world_size: int) -> None:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size <= 0:
        raise ConfigError(f"world size must be a positive integer, got {world_size!r}")
    reason = invalid_reason(model, layout, world_size)
    if reason:
        raise ConfigError(f"layout {layout.name} cannot run on {world_size} GPUs: {reason}")


def _model_args(model: ModelConfig, layout: Layout) -> list[str]:
    rope = not applies_rope(layout.attention)
    args = ["--num-layers", model.num_layers, "--hidden-size", model.hidden_size,
            "--ffn-hidden-size", model.ffn_hidden_size,
            "--num-attention-heads", model.num_attention_heads,
            "--group-query-attention", "--num-query-groups", model.num_query_groups,
            "--kv-channels", model.head_dim,
            "--seq-length", model.seq_length, "--max-position-embeddings", model.seq_length,
            "--normalization", "RMSNorm", "--norm-epsilon", NORM_EPS, "--swiglu",
            "--disable-bias-linear", "--untie-embeddings-and-output-weights",
            "--attention-dropout", 0.0, "--hidden-dropout", 0.0,
            "--position-embedding-type", "rope" if rope else "none"]
    if rope:
        args += ["--rotary-base", ROPE_BASE]
    return args


def _data_args(model: ModelConfig, layout: Layout) -> list[str]:
    # The trials' batches carry no attention mask (the causal mask is built in-model).
    return ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", model.vocab_size - 1,
            "--make-vocab-size-divisible-by", vocab_divisor(model.vocab_size, layout.tp),
            "--no-create-attention-mask-in-dataloader"]


def _schedule_args() -> list[str]:
    # pretrain_gpt.py needs a length; the rate is the trials' (trial.lr, constant).
    return ["--train-iters", TRAIN_ITERS, "--lr", TRIAL_LR, "--lr-decay-style", "constant"]


def _layout_args(layout: Layout, world_size: int) -> list[str]:
    args = ["--tensor-model-parallel-size", layout.tp, "--pipeline-model-parallel-size", layout.pp]
    if layout.vpp > 1:
        args += ["--num-virtual-stages-per-pipeline-rank", layout.vpp]
    args += ["--context-parallel-size", layout.cp,
             "--micro-batch-size", layout.mbs, "--global-batch-size", layout.gbs]
    if layout.sequence_parallel:
        args.append("--sequence-parallel")
    if layout.distributed_optimizer:
        args.append("--use-distributed-optimizer")
    if layout.recompute == "selective":
        args += ["--recompute-granularity", "selective", "--recompute-modules", "core_attn"]
    elif layout.recompute == "full":
        args += ["--recompute-granularity", "full", "--recompute-method", layout.recompute_method,
                 "--recompute-num-layers", layout.recompute_num_layers]
    if layout.dp(world_size) > 1:
        args.append("--overlap-grad-reduce")  # as the eager trials do (launch/gpu_trial.py)
    return args


def _kernel_args(layout: Layout) -> list[str]:
    args = ["--bf16", "--accumulate-allreduce-grads-in-fp32",
            "--transformer-impl", "local", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
            "--no-masked-softmax-fusion", "--no-persist-layer-norm",
            "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "native",
            "--spec", SPEC_MODULE, spec_name(layout.attention, layout.norm, layout.swiglu, layout.add_norm,
                                             layout.qkv_grad, wgrad_fusion=True)]
    if layout.swiglu == "triton":
        # megatron's MLP calls a spec'd activation module only with this flag (launch/model.py).
        args += ["--use-te-activation-func", "--no-bias-swiglu-fusion"]
    return args


def _env(layout: Layout, repo_root: Path) -> dict[str, str]:
    env = {}
    if layout.tp > 1 or layout.cp > 1:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    env["PYTHONPATH"] = shlex.quote(str(repo_root)) + "${PYTHONPATH:+:$PYTHONPATH}"
    return env


def _notes(layout: Layout, world_size: int) -> list[str]:
    notes = []
    if layout.cuda_graph:
        overlap = ", with the gradient reduction overlapped (--overlap-grad-reduce), which a captured " \
            "graph cannot do" if layout.dp(world_size) > 1 else ""
        notes.append("our trials capture each micro-batch's forward+backward as one CUDA graph "
                     "(launch/step_graph.py); Megatron-LM has no such setting, so this runs eager"
                     f"{overlap}; Megatron-LM's nearest, --cuda-graph-impl local, graphs each layer")
    if layout.loss == "fused":
        notes.append("our trials fuse the output layer with its loss (kernels/megatron_loss.py, its own "
                     "GPTModel class); Megatron-LM builds its GPTModel, so this runs megatron-core's "
                     "native fused cross-entropy (--cross-entropy-loss-fusion)")
    if layout.add_norm == "fused":
        notes.append("our trials also fuse each layer's MLP residual add with the next layer's input norm "
                     "(kernels.megatron_layer.link_layers, after the model is built); Megatron-LM builds the "
                     "model itself, so only the spec's in-layer add + pre-MLP norm is fused")
    if layout.grad_buffer == "overwrite":
        notes.append("our trials skip zeroing the linears' fp32 gradients at one micro-batch per step "
                     "(their weight-gradient GEMMs overwrite them, kernels/wgrad.py); Megatron-LM zeroes "
                     "its whole gradient buffer every step")
    if layout.wgrad_defer == "step":
        notes.append("our trials compute the decoder linears' weight gradients once per step from "
                     "per-micro-batch arenas (kernels/wgrad_defer.py, attached after the DDP wrap); "
                     "Megatron-LM computes them every micro-batch")
    if layout.embedding_grad == "fused":
        notes.append("our trials add the word embedding's gradient rows straight into its fp32 gradient "
                     "(kernels/embedding.py, given to the model after the build); Megatron-LM builds the "
                     "model itself, so its embedding makes a dense gradient that DDP adds")
    if layout.optimizer_step == "flat":
        notes.append("our trials' optimizer step skips megatron's per-tensor passes (launch/flat_step.py); "
                     "Megatron-LM has no such setting, so this runs megatron's own step")
    output = "the fused loss adds the output layer's" if layout.loss == "fused" else \
        "kernels.wgrad.fuse_output_layer swaps in the output layer's"
    notes.append("the layers' weight-gradient GEMMs accumulate into DDP's fp32 main_grad through the spec "
                 "(_wgrad_fusion, kernels/wgrad.py, as on every GPU trial; --gradient-accumulation-fusion "
                 "stays off: Megatron-LM's means Apex); GPTModel builds the output layer from megatron's "
                 f"class, so here DDP adds its bf16 gradient (in our trials {output} after the build)")
    notes.append("our trials step torch's fused Adam (launch/gpu_trial.py); Megatron-LM without Apex or "
                 "Transformer Engine steps torch's multi-tensor AdamW, and no flag changes that")
    notes.append("--mock-data and NullTokenizer stand in for the trials' synthetic tokens; for real data give "
                 "--data-path and your tokenizer, and keep the embedding at "
                 "the model's vocab_size rows; --train-iters is a placeholder")
    return notes


def megatron_lm_command(model: ModelConfig, layout: Layout, *, world_size: int,
                        repo_root: Path = REPO_ROOT) -> MegatronLMCommand:
    """The Megatron-LM pretrain_gpt.py run of this layout; ConfigError if it cannot run."""
    _check(model, layout, world_size)
    args = (_model_args(model, layout) + _data_args(model, layout) + _schedule_args()
            + _layout_args(layout, world_size) + _kernel_args(layout))
    return MegatronLMCommand(env=_env(layout, repo_root), args=[str(a) for a in args],
                             notes=_notes(layout, world_size))


def megatron_core_kwargs(model: ModelConfig, layout: Layout, *, world_size: int) -> dict[str, dict[str, str]]:
    """The megatron-core objects a GPU trial builds, as {class: {field: Python source}}.

    Mirrors launch.model.transformer_config(device="cuda"), launch.model.build_model and
    launch.gpu_trial's DDP and optimizer; the test evaluates this source against them.
    """
    _check(model, layout, world_size)
    interleaved = layout.pp > 1 and layout.vpp > 1
    recompute = {}
    if layout.recompute == "selective":
        recompute = {"recompute_granularity": "'selective'", "recompute_modules": "['core_attn']"}
    elif layout.recompute == "full":
        recompute = {"recompute_granularity": "'full'", "recompute_method": repr(layout.recompute_method),
                     "recompute_num_layers": str(layout.recompute_num_layers)}
    config = {
        "num_layers": model.num_layers, "hidden_size": model.hidden_size,
        "ffn_hidden_size": model.ffn_hidden_size, "num_attention_heads": model.num_attention_heads,
        "num_query_groups": model.num_query_groups, "kv_channels": model.head_dim,
        "normalization": "'RMSNorm'", "layernorm_epsilon": NORM_EPS, "gated_linear_unit": True,
        "activation_func": "torch.nn.functional.silu", "add_bias_linear": False,
        "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "tensor_model_parallel_size": layout.tp, "pipeline_model_parallel_size": layout.pp,
        "virtual_pipeline_model_parallel_size": layout.vpp if layout.vpp > 1 else None,
        "context_parallel_size": layout.cp, "sequence_parallel": layout.sequence_parallel,
        "params_dtype": "torch.bfloat16", "pipeline_dtype": "torch.bfloat16", "bf16": True,
        "bias_activation_fusion": layout.swiglu == "megatron",
        "use_te_activation_func": layout.swiglu == "triton", "bias_dropout_fusion": True,
        "cross_entropy_loss_fusion": True, "cross_entropy_fusion_impl": "'native'",
        "masked_softmax_fusion": False, "persist_layer_norm": False, "apply_rope_fusion": False,
        # megatron's flag means Apex's extension; the trials' own linears fuse instead
        # (block_spec's wgrad_fusion, kernels/wgrad.py).
        "gradient_accumulation_fusion": False,
        # launch.steps.p2p_settings on GPU: interleaving overlaps p2p and never batches it.
        "batch_p2p_comm": not interleaved, "overlap_p2p_comm": interleaved,
        "deallocate_pipeline_outputs": True, **recompute,
    }
    rope = "'none'" if applies_rope(layout.attention) else "'rope'"
    gpt = {"config": "config",
           "transformer_layer_spec": (f"kernels.layer_spec.block_spec(config, attention={layout.attention!r}, "
                                      f"norm={layout.norm!r}, rope_base={ROPE_BASE}, swiglu={layout.swiglu!r}, "
                                      f"add_norm={layout.add_norm!r}, qkv_grad={layout.qkv_grad!r}, "
                                      "wgrad_fusion=True)"),
           "vocab_size": model.vocab_size, "max_sequence_length": model.seq_length,
           "parallel_output": True, "share_embeddings_and_output_weights": False,
           "position_embedding_type": rope, "rotary_base": ROPE_BASE}
    # A captured graph holds no asynchronous collective, so the trials overlap only eager steps.
    overlap = layout.dp(world_size) > 1 and not layout.cuda_graph
    ddp = {"grad_reduce_in_fp32": True, "overlap_grad_reduce": overlap,
           "use_distributed_optimizer": layout.distributed_optimizer}
    optimizer = {"optimizer": "'adam'", "lr": TRIAL_LR, "bf16": True, "params_dtype": "torch.bfloat16",
                 "use_distributed_optimizer": layout.distributed_optimizer}
    as_source = lambda d: {k: str(v) for k, v in d.items()}  # noqa: E731 - True, None, 1e-05 read back as Python
    model_class = "kernels.megatron_loss.FusedLossGPTModel" if layout.loss == "fused" else "GPTModel"
    if layout.loss == "fused":
        gpt["wgrad_fusion"] = True
    return {"TransformerConfig": as_source(config), model_class: as_source(gpt),
            "DistributedDataParallelConfig": as_source(ddp), "OptimizerConfig": as_source(optimizer)}


def megatron_core_text(model: ModelConfig, layout: Layout, *, world_size: int) -> list[str]:
    """One `Class(field=value, ...)` line per object, in the order a trial builds them."""
    lines = [f"{name}({', '.join(f'{k}={v}' for k, v in fields_.items())})"
             for name, fields_ in megatron_core_kwargs(model, layout, world_size=world_size).items()]
    after_build = ["kernels.wgrad.fuse_output_layer(model.output_layer)  # after the build"]
    if layout.add_norm == "fused":
        after_build.append("kernels.megatron_layer.link_layers(model.decoder.layers)  # add_norm=fused, after the build")
    if layout.embedding_grad == "fused":
        after_build.append("kernels.embedding.fuse_word_embeddings(model.embedding.word_embeddings)  "
                           "# embedding_grad=fused, after the build")
    lines[2:2] = after_build
    lines.append("(lr is the trials' trial.lr default; wgrad_fusion=True where kernels.wgrad.available('cuda'), "
                 "as on every GPU trial so far; the trials step torch's fused Adam: launch/gpu_trial.py)")
    return lines
