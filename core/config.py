"""Typed configuration: the model, the cluster, one parallel layout, one trial.

Defaults live here, values in `conf/*.yaml`, overrides on the command line;
Hydra merges them once and `from_dict` turns the result into these objects.
No torch import: the sweeper and the memory model run without it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
import typing
from functools import cache
from typing import Any, Literal, Optional, Union

from core.choices import (
    FUSION_DEFAULTS,
    FUSION_TAGS,
    AddNorm,
    AttentionKernel,
    Device,
    EmbeddingGrad,
    GradBuffer,
    LossKernel,
    NormKernel,
    OptimizerStep,
    Plant,
    QkvGrad,
    Recompute,
    RecomputeMethod,
    SwigluKernel,
    WgradDefer,
)


class ConfigError(ValueError):
    """A configuration value a user must fix; printed as one line."""


@dataclass(kw_only=True)
class ModelConfig:
    """A dense Llama-style decoder: RMSNorm, RoPE, SwiGLU MLP, GQA, untied embeddings."""

    name: str = "tiny"
    num_layers: int = 4
    hidden_size: int = 128
    ffn_hidden_size: int = 352  # SwiGLU inner size (each of the gate and up projections)
    num_attention_heads: int = 4
    num_query_groups: int = 2  # KV heads; equal to num_attention_heads for MHA
    vocab_size: int = 1024
    seq_length: int = 128

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_params(self) -> int:
        """Parameter count N (embedding and output layer included, untied)."""
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        kv = self.num_query_groups * self.head_dim
        attn = h * h + 2 * h * kv + h * h  # q, k, v, output projection
        mlp = 3 * h * f  # gate, up, down
        norms = 2 * h
        return L * (attn + mlp + norms) + 2 * self.vocab_size * h + h

    def validate(self) -> None:
        for f_ in fields(self):
            value = getattr(self, f_.name)
            if isinstance(value, int) and value <= 0:
                raise ConfigError(f"model.{f_.name} must be positive, got {value}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {self.num_query_groups}"
            )


@dataclass(kw_only=True)
class ClusterConfig:
    """Where trials run. Peaks are explicit per device and never guessed from a GPU name."""

    name: str = "local_cpu"
    device: Device = "cpu"  # "cpu" (gloo) or "cuda" (nccl)
    gpus_per_node: int = 2  # ranks per node; on CPU, processes per node
    nodes: int = 1
    gpu_memory_gb: float = 8.0  # usable memory per rank, GiB
    peak_tflops: float = 0.1  # dense bf16 TFLOP/s per device (CPU: nominal fp32 figure)
    intra_node_bw_gbps: float = 10.0  # per-direction bus bandwidth inside a node, GB/s
    inter_node_bw_gbps: float = 10.0  # per-GPU network bandwidth between nodes, GB/s
    # SLURM fields; override them in conf/local/ (gitignored) for your site.
    partition: Optional[str] = None
    account: Optional[str] = None
    time_limit_min: int = 30

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    def validate(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"cluster.device must be 'cpu' or 'cuda', got {self.device!r}")
        for name in ("gpus_per_node", "nodes", "time_limit_min"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"cluster.{name} must be positive, got {getattr(self, name)}")
        for name in ("gpu_memory_gb", "peak_tflops", "intra_node_bw_gbps", "inter_node_bw_gbps"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):  # inf would make every MFU 0.0%
                raise ConfigError(f"cluster.{name} must be a finite positive number, got {value}")


@dataclass(kw_only=True)
class Layout:
    """One point of the search space. DP is derived: world / (tp * pp * cp)."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline stages per rank (interleaved 1F1B); 1 means off
    cp: int = 1
    mbs: int = 1
    gbs: int = 8
    recompute: Recompute = "none"  # none | selective | full
    recompute_method: RecomputeMethod = "uniform"  # full recompute only: uniform | block
    recompute_num_layers: int = 1  # full recompute only
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    attention: AttentionKernel = "sdpa"  # triton | flash_attn | sdpa | sdpa_flash | sdpa_cudnn | megatron
    norm: NormKernel = "torch"  # triton | torch | megatron (stock)
    # Capture each step's forward/backward as one CUDA graph and replay it (GPU, pp = 1):
    # removes host launch overhead where small micro-batches make the step launch-bound.
    cuda_graph: bool = False
    # Fusions between the GEMMs (issue 17); the defaults are megatron-core's own path.
    swiglu: SwigluKernel = "megatron"  # megatron (torch.compile'd) | triton (kernels/swiglu.py)
    loss: LossKernel = "megatron"  # megatron (whole logits, then CE) | fused (kernels/fused_ce.py)
    optimizer_step: OptimizerStep = "megatron"  # megatron | flat (launch/flat_step.py: no per-tensor passes)
    add_norm: AddNorm = "megatron"  # megatron | fused (residual adds + the next RMSNorm: kernels/add_rmsnorm.py)
    qkv_grad: QkvGrad = "megatron"  # megatron (split's backward concatenates dq, dk, dv) | fused (kernels/rope.py)
    # megatron (zero the fp32 grad buffer, GEMMs add) | overwrite (one micro-batch per step:
    # our linears' weight-gradient GEMMs write their gradient, kernels/wgrad.py)
    grad_buffer: GradBuffer = "megatron"
    # megatron (a dense [vocab, hidden] gradient per micro-batch, added by DDP) | fused (the
    # rows of this micro-batch's tokens added into the fp32 main_grad, kernels/embedding.py)
    embedding_grad: EmbeddingGrad = "megatron"
    # off (each micro-batch's weight-gradient GEMM adds into main_grad) | step (the decoder
    # linears' weight gradients once per step from per-micro-batch arenas, kernels/wgrad_defer.py)
    wgrad_defer: WgradDefer = "off"

    @property
    def name(self) -> str:
        """A reproducible trial name: every axis appears, so the name is the layout."""
        parts = [
            f"tp{self.tp}",
            f"pp{self.pp}",
            f"vpp{self.vpp}",
            f"cp{self.cp}",
            f"mbs{self.mbs}",
            f"gbs{self.gbs}",
            f"rc-{self.recompute}",
        ]
        if self.recompute == "full":
            parts.append(f"{self.recompute_method}{self.recompute_num_layers}")
        parts += [
            f"sp{int(self.sequence_parallel)}",
            f"do{int(self.distributed_optimizer)}",
            f"attn-{self.attention}",
            f"norm-{self.norm}",
        ]
        if self.cuda_graph:  # named only when on, so earlier sweeps' names still resume
            parts.append("cg1")
        for axis, default in FUSION_DEFAULTS.items():  # likewise named only when not the default
            if getattr(self, axis) != default:
                parts.append(f"{FUSION_TAGS[axis]}-{getattr(self, axis)}")
        return "_".join(parts)

    def dp(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp * self.cp)

    def num_microbatches(self, world_size: int) -> int:
        return self.gbs // (self.mbs * self.dp(world_size))


