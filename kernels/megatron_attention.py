"""megatron-core core-attention modules: the project's Triton kernel, flash-attn-4, torch SDPA.

All take what megatron-core 0.16's SelfAttention hands its `core_attention`:
query [s, b, np, hn], key/value [s, b, ng, hn] (np, ng: query and KV heads of this
tensor-parallel rank; the tensors are often strided views of the fused QKV
projection), and return [s, b, np * hn]. They enter a layer through its spec:

    ModuleSpec(module=TritonCoreAttention, params={"rope": True})
    ModuleSpec(module=SDPACoreAttention, params={"backend": "cudnn", "rope": True})
    ModuleSpec(module=FlashAttn4CoreAttention, params={"rope": True})

With `rope=True` the module applies rotary embeddings itself (kernels.rope: one fused
Triton launch for q and k on CUDA) at positions 0..s-1, so the GPTModel must be built
with position_embedding_type="none" (launch/model.py does this); megatron's own RoPE
is several unfused elementwise passes over q and k each way without Transformer Engine.

None keeps state between calls, so megatron's selective recompute (re-running
the forward inside the backward) is safe; it then recomputes the rotation too, and keeps
q and k from before it. Context parallelism and packed sequences are rejected (the
rotation also assumes every sequence sits at positions 0..s-1).
"""

from __future__ import annotations

import math
from typing import Optional

import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from kernels import attention_fa4
from kernels.attention import flash_attention
from kernels.rope import DEFAULT_BASE, apply_rope, apply_rope_qkv

SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")


class _CoreAttention(MegatronModule):
    """What both adapters share: megatron's constructor signature, mask handling and RoPE.

    rope: rotate query and key (kernels.rope, positions 0..s-1, `rope_base`) before
    attending; megatron must then not apply its own (position_embedding_type="none").
    fused_qkv_grad (`layout.qkv_grad=fused`, with rope): the RoPE backward writes dq, dk and
    dv straight into one gradient of the fused QKV projection (kernels.rope.apply_rope_qkv),
    so megatron's split of that projection never concatenates them; where q, k, v are not
    plain views of it (GQA with several query heads per group, recompute) it does nothing.
    `dqkv_target` (None unless kernels/defer_wiring.py sets it, layout.wgrad_defer=step):
    where that gradient goes, the QKV linear's dY arena slot.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, rope: bool = False, rope_base: float = DEFAULT_BASE,
                 fused_qkv_grad: bool = False):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError(
                f"{type(self).__name__} does not support context parallelism "
                f"(context_parallel_size={config.context_parallel_size}); use cp=1"
            )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.dropout_p = (config.attention_dropout if attention_dropout is None
                          else attention_dropout)
        head_dim = config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.rope = rope
        self.rope_base = rope_base
        if fused_qkv_grad and not rope:
            raise ValueError("fused_qkv_grad is the RoPE backward's: it needs rope=True")
        self.fused_qkv_grad = fused_qkv_grad
        self.dqkv_target = None

    def _prepare(self, query, key, value, attention_mask, attn_mask_type, attention_bias,
                 packed_seq_params):
        """What every forward does first: refuse what is unsupported, decide causality,
        and apply RoPE when this module owns it (query and key then come back as fresh
        contiguous [s, b, h, d] tensors). Returns (query, key, value, causal)."""
        self._check_unsupported(attention_bias, packed_seq_params)
        causal = self._is_causal(attention_mask, attn_mask_type)
        if self.rope and self.fused_qkv_grad:
            query, key, value = apply_rope_qkv(query, key, value, base=self.rope_base,
                                               dqkv_target=self.dqkv_target)
        elif self.rope:
            query, key = apply_rope(query, key, base=self.rope_base)
        return query, key, value, causal

    def _is_causal(self, attention_mask, attn_mask_type) -> bool:
        """Causal, or no mask at all; an explicit mask tensor of another kind is refused."""
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type == AttnMaskType.causal:
            return True  # any mask tensor given alongside is the same causal mask
        if attention_mask is None and mask_type in (AttnMaskType.no_mask, AttnMaskType.padding):
            return False
        raise ValueError(
            f"{type(self).__name__} supports causal or unmasked attention, got {mask_type} "
            f"with a mask tensor={attention_mask is not None}"
        )

    def _refuse_dropout(self):
        """For kernels without attention dropout: refuse it rather than drop it silently."""
        if self.dropout_p:
            raise ValueError(
                f"{type(self).__name__} has no attention dropout; set attention_dropout=0.0 "
                f"(got {self.dropout_p})"
            )

    @staticmethod
    def _check_unsupported(attention_bias, packed_seq_params):
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by this core attention")
        if packed_seq_params is not None:
            raise ValueError("packed sequences (packed_seq_params) are not supported")


class TritonCoreAttention(_CoreAttention):
    """Core attention through kernels.attention.flash_attention (fused, no s x s scores)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._refuse_dropout()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """query [s, b, np, hn], key/value [s, b, ng, hn] -> [s, b, np * hn]."""
        query, key, value, causal = self._prepare(query, key, value, attention_mask, attn_mask_type,
                                                  attention_bias, packed_seq_params)
        s, b, heads, head_dim = query.shape
        # [s, b, h, d] -> [b, s, h, d] views; the kernel reads through the strides, and
        # writes its output in [s, b, h, d] memory order so the reshape below is free.
        out = flash_attention(query.permute(1, 0, 2, 3), key.permute(1, 0, 2, 3),
                              value.permute(1, 0, 2, 3), causal=causal,
                              softmax_scale=self.softmax_scale, seq_first_out=True)
        return out.permute(1, 0, 2, 3).reshape(s, b, heads * head_dim)


