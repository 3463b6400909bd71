"""Weight gradients of the decoder linears deferred to the end of the step (`layout.wgrad_defer=step`).

Without it every micro-batch's backward runs, per linear, `main_grad += dY_i^T @ X_i`
(kernels/wgrad.py `accumulate`): a read-modify-write of the fp32 gradient (8 bytes per
parameter) once per micro-batch. At mbs 1 (16 micro-batches) on an H200 that is the
largest piece of the gap to mbs 16 (~29 ms of a 0.55 s llama_1b3 step,
benchmarks/results/profile_diff_mbs1_mbs16_h200_2026-12-01.json).

With deferral each linear keeps its input X and its output gradient dY of micro-batch i in
slot i of an ARENA allocated once ([slots, s, b, in] and [slots, s, b, out] in the model's
dtype), and `Deferral.flush()` computes after the last micro-batch, once per weight,

    main_grad  = dY_all^T @ X_all     (beta 0: the weight's OVERWRITE_FLAG is set)
    main_grad += dY_all^T @ X_all     (beta 1: otherwise)

with K = every token of the step (the mbs-16 GEMM). The per-micro-batch sum and the one
GEMM agree up to summation order (fp32 accumulation either way).

Producers of X and dY (norms, SwiGLU, RoPE's backward: kernels/defer_wiring.py) write
straight into the slot through `input_target` / `grad_target`; the linear copies
whatever did not arrive there (always correct, only slower).

Slots: `Deferral.slot` is the current micro-batch (-1 before the first), advanced by a
forward pre-hook on the chunk (`begin_microbatch`), so a CUDA-graph capture of micro-batch
i bakes in slot i's views (launch/step_graph.py captures one graph per slot). A graph replay
runs no Python: the replaying code sets `slot` itself. More forwards than slots before a
flush is an error, never a silent overwrite.

Only when the schedule runs forward i and backward i back to back (pp == vpp == 1) and
nothing reduces the gradient buffers before flush (no overlapped DP reduction):
sweeper/validity.py checks both.
"""

from __future__ import annotations

import torch

from kernels import wgrad

ATTR = wgrad.ARENA_ATTR  # the attribute of a weight that holds its Arena


class Arena:
    """One linear's X and dY for every micro-batch of a step, allocated once."""

    def __init__(self, deferral: "Deferral", weight: torch.Tensor, tokens_shape: tuple[int, int]):
        out_features, in_features = weight.shape
        s, b = tokens_shape
        self.deferral = deferral
        self.weight = weight
        self.x = torch.empty(deferral.slots, s, b, in_features, dtype=weight.dtype, device=weight.device)
        self.dy = torch.empty(deferral.slots, s, b, out_features, dtype=weight.dtype, device=weight.device)
        self.copies = {"x": 0, "dy": 0}  # host counts of fallback copies (at capture, under graphs)

    def x_slot(self) -> torch.Tensor:
        return self.x[self.deferral.current()]

    def dy_slot(self) -> torch.Tensor:
        return self.dy[self.deferral.current()]

    def store_input(self, total_input: torch.Tensor) -> int:
        """Put this micro-batch's input in its slot (no copy when a producer wrote it
        there); return the slot, which the backward's dY goes to."""
        slot = self.deferral.current()
        _store(self.x[slot], total_input, self.copies, "x")
        return slot

    def store_grad(self, grad_output: torch.Tensor, slot: int) -> None:
        _store(self.dy[slot], grad_output, self.copies, "dy")

    def flush(self, count: int) -> None:
        """main_grad (=|+=) dY[:count]^T @ X[:count]; clears the weight's OVERWRITE_FLAG."""
        weight = self.weight
        x = self.x[:count].reshape(-1, self.x.shape[-1])
        dy = self.dy[:count].reshape(-1, self.dy.shape[-1])
        overwrite = getattr(weight, wgrad.OVERWRITE_FLAG, False)
        wgrad.accumulate(x, dy, weight.main_grad, overwrite=overwrite)
        if overwrite:
            setattr(weight, wgrad.OVERWRITE_FLAG, False)

    def nbytes(self) -> int:
        return self.x.nbytes + self.dy.nbytes


