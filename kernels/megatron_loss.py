"""megatron-core's GPTModel with the output layer and its loss fused (`layout.loss=fused`).

`FusedLossGPTModel` is GPTModel with one change: in training, given labels, its last
step is `kernels.fused_ce.fused_linear_cross_entropy` over the final hidden states and
the output layer's weight, so the [s, b, V] logits are never materialised. It returns the
micro-batch's mean loss (a 0-d fp32 tensor) where GPTModel returns the per-token loss
[b, s]: the trial's loss function takes the mean of either, so both give the same number.
Everything else (no labels, evaluation, multi-token prediction, tied embeddings) is
GPTModel's own path.

The output layer's parameters stay where megatron puts them (`output_layer.weight`,
tagged for DDP as usual); only its forward is bypassed. With `wgrad_fusion`
(kernels/wgrad.py) or megatron's `gradient_accumulation_fusion` the weight gradient is added
straight into DDP's fp32 `main_grad`, as the linears do. tp = 1 only (the vocabulary is not split).
"""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel

from kernels.fused_ce import fused_linear_cross_entropy


class FusedLossGPTModel(GPTModel):
    def __init__(self, *args, wgrad_fusion: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.tensor_model_parallel_size != 1:
            raise ValueError("loss=fused needs tp = 1 (the fused loss does not split the vocabulary)")
        if self.post_process and self.output_layer.weight is not None:
            # As the linears do: kernels.wgrad's (wgrad_fusion) or megatron's with Apex.
            fused = wgrad_fusion or bool(self.config.gradient_accumulation_fusion)
            self.output_layer.weight.fused_ce_main_grad = fused

    def _fused(self, labels, inference_context, mtp_in_postprocess) -> bool:
        return (labels is not None and self.post_process and self.training
                and inference_context is None and not mtp_in_postprocess
                and self.config.mtp_num_layers is None
                and not self.share_embeddings_and_output_weights)

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args,
                     mtp_in_postprocess=None, inference_context=None, **kwargs):
        if not self._fused(labels, inference_context, mtp_in_postprocess):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args,
                                        mtp_in_postprocess=mtp_in_postprocess,
                                        inference_context=inference_context, **kwargs)
        s, b, h = hidden_states.shape
        # hidden states are [s, b, h], labels [b, s]: flatten both in (s, b) order.
        return fused_linear_cross_entropy(hidden_states.reshape(s * b, h),
                                          self.output_layer.weight,
                                          labels.transpose(0, 1).reshape(s * b))