class FlashAttn4CoreAttention(_CoreAttention):
    """Core attention through flash-attn-4 (kernels.attention_fa4.SeqFirstAttention),
    imported when the module is built: a missing package fails the build with one line,
    never a silent fallback. GQA goes in as is (no KV repeat); q, k, v are passed as strided
    [b, s, h, d] views (unit last stride, 16-byte aligned: flash-attn-4 copies nothing), and
    the kernel writes its output straight into [s, b, hq * d] memory (no copy), or into
    `out_target` (None unless kernels/defer_wiring.py sets it, layout.wgrad_defer=step):
    the attention output linear's input slot."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._refuse_dropout()
        reason = attention_fa4.head_dim_reason(self.config.kv_channels)
        if reason:
            raise ValueError(reason)
        self._attend = attention_fa4.SeqFirstAttention()
        self.out_target = None

    def writes_output_in_place(self) -> bool:
        """Whether `out_target` is honoured (the installed flash-attn-4 takes `out=`)."""
        return self._attend.writes_in_place

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """query [s, b, np, hn], key/value [s, b, ng, hn] -> [s, b, np * hn]."""
        query, key, value, causal = self._prepare(query, key, value, attention_mask, attn_mask_type,
                                                  attention_bias, packed_seq_params)
        return self._attend(query, key, value, softmax_scale=self.softmax_scale, causal=causal,
                            target=self.out_target)


class SDPACoreAttention(_CoreAttention):
    """Core attention through torch's scaled_dot_product_attention.

    backend: "auto" lets torch choose (the math path on CPU: the CPU-safe choice),
    "flash", "cudnn", "efficient" or "math" pins one.
    """

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if backend not in SDPA_BACKENDS:
            raise ValueError(f"SDPA backend must be one of {SDPA_BACKENDS}, got {backend!r}")
        self.backend = backend

    def _backends(self):
        from torch.nn.attention import SDPBackend

        return {
            "flash": [SDPBackend.FLASH_ATTENTION],
            "cudnn": [SDPBackend.CUDNN_ATTENTION],
            "efficient": [SDPBackend.EFFICIENT_ATTENTION],
            "math": [SDPBackend.MATH],
        }[self.backend]

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """query [s, b, np, hn], key/value [s, b, ng, hn] -> [s, b, np * hn]."""
        from torch.nn.attention import sdpa_kernel

        query, key, value, causal = self._prepare(query, key, value, attention_mask, attn_mask_type,
                                                  attention_bias, packed_seq_params)
        s, b, heads, head_dim = query.shape
        # [b, h, s, d] views, no copies: their memory stays in [s, b, h, d] order (query and
        # key contiguous after RoPE, value a strided slice of the fused QKV output). SDPA's
        # flash and cuDNN kernels take any strides with a unit last one.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        group = heads // k.shape[1]
        gqa = {}
        if group > 1:
            if self.backend in ("flash", "math", "auto"):
                gqa = {"enable_gqa": True}
            else:  # cuDNN and mem-efficient take no enable_gqa: repeat the KV heads
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        dropout_p = self.dropout_p if self.training else 0.0

        def attend():
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal,
                                                  scale=self.softmax_scale, **gqa)

        if self.backend == "auto":
            out = attend()
        else:
            with sdpa_kernel(self._backends()):
                out = attend()
        # [b, h, s, d] -> [s, b, h * d]: free when SDPA returned its output in [s, b, h, d]
        # memory order, else one copy. Which backend does which is not measured here.
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * head_dim)