@dataclass(kw_only=True)
class TrialConfig:
    """How one trial runs: steps, seed, limits, logging."""

    warmup_steps: int = 2
    measure_steps: int = 3
    seed: int = 1234
    timeout_s: int = 600  # whole trial, start-up included
    lr: float = 1e-4
    wandb: bool = False  # log config and metrics to wandb (offline unless wandb_mode says so)
    wandb_mode: str = "offline"
    wandb_project: str = "layout-sweep"
    profile: bool = False  # record a per-category time breakdown of one measured step
    trace: bool = False  # also export that step's Chrome trace
    # Local runs: hand ranks to processes started (and imported) while the previous trial
    # ran (launch/spare.py). None: on for GPU trials, off on CPU.
    prestart_ranks: Optional[bool] = None
    # Testing aid: a trial whose name contains this string raises on purpose.
    fail_if_name_contains: Optional[str] = None
    # Testing aid: an error planted on purpose so a check can be seen to fail
    # (launch/divergence.py): nan_weights | non_causal | perturb_weight; None is off.
    plant: Optional[Plant] = None
    plant_if_name_contains: Optional[str] = None  # only these trials; None: every trial
    plant_step: int = 1  # nan_weights: the first step whose loss is NaN (counted from 0)
    # Python's garbage collector runs only between steps, never inside a timed one
    # (Megatron-LM's --manual-gc; launch/manual_gc.py). Off: collections when Python decides.
    manual_gc: bool = False


