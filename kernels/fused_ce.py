"""The output layer and its cross-entropy in one pass over token chunks, logits never whole.

    loss = mean_i ( logsumexp(z_i) - z_i[label_i] ),   z = x @ W^T     (x [N, h], W [V, h])

With p_i = softmax(z_i) and e_i the one-hot label, the gradient of the mean loss is
dz_i = (p_i - e_i) / N, and then dx = dz @ W and dW = dz^T @ x. All of it is computed in
the forward, chunk by chunk (Liger-Kernel's fused linear cross-entropy): for each chunk of
C tokens the GEMM writes z_c (bf16, [C, V]), one Triton kernel turns it into its loss and
overwrites it with dz_c, and two GEMMs give dx_c and accumulate dW (fp32; the first chunk
overwrites, so dW is never zero-filled). The backward only scales what the forward stored
by the incoming gradient (a scalar: the loss is a mean), so nothing is recomputed; except
that with one chunk and DDP's buffer it keeps dz and runs dW's GEMM there, straight into
`main_grad` (no fp32 dW to write and add once per micro-batch).

Why: megatron's path materialises the [s, b, V] logits, their fp32 softmax and the
gradient at once (about 4 GiB per micro-batch of llama_1b3 at mbs 8) and passes over them
several times (torch.compile'd `fused_vocab_parallel_cross_entropy`). Here one chunk lives
at a time and the kernel passes over it three times (max and sum, then gradient).

Numerics: z is bf16 as megatron's output layer writes it; the softmax statistics and the
loss are fp32; dz is rounded to bf16 before its GEMMs, as megatron's backward rounds it.
Every token counts (no ignore index; the trial's data has none). Tensor parallelism of the
vocabulary is not handled (tp = 1; `sweeper.validity` says so).

Layers: `_cross_entropy_kernel` (one row per program, two loops over the vocabulary),
`cross_entropy_rows` (host launcher), `FusedLinearCrossEntropy` (autograd) and
`fused_linear_cross_entropy`. `reference` is the float64 formula the tests compare with.
megatron's output-layer weight is handled as its linears do: with
`gradient_accumulation_fusion` the weight gradient goes straight into `weight.main_grad`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import main_grad as main_grad_rule
from kernels import wgrad

BLOCK = 4096  # vocabulary columns per loop iteration
CHUNK_TOKENS = 4096  # tokens per chunk: a [4096, V] GEMM is large enough to run at full rate


@triton.jit
def _cross_entropy_kernel(z_ptr, labels_ptr, loss_ptr, n_cols, stride_z, scale,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ptr = z_ptr + row * stride_z
    cols = tl.arange(0, BLOCK)
    # Pass 1: running max m and sum d of exp(z - m), one lane per column block position.
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        z = tl.load(ptr + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        # Lanes that have seen only padding keep m = -inf; exp(-inf - -inf) would be NaN.
        alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
        d = d * alpha + tl.where(m_new == float("-inf"), 0.0, tl.exp(z - m_new))
        m = m_new
    m_row = tl.max(m, axis=0)
    d_row = tl.sum(d * tl.where(m == float("-inf"), 0.0, tl.exp(m - m_row)), axis=0)
    lse = m_row + tl.log(d_row)
    label = tl.load(labels_ptr + row).to(tl.int64)
    z_label = tl.load(ptr + label).to(tl.float32)
    tl.store(loss_ptr + row, lse - z_label)
    # Pass 2: dz = (softmax - onehot) * scale, written over z.
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        z = tl.load(ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(z - lse)
        g = tl.where(start + cols == label, g - 1.0, g) * scale
        tl.store(ptr + start + cols, g.to(z_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows(z: torch.Tensor, labels: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Per-row loss (fp32, [rows]) of logits z [rows, V]; z is overwritten with
    (softmax(z) - onehot(labels)) * scale in z's dtype."""
    if z.stride(-1) != 1:
        raise ValueError("cross_entropy_rows needs logits contiguous in the vocabulary dimension")
    loss = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    if z.shape[0]:
        _cross_entropy_kernel[(z.shape[0],)](z, labels, loss, z.shape[1], z.stride(0), scale,
                                             BLOCK=BLOCK, num_warps=8)
    return loss


