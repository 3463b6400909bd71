"""The search space: axes of Layout fields and their cartesian product.

A sweep names its axes as `{field: [values]}`, in YAML (`conf/sweep/*.yaml`)
or on the command line (`layout.tp=1,2,4`). `search_space` gives the default
space for a model and cluster, used by `recommend` when no sweep is named.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable, Iterator

from core.config import ClusterConfig, ConfigError, Layout, ModelConfig

LAYOUT_FIELDS = {f.name: f for f in dataclasses.fields(Layout)}


def layouts(axes: dict[str, list], base: Layout | None = None) -> Iterator[Layout]:
    """Every combination of the axes' values, on top of `base` (default Layout())."""
    base = base or Layout()
    for name, values in axes.items():
        if name not in LAYOUT_FIELDS:
            raise ConfigError(f"unknown layout axis {name!r} (known: {', '.join(LAYOUT_FIELDS)})")
        if not values:
            raise ConfigError(f"layout axis {name!r} has no values")
    names = list(axes)
    for combo in itertools.product(*(axes[n] for n in names)):
        yield dataclasses.replace(base, **dict(zip(names, combo)))


def _powers_of_two_up_to(n: int) -> list[int]:
    out, v = [], 1
    while v <= n:
        out.append(v)
        v *= 2
    return out


def search_space(model: ModelConfig, cluster: ClusterConfig, gbs: int) -> dict[str, list]:
    """A broad default space for a model on a cluster (the paper's axes)."""
    world = cluster.world_size
    tp = [t for t in _powers_of_two_up_to(min(cluster.gpus_per_node, 8))]
    pp = [p for p in _powers_of_two_up_to(min(world, 16)) if model.num_layers % p == 0]
    return {
        "tp": tp,
        "pp": pp,
        "vpp": [1, 2],
        "mbs": [1, 2, 4, 8],
        "gbs": [gbs],
        "recompute": ["none", "selective", "full"],
        "sequence_parallel": [False, True],
        "distributed_optimizer": [True],
        "attention": ["triton", "sdpa_cudnn"],
        "norm": ["triton"],
    }


def dedupe(items: Iterable[Layout]) -> list[Layout]:
    """Drop repeated layouts, keeping the first; order is preserved."""
    seen, out = set(), []
    for layout in items:
        if layout.name not in seen:
            seen.add(layout.name)
            out.append(layout)
    return out
