"""Link the producers of the decoder linears' X and dY to their arenas (`layout.wgrad_defer=step`).

kernels/wgrad_defer.py gives each decoder linear an arena with one slot per micro-batch for
its input X and its output gradient dY; the linear copies into the slot whatever arrives
elsewhere. `wire(chunk)`, called right after `wgrad_defer.attach`, lets the kernels that
produce those tensors write them into the slot instead (kernels/out_target.py), where the
very tensor they return is what reaches the linear (same memory, megatron-core 0.16.1):

    producer (module)                                  writes              consumer
    input norm (TritonRMSNorm) forward y               QKV's X             layer's linear_qkv
    RoPE backward's fused QKV gradient (core attn.)    QKV's dY            layer's linear_qkv
    flash-attn-4 core attention forward output         proj's X            layer's linear_proj
    pre-MLP add+norm (FusedAddNormLayer) forward y     FC1's X             layer's linear_fc1
        backward dh (= the attention output's grad)    proj's dY           layer's linear_proj
    pre-MLP norm (TritonRMSNorm, stock layer) y        FC1's X             layer's linear_fc1
    SwiGLU (TritonSwiGLU) forward y                    FC2's X             layer's linear_fc2
        backward dx (the gradient of FC1's output)     FC1's dY            layer's linear_fc1
    MLP add + next input norm (FusedAddNormLayer) y    next QKV's X        next layer's linear_qkv
        backward dh (= the MLP output's gradient)      FC2's dY            layer's linear_fc2
    final norm (TritonRMSNorm) backward dx             last FC2's dY       last layer's linear_fc2

The attention output (proj's X) is copied unless flash-attn-4 writes it (SDPA's and our
Triton kernel's outputs are their own allocations), and not where megatron changes it on
the way (an output gate, fine-grained offloading, a checkpointed core attention). What
else is not wired, and why (the linear then copies, correctly): the stock layer's residual adds (megatron's bias-dropout-add
and autograd's sum of the residual gradients make new tensors: proj's and FC2's dY), RoPE's
unfused backward (megatron's split concatenates dq, dk, dv), torch norms, and anything under
recompute or activation offloading (megatron's norm recompute frees the norm output's
storage, which would be the arena's; a checkpointed forward produces its tensors twice).
A producer is never wired where its output might not reach the linear: the linear's copy
into the slot would overwrite the producer's tensor while others may still read it.

Producers hold `functools.partial(wgrad_defer.input_target | grad_target, weight)`; the
arena's current slot is looked up at allocation time, so a CUDA-graph capture of micro-batch
i bakes in slot i. With no Deferral attached `wire` changes nothing.
"""

from __future__ import annotations

import functools

from megatron.core.transformer.transformer_block import TransformerBlock

from kernels import wgrad_defer
from kernels.megatron_attention import FlashAttn4CoreAttention, _CoreAttention
from kernels.megatron_layer import FusedAddNormLayer
from kernels.megatron_norm import TritonRMSNorm
from kernels.swiglu import TritonSwiGLU


def _into(weight, which: str):
    """The Target for `weight`'s arena (its X or its dY slot), or None when it has no arena."""
    if getattr(weight, wgrad_defer.ATTR, None) is None:
        return None
    return functools.partial(wgrad_defer.input_target if which == "x" else wgrad_defer.grad_target, weight)


class _Links:
    """The links made, as (producer, consumer) names: wire's report, read by the tests."""

    def __init__(self):
        self.made: list[tuple[str, str]] = []

    def set(self, module, attr: str, targets: tuple, names: tuple) -> None:
        """module.attr = targets (one Target, or a tuple of them for a module attribute that
        holds a pair) if any is not None; names: (producer, consumer) per target."""
        single = not isinstance(targets, tuple)
        targets, names = ((targets,), (names,)) if single else (targets, names)
        if all(t is None for t in targets):
            return
        setattr(module, attr, targets[0] if single else targets)
        self.made += [n for t, n in zip(targets, names) if t is not None]


def _norm_ok(norm, recomputed: bool, offloaded: bool) -> bool:
    return isinstance(norm, TritonRMSNorm) and not recomputed and not offloaded


def _reaches_proj(attention) -> bool:
    """megatron-core 0.16.1 SelfAttention.forward hands core_attention's output to linear_proj
    as it is, unless it checkpoints the core attention, offloads it or the projection's
    input, or applies an output gate."""
    return not (attention.checkpoint_core_attention or getattr(attention, "offload_core_attention", False)
                or getattr(attention, "offload_attn_proj", False)
                or getattr(attention.config, "attention_output_gate", False))