def _accumulate_wgrad(grad_w: torch.Tensor, dz: torch.Tensor, x: torch.Tensor, *, overwrite: bool = False) -> None:
    """grad_w (fp32, [V, h]) += dz^T @ x, bf16 inputs with an fp32 accumulator and output;
    `overwrite`: grad_w = dz^T @ x (beta 0: its old contents never read, so never zeroed)."""
    beta = 0.0 if overwrite else 1.0
    if grad_w.is_cuda:
        wgrad.wgrad_gemm_accum_fp32(x, dz, grad_w, beta)
    else:  # no fp32-output addmm for bf16 on CPU
        grad_w.addmm_(dz.t().float(), x.float(), beta=beta)


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, chunk_tokens):
        n_tokens = x.shape[0]
        # One chunk and DDP's buffer: dW is left to the backward, one GEMM adding straight into
        # main_grad, instead of an fp32 [V, h] dW written here and added there (at mbs 1 on
        # llama_1b3: 262 MB written and 786 MB of add per micro-batch). dz kept instead of dW
        # is never larger: [N, V] bf16 against [V, h] fp32 for N <= CHUNK_TOKENS = 2 h.
        ctx.deferred = getattr(weight, "fused_ce_main_grad", False) and n_tokens <= chunk_tokens
        grad_x = torch.empty_like(x)
        grad_w = None if ctx.deferred else torch.empty(weight.shape, dtype=torch.float32, device=x.device)
        loss = torch.empty(n_tokens, dtype=torch.float32, device=x.device)
        for start in range(0, n_tokens, chunk_tokens):
            end = min(start + chunk_tokens, n_tokens)
            x_c = x[start:end]
            z = x_c @ weight.t()
            loss[start:end] = cross_entropy_rows(z, labels[start:end], scale=1.0 / n_tokens)
            torch.mm(z, weight, out=grad_x[start:end])
            if not ctx.deferred:
                _accumulate_wgrad(grad_w, z, x_c, overwrite=start == 0)
        ctx.save_for_backward(grad_x, *((x, z) if ctx.deferred else (grad_w,)))
        ctx.weight = weight
        return loss.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, *saved = ctx.saved_tensors
        weight = ctx.weight
        grad_x = grad_x * grad_loss.to(grad_x.dtype)
        if getattr(weight, "fused_ce_main_grad", False):
            # As megatron's linears do under gradient_accumulation_fusion: add into DDP's
            # fp32 buffer and hand autograd a placeholder, so DDP's hook does not add again.
            if ctx.deferred:  # main_grad += dz^T @ (x * grad_loss): x scaled, rounded once
                x, dz = saved
                _accumulate_wgrad(weight.main_grad, dz, (x.float() * grad_loss).to(x.dtype))
            else:
                weight.main_grad.addcmul_(saved[0], grad_loss)
            return grad_x, main_grad_rule.handed_over(weight), None, None
        return grad_x, (saved[0] * grad_loss).to(weight.dtype), None, None


def fused_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Mean cross-entropy of x @ weight^T against labels (0-d fp32); differentiable in x and weight.

    x [N, h] and weight [V, h] in one dtype (bf16 on GPU), labels [N] integer class ids.
    A weight with `fused_ce_main_grad = True` gets its gradient added into `weight.main_grad`.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x [N, h] and weight [V, h] expected, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if labels.shape != x.shape[:1]:
        raise ValueError(f"labels must be [N] = [{x.shape[0]}], got {tuple(labels.shape)}")
    return FusedLinearCrossEntropy.apply(x.contiguous(), weight, labels.contiguous(), chunk_tokens)


def reference(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The float64 formula (differentiable, for gradient checks)."""
    z = x.double() @ weight.double().t()
    return torch.nn.functional.cross_entropy(z, labels, reduction="mean")