@dataclass(kw_only=True)
class SweepConfig:
    """Sweep-wide policy; the axes themselves are Hydra sweeper params."""

    name: str = "default"
    prune_predicted_oom: bool = True  # skip layouts the memory model says won't fit
    rerun_failed: bool = False  # on resume, re-run trials recorded as error/timeout
    max_trials: Optional[int] = None  # launch only the best N by predicted MFU; None = all
    progress_interval_s: float = 10.0
    calibration: Optional[str] = None  # path to a calibration JSON from an earlier sweep
    # Local launchers: refit the models after every finished trial and skip the layouts
    # the refit predicts out of memory (sweeper.learning); false launches the plan as is.
    learn: bool = True
    dry_run: bool = False  # print the plan (what would launch, in order, and why not the rest); launch nothing
    # SLURM: a job still pending this long after submission is cancelled and recorded
    # `lost: job never started`; a running job gets its time limit plus a minute.
    queue_allowance_s: float = 3600.0
    # SLURM: on resume, cancel jobs an earlier (killed) driver left queued or running and
    # submit those trials again, instead of adopting them (the default).
    cancel_orphans: bool = False


@cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def check_value(cls, name: str, value: Any, key: str) -> Any:
    """The value field `name` of `cls` takes from a config or command-line `value`, or a
    one-line ConfigError naming `key` (e.g. "layout.tp"). The one type check of a config:
    the dataclass's own annotations. int: no bool or float; float: finite, an int is taken
    as one; bool: true/false or 0/1; str: a number is taken as its text (YAML and Hydra
    read `sweep.name=2024` as an int); Literal: one of its values; Optional[X]: None or X;
    dict[str, X]: an object of names, each value checked as X (a prediction's memory terms).
    """
    return _check(_hints(cls)[name], value, key, f"{cls.__name__}.{name}")


def _check(kind, value: Any, key: str, where: str) -> Any:
    if typing.get_origin(kind) is Union:  # Optional[X]
        if value is None:
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key} must be an object of names, got {value!r}")
        item = typing.get_args(kind)[1]
        return {k: _check(item, v, f"{key}.{k}", where) for k, v in value.items()}
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value is False and "off" in choices:  # YAML and Hydra read a bare `off` as false
            return "off"
        if isinstance(value, bool) or value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool:
        if isinstance(value, bool) or (number and value in (0, 1)):
            return bool(value)
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if kind is float:
        if not number:
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if kind is str:
        if isinstance(value, str):
            return value
        if number:
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise TypeError(f"{where}: no check for type {kind!r}")


def _build(cls, data: Optional[dict], prefix: str):
    data = dict(data or {})
    known = [f_.name for f_ in fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown field {prefix}.{unknown[0]} (known: {', '.join(known)})")
    return cls(**{key: check_value(cls, key, value, f"{prefix}.{key}") for key, value in data.items()})


def model_from_dict(data: dict) -> ModelConfig:
    model = _build(ModelConfig, data, "model")
    model.validate()
    return model


def cluster_from_dict(data: dict) -> ClusterConfig:
    cluster = _build(ClusterConfig, data, "cluster")
    cluster.validate()
    return cluster


def layout_from_dict(data: dict) -> Layout:
    return _build(Layout, data, "layout")


def trial_from_dict(data: dict) -> TrialConfig:
    return _build(TrialConfig, data, "trial")


def sweep_from_dict(data: dict) -> SweepConfig:
    return _build(SweepConfig, data, "sweep")


def as_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


@dataclass
class RootConfig:
    """The sections of conf/config.yaml and their defaults (register_configs)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    layout: Layout = field(default_factory=Layout)
    trial: TrialConfig = field(default_factory=TrialConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    # The defaults only, untyped: the dataclasses check the types (check_value) when the
    # command line (launch/cli_checks.py) and the composed config (*_from_dict) reach them;
    # OmegaConf's structured configs would refuse the Literal kernel choices.
    ConfigStore.instance().store(name="schema", node=as_dict(RootConfig()))