def _wire_layer(links: _Links, name: str, layer, successor, successor_name: str) -> None:
    attention, mlp = layer.self_attention, layer.mlp
    qkv, proj = attention.linear_qkv.weight, attention.linear_proj.weight
    fc1, fc2 = mlp.linear_fc1.weight, mlp.linear_fc2.weight
    if _norm_ok(layer.input_layernorm, layer.recompute_input_layernorm, layer.offload_attn_norm):
        links.set(layer.input_layernorm, "y_target", _into(qkv, "x"),
                  (f"{name}.input_layernorm.y", f"{name}.linear_qkv.x"))
    core = attention.core_attention
    if isinstance(core, _CoreAttention) and core.rope and core.fused_qkv_grad:
        links.set(core, "dqkv_target", _into(qkv, "dy"), (f"{name}.core_attention.dqkv", f"{name}.linear_qkv.dy"))
    if isinstance(core, FlashAttn4CoreAttention) and core.writes_output_in_place() and _reaches_proj(attention):
        links.set(core, "out_target", _into(proj, "x"), (f"{name}.core_attention.out", f"{name}.linear_proj.x"))
    fused = isinstance(layer, FusedAddNormLayer) and layer.fuses_in_training()
    if fused:
        links.set(layer, "pre_mlp_targets", (_into(fc1, "x"), _into(proj, "dy")),
                  ((f"{name}.pre_mlp_add_norm.y", f"{name}.linear_fc1.x"),
                   (f"{name}.pre_mlp_add_norm.dh", f"{name}.linear_proj.dy")))
    elif _norm_ok(layer.pre_mlp_layernorm, layer.recompute_pre_mlp_layernorm, layer.offload_mlp_norm):
        links.set(layer.pre_mlp_layernorm, "y_target", _into(fc1, "x"),
                  (f"{name}.pre_mlp_layernorm.y", f"{name}.linear_fc1.x"))
    activation = getattr(mlp, "activation_func", None)
    if isinstance(activation, TritonSwiGLU) and mlp.config.use_te_activation_func and not layer.recompute_mlp:
        links.set(activation, "y_target", _into(fc2, "x"), (f"{name}.swiglu.y", f"{name}.linear_fc2.x"))
        links.set(activation, "dx_target", _into(fc1, "dy"), (f"{name}.swiglu.dx", f"{name}.linear_fc1.dy"))
    if fused and successor is not None and layer.linked_successor() is successor:
        following = successor.self_attention.linear_qkv.weight
        links.set(layer, "next_norm_targets", (_into(following, "x"), _into(fc2, "dy")),
                  ((f"{name}.next_add_norm.y", f"{successor_name}.linear_qkv.x"),
                   (f"{name}.next_add_norm.dh", f"{name}.linear_fc2.dy")))


def _wire_block(links: _Links, name: str, block: TransformerBlock) -> None:
    config = block.config
    if config.recompute_granularity is not None or config.cpu_offloading:
        return  # recompute or activation offloading: see the module docstring
    layers = list(block.layers)
    names = [f"{name}.layers.{index}" for index in range(len(layers))]
    for index, layer in enumerate(layers):
        following = index + 1 < len(layers)
        _wire_layer(links, names[index], layer, layers[index + 1] if following else None,
                    names[index + 1] if following else "")
    last, final = (layers[-1] if layers else None), getattr(block, "final_layernorm", None)
    # The last fused layer's output is mlp_output + residual, the final norm's input: autograd's
    # add hands the norm's dx to FC2 as it is. A stock layer's bias-dropout-add does not.
    if (isinstance(last, FusedAddNormLayer) and last.fuses_in_training() and last.linked_successor() is None
            and _norm_ok(final, False, False)):
        links.set(final, "dx_target", _into(last.mlp.linear_fc2.weight, "dy"),
                  (f"{name}.final_layernorm.dx", f"{names[-1]}.linear_fc2.dy"))


def wire(chunk) -> list[tuple[str, str]]:
    """Point every producer of `chunk`'s decoder linears' X and dY at their arenas; returns
    the (producer, consumer) links made, [] when no Deferral is attached (nothing changed)."""
    if getattr(chunk, "wgrad_deferral", None) is None:
        return []
    links = _Links()
    for name, module in chunk.named_modules():
        if isinstance(module, TransformerBlock):
            _wire_block(links, name, module)
    return links.made
