"""A trial whose loss or gradient norm is not finite ends `diverged`, at the step it happened.

A NaN loss still makes a fast step, so without this check a diverged trial is `ok`
and can rank first. Both step loops (launch/cpu_trial.py, launch/gpu_trial.py) hold a
`StepGuard` and call `after_step` once per measured step; it raises `Diverged`, which
`launch.record.classify` turns into the status `diverged`.

The guard also plants errors on purpose, so the checks can be shown to fail
(`trial.plant`, for the trials whose name contains `trial.plant_if_name_contains`):
- "nan_weights": one weight of every model chunk becomes NaN after step
  `trial.plant_step - 1`, so step `trial.plant_step` diverges through the real model;
- "non_causal": attention sees later tokens (a wrong mask); loss parity must FAIL it;
- "perturb_weight": every chunk's first MLP output weight is scaled by (1 + PERTURBATION)
  before training; loss parity must FAIL it.

No torch import at module level: `launch.record` imports `Diverged`.
"""

from __future__ import annotations

import math
from typing import Optional

from core.choices import PLANTS
from core.config import ConfigError

# Relative scale of the planted weight error: 4x bf16's unit roundoff (2^-8 relative
# spacing, so a bf16 weight really changes), small enough that a loss curve hides it.
PERTURBATION = 2.0**-6


class Diverged(RuntimeError):
    """A non-finite loss or gradient norm; `record` goes into the rank's record."""

    status = "diverged"

    def __init__(self, step: int, quantity: str, value: float, losses: list):
        super().__init__(f"{quantity} is {value} at step {step}")
        self.record = {"diverged_step": step, "losses": losses}


def first_non_finite(**values) -> Optional[tuple[str, float]]:
    """(name, value) of the first given value that is not a finite number; None skips a value."""
    for name, value in values.items():
        if value is not None and not math.isfinite(float(value)):
            return name, float(value)
    return None


def planted(trial, name: str) -> Optional[str]:
    """The error planted in this trial, or None."""
    if trial.plant is None:
        return None
    if trial.plant not in PLANTS:
        raise ConfigError(f"trial.plant must be one of {', '.join(PLANTS)}, got {trial.plant!r}")
    wanted = trial.plant_if_name_contains
    return trial.plant if wanted is None or wanted in name else None


def _first_weight(chunk):
    """The first MLP output projection (a plain weight: scaling it is not undone by a norm)."""
    named = [(n, p) for n, p in chunk.named_parameters() if p.dim() >= 2]
    return next((p for n, p in named if n.endswith("mlp.linear_fc2.weight")), named[0][1])


def make_non_causal(chunks) -> int:
    """Every causal attention module of the chunks masks nothing; returns how many changed."""
    from megatron.core.transformer.enums import AttnMaskType

    changed = 0
    for chunk in chunks:
        for module in chunk.modules():
            if getattr(module, "attn_mask_type", None) == AttnMaskType.causal:
                module.attn_mask_type = AttnMaskType.no_mask
                changed += 1
    return changed


class StepGuard:
    """Checks every measured step of one rank, and plants `trial.plant` in its model chunks."""

    def __init__(self, spec, chunks: list):
        self.chunks = chunks
        self.losses: list = []  # per measured step; None where this rank has no loss
        self.grad_norms: list = []  # per measured step, where the loop gives one
        self.plant = planted(spec.trial, spec.name)
        self.plant_step = spec.trial.plant_step
        if self.plant == "non_causal" and not make_non_causal(chunks):
            raise RuntimeError("trial.plant=non_causal found no causal attention module")
        if self.plant == "perturb_weight":
            self._fill(lambda w: w.mul_(1 + PERTURBATION))

    def _fill(self, change) -> None:
        import torch

        with torch.no_grad():
            for chunk in self.chunks:
                change(_first_weight(chunk))

    def _local_grads_sum(self) -> float:
        """Sum of this rank's gradients (megatron DDP's `main_grad` where it has one): finite
        exactly when every one is. A NaN anywhere reaches every stage's gradients through
        the forward and backward, so every rank stops at the same step."""
        import torch

        total = torch.zeros((), dtype=torch.float64)
        for chunk in self.chunks:
            for p in chunk.parameters():
                grad = getattr(p, "main_grad", None)
                grad = p.grad if grad is None else grad
                if grad is not None:
                    total += grad.detach().double().abs().sum()
        return float(total)

    def after_step(self, step: int, *, loss: Optional[float] = None,
                   grad_norm: Optional[float] = None, local_grads: bool = False) -> None:
        """Raise `Diverged` if this step's loss or gradient norm is not finite.

        local_grads: also check this rank's own gradients (where the loop has no global
        gradient norm, and a pipeline stage without the loss must stop too).
        """
        self.losses.append(None if loss is None or not math.isfinite(loss) else loss)
        if grad_norm is not None:
            self.grad_norms.append(float(grad_norm))
        bad = first_non_finite(loss=loss, grad_norm=grad_norm,
                               local_gradients=self._local_grads_sum() if local_grads else None)
        if bad:
            raise Diverged(step, bad[0], bad[1], self.losses)
        if self.plant == "nan_weights" and step == self.plant_step - 1:
            self._fill(lambda w: w.fill_(float("nan")))

    def record(self) -> dict:
        """What the rank record adds: the gradient norms, where recorded (loss parity uses them)."""
        return {"grad_norms": self.grad_norms} if self.grad_norms else {}
