"""Where one training step's time went: profiler events -> seconds per category.

Pure functions over plain `Event`s (no torch import); `launch.profile` turns the
torch profiler's events into them and stores the result in the rank record:

    {"step_s": 0.081, "device": "cpu", "categories": {"attention": 0.004, ...}, "method": "...",
     "top_kernels": [{"name": "nvjet_tst_...", "category": "matmul", "count": 96,
                      "total_s": 0.21, "share": 0.29}, ...]}          # device (CUDA) only

Categories (CATEGORIES): attention (core attention, forward and backward),
matmul (the MLP, the QKV/output projections and the logits layer), norm,
elementwise (every other compute op: activations, RoPE, loss, embedding,
copies), optimizer, tp_comm / dp_comm / pp_comm (collectives and the time spent
waiting for them), other (host time outside any profiled op: Python and
framework overhead), idle (barriers, i.e. waiting for slower ranks; on a GPU,
device time with no kernel running, bubbles included).

Method: the step is the "train_step" annotation's interval. Every instant of it
is painted with exactly one category, so the totals add up to the step:

- CPU: on the step's thread each event's *self* intervals (its span minus its
  children's) carry the event's category. An operator's self time wins; the self
  time of Python-level events (annotations, autograd nodes) goes to a collective
  in flight on a communication thread if there is one (sync gloo collectives
  return at once and are waited for in Python), otherwise to the event's own
  category. What no event covers goes to `other`.
- Device (CUDA): each kernel takes a category from its launcher and its own name
  (see below); compute kernels win over communication kernels that overlap them,
  so communication counts only where it is exposed; time with no kernel goes to
  `idle`. `top_kernels` lists the kernels with the most device time in the step
  (summed per shortened name and category; kernels on several streams overlap, so
  the shares need not add up).

An event's category, first match wins: a barrier is idle; a collective takes the
innermost communication scope around it (dp_comm, pp_comm, tp_comm), else pp_comm
for send/recv, else tp_comm inside the model, else dp_comm; then the innermost
category scope (attention, norm, optimizer, dp_comm, pp_comm, tp_comm); then the
innermost name that `name_category` knows (attention, norm, matmul, optimizer);
then elementwise for an aten op, other for anything else. The name rules live in
`launch.categories`. Backward ops inherit the
scopes of the forward op that created their autograd node (same sequence number).

A kernel's launcher is the CPU op the profiler links it to, else the innermost
CPU event around the runtime call that launched it (same correlation id), which
reaches record_function scopes and Triton launches outside any aten op. A
kernel's category, first match wins: an nccl kernel takes its launcher's
communication category, else pp_comm for send/recv, else tp_comm; then its
launcher's category unless that is elementwise or other (or there is no
launcher); then its own name (`name_category`: cuDNN/flash/fmha SDPA and our
Triton attention kernels, our Triton RMSNorm kernels and rms/layer norm, GEMMs
from cuBLAS (nvjet, sm90_xmma), CUTLASS and inductor templates, Adam and the
multi-tensor gradient norm for the optimizer); then elementwise.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Optional

from launch.categories import (BACKWARD_PREFIX, CATEGORIES, COMM, is_barrier, is_comm, is_op, is_p2p,
                               kernel_category, name_category)

STEP_SCOPE = "train_step"
MODEL_SCOPE = "model"
CATEGORY_SCOPES = ("attention", "norm", "optimizer", "dp_comm", "pp_comm", "tp_comm")


@dataclass(frozen=True)
class Event:
    """One profiler event; times in microseconds on one clock.

    parent: index of the innermost enclosing event on the same thread, or None.
    seq: autograd sequence number (-1 if none). is_async: runs on a helper thread
    (gloo work). device: a GPU kernel/memcpy; link: id of the CPU op that launched it
    (0: unknown). runtime: a CUDA runtime/driver call on the CPU (cudaLaunchKernel);
    its id is the correlation id of the kernels it launched, which share it.
    """

    name: str
    start: float
    end: float
    thread: int = 0
    parent: Optional[int] = None
    seq: int = -1
    is_async: bool = False
    device: bool = False
    id: int = 0
    link: int = 0
    runtime: bool = False


def _ancestors(events: list[Event], index: int) -> list[int]:
    chain = []
    i = events[index].parent
    while i is not None:
        chain.append(i)
        i = events[i].parent
    return chain


def _forward_of_seq(events: list[Event], backward: set[int]) -> dict[int, int]:
    """seq -> the last forward event with it (the one that created the autograd node)."""
    found: dict[int, int] = {}
    for i, e in enumerate(events):
        if e.seq >= 0 and not e.device and i not in backward:
            if e.seq not in found or events[found[e.seq]].start <= e.start:
                found[e.seq] = i
    return found


def _backward_set(events: list[Event]) -> set[int]:
    """Indices of events that run inside an autograd backward node."""
    inside = set()
    for i, e in enumerate(events):
        if e.device:
            continue
        if e.name.startswith(BACKWARD_PREFIX) or any(
                events[a].name.startswith(BACKWARD_PREFIX) for a in _ancestors(events, i)):
            inside.add(i)
    return inside


def contexts(events: list[Event]) -> list[list[str]]:
    """Per event: its chain of event names, innermost first, backward ops extended by
    the chain of the forward op that created their autograd node."""
    backward = _backward_set(events)
    forward = _forward_of_seq(events, backward)
    chains: list[list[str]] = []
    for i, e in enumerate(events):
        own = [i] + _ancestors(events, i)
        chain = [events[j].name for j in own]
        if i in backward:
            node = next((j for j in own if events[j].name.startswith(BACKWARD_PREFIX)
                         and events[j].seq >= 0), None)
            fwd = forward.get(events[node].seq) if node is not None else None
            if fwd is not None:
                chain += [events[j].name for j in [fwd] + _ancestors(events, fwd)]
        chains.append(chain)
    return chains


def classify(chain: list[str]) -> str:
    """The category of an event from its context chain (itself first); see the module doc."""
    name = chain[0]
    if is_barrier(name) and is_comm(name):
        return "idle"
    if is_comm(name):
        scope = next((s for s in chain if s in COMM), None)
        if scope:
            return scope
        if is_p2p(name):
            return "pp_comm"
        return "tp_comm" if MODEL_SCOPE in chain else "dp_comm"
    scope = next((s for s in chain if s in CATEGORY_SCOPES), None)
    if scope:
        return scope
    for link in chain:
        if link == STEP_SCOPE:
            break
        category = name_category(link)
        if category:
            return category
    return "elementwise" if name.startswith("aten::") else "other"


def paint(start: float, end: float, layers: list[list[tuple[float, float, str]]],
          default: str) -> dict[str, float]:
    """Give every instant of [start, end] one category; return the length per category.

    layers: interval lists, highest priority first; within a layer, the category
    listed first in CATEGORIES wins. Uncovered time is `default`. The totals add
    up to end - start exactly (up to float rounding).
    """
    rank = {c: k for k, c in enumerate(CATEGORIES)}
    points = []
    for level, layer in enumerate(layers):
        for a, b, category in layer:
            a, b = max(a, start), min(b, end)
            if b > a:
                key = (level, rank[category])
                points.append((a, 1, key))
                points.append((b, -1, key))
    points.sort(key=lambda p: p[0])
    totals = {c: 0.0 for c in CATEGORIES}
    active: dict[tuple[int, int], int] = {}
    now = start
    for t, delta, key in points:
        if t > now:
            live = [k for k, n in active.items() if n > 0]
            totals[CATEGORIES[min(live)[1]] if live else default] += t - now
            now = t
        active[key] = active.get(key, 0) + delta
    totals[default] += end - now
    return totals


def _self_intervals(events: list[Event], members: list[int]) -> dict[int, list[tuple[float, float]]]:
    children: dict[int, list[int]] = {i: [] for i in members}
    for i in members:
        parent = events[i].parent
        if parent in children:
            children[parent].append(i)
    out = {}
    for i in members:
        cursor, spans = events[i].start, []
        for c in sorted(children[i], key=lambda c: events[c].start):
            if events[c].start > cursor:
                spans.append((cursor, events[c].start))
            cursor = max(cursor, events[c].end)
        if events[i].end > cursor:
            spans.append((cursor, events[i].end))
        out[i] = spans
    return out


def step_event(events: list[Event]) -> int:
    steps = [i for i, e in enumerate(events) if e.name == STEP_SCOPE and not e.device]
    if not steps:
        raise ValueError(f"no {STEP_SCOPE!r} annotation among {len(events)} profiler events")
    return max(steps, key=lambda i: events[i].end - events[i].start)


def _inside(events: list[Event], index: int, root: int) -> bool:
    return index == root or root in _ancestors(events, index)


def cpu_categories(events: list[Event], categories: list[str], root: int) -> dict[str, float]:
    """Paint the step on its own thread, waits filled by in-flight collectives."""
    step = events[root]
    members = [i for i, e in enumerate(events)
               if not e.device and not e.is_async and e.thread == step.thread and _inside(events, i, root)]
    spans = _self_intervals(events, members)
    busy, python = [], []
    for i in members:
        target = busy if is_op(events[i].name) else python
        target += [(a, b, categories[i]) for a, b in spans[i]]
    # A gloo work item carries no group; the collective that launched it is the last
    # one started on the step's thread before it.
    launches = sorted((events[i].start, categories[i]) for i in members if is_comm(events[i].name))
    starts = [t for t, _ in launches]
    in_flight = []
    for e, category in zip(events, categories):
        if (e.is_async or e.thread != step.thread) and not e.device and is_comm(e.name):
            k = bisect.bisect_right(starts, e.start)
            if k and not is_barrier(e.name):
                category = launches[k - 1][1]
            in_flight.append((e.start, e.end, category))
    return paint(step.start, step.end, [busy, in_flight, python], "other")


class _Enclosing:
    """The innermost CPU event running at an instant, on any thread: the context of a
    runtime call that the profiler nested under nothing (its thread id is the OS one)."""

    def __init__(self, events: list[Event]):
        self.events = events
        self.kids: dict = {}  # parent index, or ("root", thread) -> children by start
        for i, e in enumerate(events):
            if not (e.device or e.runtime or e.is_async):
                self.kids.setdefault(e.parent if e.parent is not None else ("root", e.thread), []).append(i)
        for kids in self.kids.values():
            kids.sort(key=lambda i: events[i].start)
        self.starts = {key: [events[i].start for i in kids] for key, kids in self.kids.items()}

    def at(self, t: float) -> Optional[int]:
        best = None
        for root in [key for key in self.kids if isinstance(key, tuple)]:
            key, node = root, None
            while key in self.kids:
                k = bisect.bisect_right(self.starts[key], t) - 1
                if k < 0 or self.events[self.kids[key][k]].end < t:
                    break
                node = key = self.kids[key][k]
            if node is not None and (best is None or self.events[node].start > self.events[best].start):
                best = node
        return best


def launchers(events: list[Event]) -> dict[int, int]:
    """Device event index -> the CPU event it was launched from: the linked op, else the
    innermost event around its runtime call. Kernels with neither are left out."""
    ops = {e.id: i for i, e in enumerate(events) if not (e.device or e.runtime or e.link) and e.id}
    calls = {e.id: i for i, e in enumerate(events) if e.runtime and e.id}
    enclosing = None
    found = {}
    for i, e in enumerate(events):
        if not e.device:
            continue
        call = calls.get(e.id)
        if e.link in ops:
            found[i] = ops[e.link]
        elif call is not None and events[call].parent is not None:
            found[i] = events[call].parent
        elif call is not None:
            enclosing = enclosing or _Enclosing(events)
            outer = enclosing.at((events[call].start + events[call].end) / 2)
            if outer is not None:
                found[i] = outer
    return found


def device_kernels(events: list[Event], categories: list[str]) -> list[tuple[int, str]]:
    """(index, category) of every kernel (memcpy, memset) on the device timeline."""
    scopes = {STEP_SCOPE, MODEL_SCOPE, *CATEGORY_SCOPES}
    launched = launchers(events)
    return [(i, kernel_category(e.name, categories[launched[i]] if i in launched else None))
            for i, e in enumerate(events)
            if e.device and e.name not in scopes]  # a scope's mirror on the GPU timeline is no kernel


def device_categories(events: list[Event], kernels: list[tuple[int, str]], root: int) -> dict[str, float]:
    """Paint the step on the device: compute over exposed communication over idle."""
    compute, comm = [], []
    for i, category in kernels:
        e = events[i]
        (comm if category in COMM + ("idle",) else compute).append((e.start, e.end, category))
    step = events[root]
    return paint(step.start, step.end, [compute, comm], "idle")


def short_name(name: str, limit: int = 96) -> str:
    """A kernel name for people: no return type, arguments, namespaces, lambdas or nested
    template arguments (`multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<...>, ...>`)."""
    name = name.removeprefix("void ").replace("(anonymous namespace)::", "")
    out, angles, parens = [], 0, 0  # parens: inside template arguments, dropped with their content
    for k, ch in enumerate(name):
        if angles == 0:
            if ch == "(" and k and name[k - 1] != " ":
                break  # the argument list; "Memcpy HtoD (Pageable -> Device)" keeps its words
            angles += ch == "<"
            out.append(ch)
        elif ch in "()":
            parens += 1 if ch == "(" else -1
        elif parens == 0 and ch in "<>":
            angles += 1 if ch == "<" else -1
            if ch == "<" and angles == 2:
                out.append("<...")
            elif angles <= 1:
                out.append(ch)
        elif parens == 0 and angles == 1:
            out.append(ch)
    short = re.sub(r"\b\w+::|::\{lambda#\d+\}", "", "".join(out)).strip()
    return short if len(short) <= limit else short[:limit - 3] + "..."


def top_kernels(events: list[Event], kernels: list[tuple[int, str]], root: int, n: int = 25) -> list[dict]:
    """The n (short name, category) pairs with the most device time inside the step."""
    step = events[root]
    step_s = (step.end - step.start) / 1e6
    totals: dict[tuple[str, str], list] = {}
    for i, category in kernels:
        seconds = (min(events[i].end, step.end) - max(events[i].start, step.start)) / 1e6
        if seconds > 0:
            entry = totals.setdefault((short_name(events[i].name), category), [0, 0.0])
            entry[0] += 1
            entry[1] += seconds
    ranked = sorted(totals.items(), key=lambda item: (-item[1][1], item[0]))[:n]
    return [{"name": name, "category": category, "count": count, "total_s": total,
             "share": total / step_s if step_s > 0 else 0.0}
            for (name, category), (count, total) in ranked]


def breakdown(events: list[Event]) -> dict:
    """The record's `breakdown` dict for one profiled step."""
    root = step_event(events)
    categories = [classify(chain) for chain in contexts(events)]
    on_device = any(e.device for e in events)
    step_us = events[root].end - events[root].start
    if on_device:
        kernels = device_kernels(events, categories)
        totals_us = device_categories(events, kernels, root)
        method = ("device timeline: kernels by launcher's scope/op, else by kernel name; compute over "
                  "exposed comm; rest idle")
    else:
        totals_us = cpu_categories(events, categories, root)
        method = ("step thread: self time per op's scope/name; Python time waiting on a collective "
                  "goes to its comm; uncovered time is other")
    result = {
        "step_s": step_us / 1e6,
        "device": "cuda" if on_device else "cpu",
        "categories": {c: totals_us[c] / 1e6 for c in CATEGORIES},
        "method": method + "; totals add up to step_s",
    }
    if on_device:
        result["top_kernels"] = top_kernels(events, kernels, root)
    return result
