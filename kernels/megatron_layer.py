"""megatron-core's TransformerLayer with the attention's residual add fused into the pre-MLP
norm (`layout.add_norm=fused`, kernels/add_rmsnorm.py).

In training, `FusedAddNormLayer.forward` runs the layer as megatron's own does (input norm,
self-attention, residual add, pre-MLP norm, MLP, residual add) except that the first
residual add and the pre-MLP norm are one kernel, forward and backward; and, once
`link_layers` has told each layer which one follows it, the MLP's residual add and the
next layer's input norm are one kernel too: the layer hands the normalised tensor to its
successor beside its output (`_handoff`), and the successor uses it only if the tensor
it is given is that very output (anything else, such as a pipeline stage's received
tensor, is normalised as usual). Not across layers under recompute: a checkpointed
layer's forward runs without autograd, so the hand-over would carry no gradient.

The norm modules stay where megatron builds them and keep their weights (and the
`sequence_parallel` tags); only their forward is not called where the kernel stands in.
Anything else (evaluation, inference, cross-attention, dropout, norm recompute or
offloading, biases) runs megatron's own forward.

Needs a norm module with `weight` and `eps` (this project's Triton or torch RMSNorm).

Output targets (`layout.wgrad_defer=step`, set by kernels/defer_wiring.py, None otherwise):
`pre_mlp_targets` = (y_target, dh_target) of the attention's add+norm (y is FC1's input, dh
the gradient of the attention output: the attention output linear's dY), `next_norm_targets`
likewise for the MLP's add+norm (y is the next layer's QKV input, dh FC2's dY).
"""

from __future__ import annotations

from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from kernels.add_rmsnorm import add_rms_norm


class FusedAddNormLayer(TransformerLayer):
    def __init__(self, *args, wgrad_fusion: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        # Norm weights the fused kernel differentiates get dw straight into DDP's fp32
        # main_grad, as the linears do: kernels.wgrad's (wgrad_fusion, from the layer spec)
        # or megatron's with Apex (gradient_accumulation_fusion).
        fused = wgrad_fusion or bool(self.config.gradient_accumulation_fusion)
        for norm in (self.input_layernorm, self.pre_mlp_layernorm):
            if hasattr(norm, "weight"):
                norm.weight.fused_main_grad = fused
        self.pre_mlp_targets = self.next_norm_targets = (None, None)

    def _fusable(self, context, inference_context) -> bool:
        return (self.training and context is None and inference_context is None
                and self.fuses_in_training())

    def fuses_in_training(self) -> bool:
        """Whether a training forward (no cross-attention, no inference) runs the fused path:
        the build's part of `_fusable`."""
        config = self.config
        return (config.hidden_dropout == 0.0 and not config.add_bias_linear
                and not self.recompute_input_layernorm and not self.recompute_pre_mlp_layernorm
                and not self.recompute_mlp and not self.offload_attn_norm
                and not self.offload_mlp_norm and not self.is_moe_layer
                and hasattr(self.pre_mlp_layernorm, "weight") and hasattr(self.pre_mlp_layernorm, "eps"))

    def forward(self, hidden_states=None, attention_mask=None, context=None, context_mask=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                rotary_pos_cos_sin=None, attention_bias=None, inference_context=None,
                packed_seq_params=None, sequence_len_offset=None, padding_mask=None, **kwargs):
        if not self._fusable(context, inference_context) or kwargs.get("inference_params") is not None:
            self._handoff = None
            return super().forward(
                hidden_states=hidden_states, attention_mask=attention_mask, context=context,
                context_mask=context_mask, rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias,
                inference_context=inference_context, packed_seq_params=packed_seq_params,
                sequence_len_offset=sequence_len_offset, padding_mask=padding_mask, **kwargs)
        attention_output, attention_bias_out = self.self_attention(
            self._input_norm(hidden_states), attention_mask=attention_mask,
            rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin, rotary_pos_cos_sin=rotary_pos_cos_sin,
            attention_bias=attention_bias, packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset)
        if attention_bias_out is not None:
            raise ValueError("add_norm=fused takes no attention output bias")
        norm = self.pre_mlp_layernorm
        y_target, dh_target = self.pre_mlp_targets
        residual, mlp_input = add_rms_norm(attention_output, hidden_states, norm.weight, eps=norm.eps,
                                           y_target=y_target, dh_target=dh_target)
        mlp_output, mlp_bias = self.mlp(mlp_input, padding_mask=padding_mask)
        if mlp_bias is not None:
            raise ValueError("add_norm=fused takes no MLP output bias")
        successor = self._successor()
        if successor is None:
            output = mlp_output + residual
        else:
            following = successor.input_layernorm
            y_target, dh_target = self.next_norm_targets
            output, normed = add_rms_norm(mlp_output, residual, following.weight, eps=following.eps,
                                          y_target=y_target, dh_target=dh_target)
            successor._handoff = (output, normed)
        # As megatron's layer returns it: a tensor that is not a view (pipeline deallocation).
        output = make_viewless_tensor(inp=output, requires_grad=output.requires_grad, keep_graph=True)
        if successor is not None:
            successor._handoff = (output, successor._handoff[1])
        return output, context

    def _input_norm(self, hidden_states):
        """The input norm of hidden_states: the predecessor's, if it handed over this tensor."""
        handoff, self._handoff = getattr(self, "_handoff", None), None
        if handoff is not None and handoff[0] is hidden_states:
            return handoff[1]
        return self.input_layernorm(hidden_states)

    def _successor(self):
        """The next layer of this chunk, if linked, fusable, and no recompute is configured."""
        successor = self.linked_successor()
        return successor if successor is not None and successor.training else None

    def linked_successor(self):
        """The next layer whose input norm this layer's training forward runs (`_successor`
        without the successor's training mode), or None."""
        successor = getattr(self, "_next_layer", [None])[0]
        if successor is None or self.config.recompute_granularity is not None:
            return None
        if not isinstance(successor, FusedAddNormLayer) or not successor.fuses_in_training():
            return None
        if not (hasattr(successor.input_layernorm, "weight") and hasattr(successor.input_layernorm, "eps")):
            return None
        return successor


def link_layers(layers) -> None:
    """Tell each FusedAddNormLayer of one chunk which layer follows it (held in a list, so
    the successor is not registered as a submodule: its parameters must not appear twice)."""
    layers = list(layers)
    for layer, following in zip(layers, layers[1:] + [None]):
        if isinstance(layer, FusedAddNormLayer):
            layer._next_layer = [following]
