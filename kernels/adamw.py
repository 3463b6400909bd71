"""AdamW over a list of tensors in one Triton launch, writing the bf16 model weights too.

For each fp32 main weight p with gradient g, first and second moments m, v, at step t
(torch.optim.AdamW's formula, decoupled weight decay, no amsgrad):

    g  = g * scale                          (scale: the clip coefficient, a device scalar)
    p  = p * (1 - lr * wd)
    m  = m + (1 - beta1) * (g - m)          (torch's lerp)
    v  = beta2 * v + (1 - beta2) * g^2
    p  = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    w  = bf16(p)                            (the model's copy of the weight)

Why: megatron-core's optimizer without Apex steps torch's Adam and then copies every fp32
main weight into its bf16 model weight; on an H200 (2026-12-01, llama_1b3) torch's fused
Adam ran at 2.8 TB/s (13.5 ms) and the copy took 2.3 ms more. One pass reads g, p, m, v and
writes p, m, v, w: 30 bytes per parameter.

The tensors need not be contiguous with each other: the launcher builds a table of their
addresses and sizes, and each program handles `block` elements of one tensor (found through
a block table), as Apex's multi_tensor_apply does. A block that lies wholly inside its
tensor is loaded without a mask: the sizes come from the table, not from kernel arguments,
so Triton cannot prove a masked access stays inside 16-byte groups and would issue 4-byte
loads; unmasked, with 16-byte-aligned addresses, every access is a 16-byte vector.
`step` is the host entry point; `reference` is the same formula in float64 torch, for the tests.

The block size and warp count are the table's (`TensorTable(..., block=, num_warps=)`);
DEFAULT_BLOCK/DEFAULT_WARPS are the fastest measured on an H200 at llama_1b3's sizes
(benchmarks/diag_step_phases.py, variant `adamw`; benchmarks/results/step_phases_h200_2026-12-01_adamw.json).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# The fastest measured on an H200 (2026-12-01, llama_1b3's 1.36 B parameters, kernel alone,
# 30 bytes/param): 9.98 ms = 4.10 TB/s, 95% of a plain copy's 4.30 TB/s; torch's fused AdamW
# plus the bf16 copy 13.4 ms; this kernel with every block masked (as before) 19.3 ms.
DEFAULT_BLOCK = 2048
DEFAULT_WARPS = 16
_FIELDS = 6  # per tensor: numel, then the addresses of p, g, m, v, w


@triton.jit
def _update(p, g, m, v, scale, beta1, beta2, eps, decay, step_size, bc2_sqrt):
    g = g * scale
    p = p * decay
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
    return p, m, v


@triton.jit
def _adamw_kernel(tensors_ptr, blocks_ptr, scale_ptr, lr, beta1, beta2, eps, decay,
                  step_size, bc2_sqrt, BLOCK: tl.constexpr, HAS_MODEL: tl.constexpr,
                  ALIGNED: tl.constexpr, WHOLE_BLOCKS: tl.constexpr):
    pid = tl.program_id(0)
    index = tl.load(blocks_ptr + 2 * pid)
    start = tl.load(blocks_ptr + 2 * pid + 1)
    row = tensors_ptr + index * 6
    n = tl.load(row)
    p_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    m_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    w_ptr = tl.load(row + 5).to(tl.pointer_type(tl.bfloat16))
    if ALIGNED:  # addresses from a table carry no alignment Triton can see: 16-byte loads
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        w_ptr = tl.multiple_of(w_ptr, 16)
        start = tl.multiple_of(start, BLOCK)
    scale = tl.load(scale_ptr)
    offs = start + tl.arange(0, BLOCK)
    if WHOLE_BLOCKS and start + BLOCK <= n:  # a whole block: no mask, so the accesses vectorize
        p, m, v = _update(tl.load(p_ptr + offs), tl.load(g_ptr + offs), tl.load(m_ptr + offs),
                          tl.load(v_ptr + offs), scale, beta1, beta2, eps, decay, step_size,
                          bc2_sqrt)
        tl.store(p_ptr + offs, p)
        tl.store(m_ptr + offs, m)
        tl.store(v_ptr + offs, v)
        if HAS_MODEL:
            tl.store(w_ptr + offs, p.to(tl.bfloat16))
    else:  # the tensor's last, partial block
        mask = offs < n
        p, m, v = _update(tl.load(p_ptr + offs, mask=mask, other=0.0),
                          tl.load(g_ptr + offs, mask=mask, other=0.0),
                          tl.load(m_ptr + offs, mask=mask, other=0.0),
                          tl.load(v_ptr + offs, mask=mask, other=0.0),
                          scale, beta1, beta2, eps, decay, step_size, bc2_sqrt)
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if HAS_MODEL:
            tl.store(w_ptr + offs, p.to(tl.bfloat16), mask=mask)


class TensorTable:
    """The address and block tables of one list of (p, g, m, v, w) tensors; build once and
    reuse while the tensors keep their storage (`matches` says whether they still do)."""

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, model=None, *,
                 block: int = DEFAULT_BLOCK, num_warps: int = DEFAULT_WARPS,
                 whole_blocks: bool = True):
        if block < 16 or block & (block - 1):
            raise ValueError(f"block must be a power of two >= 16, got {block}")
        # whole_blocks=False masks every block, as the kernel did before (kept to measure it)
        self.block, self.num_warps, self.whole_blocks = block, num_warps, whole_blocks
        lists = [params, grads, exp_avgs, exp_avg_sqs]
        for tensors in lists:
            for t in tensors:
                if t.dtype != torch.float32 or not t.is_contiguous():
                    raise ValueError("AdamW tensors p, g, m, v must be contiguous fp32")
        if model is not None and any(w.dtype != torch.bfloat16 or not w.is_contiguous() for w in model):
            raise ValueError("model weights must be contiguous bf16")
        rows, blocks = [], []
        for i, p in enumerate(params):
            n = p.numel()
            for t in (grads[i], exp_avgs[i], exp_avg_sqs[i]) + ((model[i],) if model is not None else ()):
                if t.numel() != n:
                    raise ValueError(f"tensor {i}: sizes differ ({t.numel()} vs {n})")
            addresses = [p.data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                         exp_avg_sqs[i].data_ptr(), model[i].data_ptr() if model is not None else 0]
            rows.append([n, *addresses])
            blocks += [[i, start] for start in range(0, n, block)]
        device = params[0].device
        self.tensors = torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1)
        self.blocks = torch.tensor(blocks, dtype=torch.int64, device=device).reshape(-1)
        self.num_blocks = len(blocks)
        self.has_model = model is not None
        self.aligned = all(address % 16 == 0 for row in rows for address in row[1:])
        self.key = self._key(lists + ([model] if model is not None else []))
        self._keep = (params, grads, exp_avgs, exp_avg_sqs, model)  # the addresses stay valid

    @staticmethod
    def _key(lists) -> tuple:
        return tuple(t.data_ptr() for tensors in lists for t in tensors)

    def matches(self, params, grads, exp_avgs, exp_avg_sqs, model=None) -> bool:
        lists = [params, grads, exp_avgs, exp_avg_sqs] + ([model] if model is not None else [])
        return self._key(lists) == self.key


def step(table: TensorTable, *, step_count: int, lr: float, beta1: float, beta2: float,
         eps: float, weight_decay: float, scale: torch.Tensor) -> None:
    """One AdamW step (step_count counts from 1) over the table's tensors, in place."""
    if table.num_blocks == 0:
        return
    bc1 = 1.0 - beta1**step_count
    bc2_sqrt = math.sqrt(1.0 - beta2**step_count)
    _adamw_kernel[(table.num_blocks,)](
        table.tensors, table.blocks, scale.reshape(1).float(), lr, beta1, beta2, eps,
        1.0 - lr * weight_decay, lr / bc1, bc2_sqrt, BLOCK=table.block, HAS_MODEL=table.has_model,
        ALIGNED=table.aligned, WHOLE_BLOCKS=table.whole_blocks, num_warps=table.num_warps)


def reference(p, g, m, v, *, step_count, lr, beta1, beta2, eps, weight_decay, scale=1.0):
    """The formula in float64: returns new (p, m, v)."""
    p, g, m, v = (t.double() for t in (p, g, m, v))
    g = g * scale
    p = p * (1 - lr * weight_decay)
    m = m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    p = p - lr / (1 - beta1**step_count) * m / (v.sqrt() / math.sqrt(1 - beta2**step_count) + eps)
    return p, m, v
