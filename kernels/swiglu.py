"""SwiGLU in Triton, forward and backward, on megatron's packed fc1 output.

    y = silu(a) * b,   [a, b] = chunk(x, 2, dim=-1),   silu(a) = a * sigmoid(a)

x is [..., 2F] (megatron's gated fc1 output: the gate half first, then the linear half,
as `torch.chunk` splits it in megatron.core.transformer.mlp), y is [..., F] in x's dtype.
With s = sigmoid(a) and dy the gradient of y:

    da = dy * b * s * (1 + a * (1 - s))
    db = dy * silu(a)

dx = [da, db] is written as one [..., 2F] tensor, so fc1's backward reads it directly
(megatron's torch.compile'd `bias_swiglu` builds it with a `cat`).

Why a kernel of our own: on an H200 (2026-12-01, llama_1b3 mbs 8) the compiled SwiGLU
took 20 ms of a 0.532 s step, about 1.4x its bytes at the device's copy bandwidth; its
backward kernel was the slow half. Both kernels here are one pass over memory: forward
reads 2F and writes F elements per row, backward reads 3F and writes 2F, all arithmetic
in fp32.

Layers, as in the project's other kernels: `_swiglu_fwd_kernel` / `_swiglu_bwd_kernel`
(a [rows, BLOCK] tile per program on a 2-D grid), host launchers `forward` / `backward`,
`SwiGLUFunction` (autograd) and `swiglu`; `TritonSwiGLU` is the module megatron's MLP
builds as its activation (`MLPSubmodules.activation_func`, `use_te_activation_func`).
`reference` is the float64 formula the tests compare with.

Output targets (`layout.wgrad_defer=step`, kernels/out_target.py): `forward`'s `out` and
`backward`'s `out` are tensors to write y and dx into (None: fresh ones); `swiglu` takes
`y_target` / `dx_target` callables asked at allocation time, which kernels/defer_wiring.py
sets on `TritonSwiGLU` so y lands in FC2's input arena slot and dx in FC1's dY slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import out_target

BLOCK = 1024  # columns per program: 8 bf16 elements per thread at 4 warps


@triton.jit
def _swiglu_fwd_kernel(x_ptr, y_ptr, n_cols, stride_x, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    a = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, x_ptr, dx_ptr, n_cols, stride_dy, stride_x, stride_dx,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    da = dy * b * s * (1.0 + a * (1.0 - s))
    db = dy * a * s
    out = dx_ptr + row * stride_dx + cols
    tl.store(out, da.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(out + n_cols, db.to(dx_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, 2F], contiguous in its last dimension."""
    if x.shape[-1] % 2:
        raise ValueError(f"SwiGLU needs an even last dimension (gate and linear halves), got {x.shape[-1]}")
    return x.reshape(-1, x.shape[-1]) if x.stride(-1) == 1 else x.contiguous().reshape(-1, x.shape[-1])


def out_shape(x: torch.Tensor) -> tuple:
    """y's shape for an input x [..., 2F]: [..., F]."""
    return (*x.shape[:-1], x.shape[-1] // 2)


def forward(x: torch.Tensor, out: torch.Tensor = None) -> torch.Tensor:
    """y = silu(a) * b for x = [a, b] along the last dimension; written into `out` (a
    contiguous tensor of y's shape and x's dtype) when given, and `out` returned."""
    x2 = _rows(x)
    n_rows, n_cols = x2.shape[0], x2.shape[1] // 2
    y = out_target.empty(out, out_shape(x), x.dtype, x.device)
    y2 = y.view(n_rows, n_cols)
    if n_rows:
        _swiglu_fwd_kernel[(n_rows, triton.cdiv(n_cols, BLOCK))](
            x2, y2, n_cols, x2.stride(0), y2.stride(0), BLOCK=BLOCK, num_warps=4)
    return y


def backward(dy: torch.Tensor, x: torch.Tensor, out: torch.Tensor = None) -> torch.Tensor:
    """dx = [da, db] (x's shape and dtype) from dy [..., F] and the saved input x [..., 2F];
    written into `out` (contiguous, x's shape and dtype) when given, and `out` returned."""
    x2 = _rows(x)
    n_rows, n_cols = x2.shape[0], x2.shape[1] // 2
    dy2 = dy.reshape(n_rows, n_cols) if dy.stride(-1) == 1 else dy.contiguous().reshape(n_rows, n_cols)
    dx = out_target.empty(out, x.shape, x.dtype, x.device, "dx")
    dx2 = dx.view(n_rows, 2 * n_cols)
    if n_rows:
        _swiglu_bwd_kernel[(n_rows, triton.cdiv(n_cols, BLOCK))](
            dy2, x2, dx2, n_cols, dy2.stride(0), x2.stride(0), dx2.stride(0), BLOCK=BLOCK, num_warps=4)
    return dx


class SwiGLUFunction(torch.autograd.Function):
    """y = swiglu(x); `y_target` / `dx_target` (kernels.out_target.Target, or None) say
    where y and dx go."""

    @staticmethod
    def forward(ctx, x, y_target=None, dx_target=None):
        ctx.save_for_backward(x)
        ctx.dx_target = dx_target
        return forward(x, out_target.take(y_target, out_shape(x), x.dtype, x.device))

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return backward(dy, x, out_target.take(ctx.dx_target, x.shape, x.dtype, x.device)), None, None


def swiglu(x: torch.Tensor, *, y_target: out_target.Target = None,
           dx_target: out_target.Target = None) -> torch.Tensor:
    """silu(gate) * linear for megatron's packed [..., 2F] fc1 output; differentiable.
    y_target / dx_target: where y and its input gradient go (kernels.out_target)."""
    return SwiGLUFunction.apply(x, y_target, dx_target)


def reference(x: torch.Tensor) -> torch.Tensor:
    """The float64 formula (differentiable, for gradient checks)."""
    a, b = torch.chunk(x.double(), 2, dim=-1)
    return torch.nn.functional.silu(a) * b


class TritonSwiGLU(torch.nn.Module):
    """megatron MLP's activation module: [s, b, 2F] -> [s, b, F] through `swiglu`.

    `y_target` / `dx_target` (None unless kernels/defer_wiring.py sets them): where y (FC2's
    input) and dx (the gradient of FC1's output) go.

    megatron-core 0.16.1 builds `MLPSubmodules.activation_func` and calls it on the whole
    fc1 output only when `config.use_te_activation_func` is set (the name is historical:
    no Transformer Engine is involved), with `bias_activation_fusion` off and no fc1 bias.
    """

    def __init__(self, config=None):
        super().__init__()
        if config is not None:
            if not config.gated_linear_unit or config.activation_func is not torch.nn.functional.silu:
                raise ValueError("TritonSwiGLU is SwiGLU: it needs gated_linear_unit and silu")
            if config.add_bias_linear:
                raise ValueError("TritonSwiGLU takes no fc1 bias (add_bias_linear must be off)")
        self.y_target = self.dx_target = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, y_target=self.y_target, dx_target=self.dx_target)
