"""What a profiler event's name says about its category: the rules `launch.breakdown` applies.

CATEGORIES is the list a step's time is split into (see launch.breakdown). Here, from a
name alone: whether an event is a collective (`is_comm`), a barrier, a point-to-point
transfer, an operator whose self time is work (`is_op`); `name_category` (attention,
norm, matmul, optimizer, or None: cuDNN/flash/fmha SDPA and our Triton attention kernels,
our Triton RMSNorm kernels and rms/layer norm, GEMMs from cuBLAS (nvjet, sm90_xmma),
CUTLASS and inductor templates, Adam and the multi-tensor gradient norm); and
`kernel_category`, a device kernel's category from its name and its launcher's.
"""

from __future__ import annotations

import re
from typing import Optional

CATEGORIES = ("attention", "matmul", "norm", "elementwise", "optimizer",
              "tp_comm", "dp_comm", "pp_comm", "other", "idle")
COMM = ("tp_comm", "dp_comm", "pp_comm")
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "

# Our Triton and Gluon kernels (kernels/attention_fwd.py, attention_bwd.py, attention_dq*.py,
# attention_gluon_*.py, rmsnorm_kernels.py, rmsnorm_two_pass.py, add_rmsnorm.py) by their
# @triton.jit / @gluon.jit names, which are their CUDA names (older Triton appends a
# signature: _0d1d2de). The residual add fused into RMSNorm counts as norm time.
TRITON_ATTENTION_KERNELS = ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel", "_delta_kernel",
                            "_dq_ds_kernel", "_gluon_attn_fwd_kernel", "_gluon_attn_bwd_kernel")
TRITON_NORM_KERNELS = ("_forward_kernel", "_backward_kernel", "_dw_reduce_kernel",
                       "_forward_chunked_kernel", "_backward_chunked_kernel", "_forward_tma_kernel",
                       "_add_norm_fwd_kernel", "_add_norm_bwd_kernel", "_add_norm_bwd_tiles_kernel",
                       "_forward_two_pass_kernel", "_backward_two_pass_kernel")


def _exactly(names: tuple[str, ...]) -> str:
    return r"^(" + "|".join(names) + r")(_\d\w*)?$"


_ATTENTION = re.compile(r"scaled_dot_product|flash_attention|efficient_attention|cudnn_attention"
                        r"|attn|attention|fmha|flash|sdpa|scaleddotproduct|masked_softmax|"
                        + _exactly(TRITON_ATTENTION_KERNELS), re.I)
_NORM = re.compile(r"rms_?norm|layer_?norm|fusedrms|gammabeta|"
                   r"^triton_(red|per)_fused_\w*(mean|var)\w*rsqrt|" + _exactly(TRITON_NORM_KERNELS), re.I)
_MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
               "aten::linear", "aten::_addmm_activation", "aten::addbmm", "aten::einsum"}
_MATMUL = re.compile(r"^(mm|addmm|bmm|baddbmm|linear|matmul)backward|linearwithgradaccumulation"
                     r"|gemm|gemv|cublas|cutlass|sm\d+_xmma|nvjet|^triton_tem_fused_(\w*_)?(mm|addmm|bmm)(_|$)",
                     re.I)
# Adam, torch's fused optimizers, and the multi-tensor norms of gradient clipping (_foreach_norm)
_OPTIMIZER = re.compile(r"adam|fusedoptimizer|multi_tensor_apply_kernel.*(l2|lp)normfunctor|lpnorm_cleanup", re.I)
_COMM = re.compile(r"^(c10d::|gloo:|nccl:|record_param_comms)|nccl(dev)?kernel", re.I)
_P2P = re.compile(r"send|recv", re.I)
_BARRIER = re.compile(r"barrier", re.I)


def is_comm(name: str) -> bool:
    return bool(_COMM.search(name))


def is_barrier(name: str) -> bool:
    return bool(_BARRIER.search(name))


def is_p2p(name: str) -> bool:
    """A point-to-point transfer (pipeline send/recv)."""
    return bool(_P2P.search(name))


def is_op(name: str) -> bool:
    """An operator whose self time is work, not Python or waiting."""
    return name.startswith(("aten::", "c10d::", "gloo:", "nccl:"))


def name_category(name: str) -> Optional[str]:
    """attention, norm, matmul or optimizer from an op or kernel name alone; None otherwise."""
    if _ATTENTION.search(name):
        return "attention"
    if _NORM.search(name):
        return "norm"
    if name in _MATMUL_OPS or _MATMUL.search(name.removeprefix(BACKWARD_PREFIX)):
        return "matmul"
    if _OPTIMIZER.search(name):
        return "optimizer"
    return None


def kernel_category(name: str, launcher: Optional[str]) -> str:
    """A device event's category from its name and its launcher's category (None: unknown)."""
    if is_comm(name):
        if launcher in COMM + ("idle",):
            return launcher
        return "pp_comm" if is_p2p(name) else "tp_comm"
    if launcher not in (None, "elementwise", "other"):
        return launcher
    return name_category(name) or "elementwise"
