"""RMSNorm modules with megatron-core's norm signature `(config, hidden_size, eps)`.

Use them through a layer spec, never by patching megatron:

    ModuleSpec(module=TritonRMSNorm)         # input_layernorm / pre_mlp_layernorm
    TransformerBlockSubmodules(layer_specs=..., layer_norm=TritonRMSNorm)   # final norm

(megatron-core 0.16.1 builds the final norm from `TransformerBlockSubmodules.layer_norm`;
given a bare layer ModuleSpec it falls back to its own LNImpl, so pass block submodules.)

`TritonRMSNorm` runs `kernels.rmsnorm.rms_norm`; `TorchRMSNorm` runs
`torch.nn.functional.rms_norm` with the same parameter, a plain-torch fallback and the
reference the adapter is tested against. Both hold `weight` [hidden_size] (ones) tagged
`weight.sequence_parallel = config.sequence_parallel`: under sequence parallelism each TP
rank normalises its own slice of the sequence, so megatron's `finalize_model_grads` must
sum the weight's gradient over the TP group, and it does so only for parameters carrying
that attribute.

Neither module writes into its input or into its output after returning it: megatron's
selective recompute (`recompute_modules=["layernorm"]`) frees the output's storage and
later copies a recomputed output into it, and keeps the input for that recomputation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.rmsnorm import rms_norm


class _RMSNormBase(torch.nn.Module):
    """Holds the weight and checks the config; subclasses pick the kernel."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        if getattr(config, "normalization", "RMSNorm") != "RMSNorm":
            raise ValueError(f"{type(self).__name__} is an RMSNorm; config.normalization is "
                             f"{config.normalization!r}")
        if getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError(f"{type(self).__name__} does not support zero-centred gamma")
        self.config = config
        self.hidden_size = hidden_size
        self.eps = eps
        dtype = getattr(config, "params_dtype", torch.float32)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class TritonRMSNorm(_RMSNormBase):
    """RMSNorm through the Triton kernels; x [s, b, h] (or any [..., h]) -> same shape.

    With kernels.wgrad's fusion (`wgrad_fusion`, a layer spec param) or megatron's
    (config.gradient_accumulation_fusion) the weight is tagged `fused_main_grad`: its dw
    goes straight into DDP's fp32 `main_grad` (kernels.rmsnorm.RMSNormFunction), as the
    linears' weight gradients do.

    `y_target` / `dx_target` (None unless kernels/defer_wiring.py sets them,
    layout.wgrad_defer=step): where y (the next linear's input) and dx go, e.g. the QKV
    linear's input arena slot. Not under megatron's norm recompute, which frees y's storage."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, wgrad_fusion: bool = False):
        super().__init__(config, hidden_size, eps)
        self.weight.fused_main_grad = bool(wgrad_fusion or getattr(config, "gradient_accumulation_fusion", False))
        self.y_target = self.dx_target = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, eps=self.eps, y_target=self.y_target, dx_target=self.dx_target)


class TorchRMSNorm(_RMSNormBase):
    """RMSNorm through torch.nn.functional.rms_norm; same parameter, same semantics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