def _store(slot_view: torch.Tensor, value: torch.Tensor, copies: dict, key: str) -> None:
    if same_memory(slot_view, value):
        return
    # copy_ takes any strides; a [tokens, features] flattening of the same shape is reshaped.
    slot_view.copy_(value if value.shape == slot_view.shape else value.reshape(slot_view.shape))
    copies[key] += 1


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """b is a's very view (a producer wrote into the slot): same start, shape and strides."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


class Deferral:
    """The arenas of one model chunk and its current slot (= micro-batch of the step)."""

    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError(f"wgrad_defer needs at least one slot, got {slots}")
        self.slots = slots
        self.slot = -1
        self.begun = 0  # micro-batches run through Python (eager, or captured): the copies' count
        self.arenas: dict[torch.Tensor, Arena] = {}  # weight -> Arena (tensors hash by id)

    def in_step(self) -> bool:
        """Whether a micro-batch slot is current (a training forward or its backward)."""
        return 0 <= self.slot < self.slots

    def current(self) -> int:
        if not self.in_step():
            raise RuntimeError(f"wgrad_defer: slot {self.slot} outside 0..{self.slots - 1} "
                               "(a forward outside begin_microbatch, or flush missing)")
        return self.slot

    def begin_microbatch(self) -> None:
        if self.slot + 1 >= self.slots:
            raise RuntimeError(f"wgrad_defer: micro-batch {self.slot + 2} of a step with "
                               f"{self.slots} slots (flush() was not called after the last one)")
        self.slot += 1
        self.begun += 1

    def flush(self) -> None:
        """Every arena's weight gradient, once, for the micro-batches run; then slot reset."""
        count = self.slot + 1
        if count > 0:
            for arena in self.arenas.values():
                arena.flush(count)
        self.slot = -1

    def nbytes(self) -> int:
        return sum(arena.nbytes() for arena in self.arenas.values())

    def report(self) -> dict:
        """For a trial record: the arenas' size (GiB) and the fallback copies per micro-batch
        that ran through Python, summed over the linears (0 for a kind every producer writes)."""
        per = max(1, self.begun)
        return {"linears": len(self.arenas), "arena_gib": round(self.nbytes() / 2**30, 3),
                "x_copies_per_microbatch": sum(a.copies["x"] for a in self.arenas.values()) / per,
                "dy_copies_per_microbatch": sum(a.copies["dy"] for a in self.arenas.values()) / per}


def _target(weight, shape, dtype, which: str) -> torch.Tensor | None:
    arena = getattr(weight, ATTR, None) if weight is not None else None
    if arena is None or not arena.deferral.in_step():
        return None
    view = arena.x_slot() if which == "x" else arena.dy_slot()
    if tuple(view.shape) != tuple(shape) or view.dtype != dtype:
        return None
    return view


def input_target(weight, shape, dtype) -> torch.Tensor | None:
    """Where a producer of `weight`'s linear input should write it this micro-batch, or None
    (no deferral on that weight, no current slot, or another shape/dtype: allocate as usual)."""
    return _target(weight, shape, dtype, "x")


def grad_target(weight, shape, dtype) -> torch.Tensor | None:
    """Likewise for the gradient of `weight`'s linear output (its dY), in the backward."""
    return _target(weight, shape, dtype, "dy")


def deferred_linears(chunk) -> list[tuple[str, torch.nn.Module]]:
    """The decoder's kernels.wgrad linears with a DDP main_grad (QKV, attention output, FC1,
    FC2); never the output layer, whose dY ([tokens, vocab]) would dwarf the saving."""
    return [(name, module) for name, module in chunk.named_modules()
            if isinstance(module, (wgrad.ColumnParallelLinear, wgrad.RowParallelLinear))
            and "decoder" in name.split(".")
            and module.weight is not None and module.weight.requires_grad
            and hasattr(module.weight, "main_grad")]


def attach(chunk, *, slots: int, tokens_shape: tuple[int, int]) -> Deferral:
    """Give every deferred linear of the DDP-wrapped `chunk` an arena of `slots` micro-batches
    of `tokens_shape` = (s, b) tokens (s: the full sequence a linear sees, after any
    sequence-parallel gather, divided by cp), and a forward pre-hook advancing the slot.
    Stored as `chunk.wgrad_deferral`; `flush_all` / `flush_before_finalize` find it there."""
    if getattr(chunk, "wgrad_deferral", None) is not None:
        raise RuntimeError("wgrad_defer.attach: this chunk already has a Deferral")
    deferral = Deferral(slots)
    linears = deferred_linears(chunk)
    if not linears:
        raise RuntimeError("wgrad_defer.attach: no kernels.wgrad decoder linear with a main_grad "
                           "(build with wgrad_fusion=True and wrap in DDP first)")
    for _, module in linears:
        arena = Arena(deferral, module.weight, tokens_shape)
        deferral.arenas[module.weight] = arena
        setattr(module.weight, ATTR, arena)

    def pre_hook(module, args, kwargs=None):
        if torch.is_grad_enabled() and module.training:
            deferral.begin_microbatch()

    chunk.register_forward_pre_hook(pre_hook)
    chunk.wgrad_deferral = deferral
    return deferral


def flush_all(model) -> None:
    """Flush the Deferral of every chunk in `model` (a list of chunks, or one) that has one."""
    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        deferral = getattr(chunk, "wgrad_deferral", None)
        if deferral is not None:
            deferral.flush()


def flush_before_finalize(config) -> None:
    """config.finalize_model_grads_func with every chunk's flush in front: both megatron's
    no-pipelining schedule and launch.step_graph.MicrobatchGraph call it after the last
    micro-batch, before the DP reduction reads the buffers."""
    inner = config.finalize_model_grads_func
    if getattr(inner, "flushes_wgrad_defer", False):
        return

    def finalize(model, *args, **kwargs):
        flush_all(model)
        if inner is not None:
            return inner(model, *args, **kwargs)

    finalize.flushes_wgrad_defer = True
    config.finalize_model_grads_func = finalize
