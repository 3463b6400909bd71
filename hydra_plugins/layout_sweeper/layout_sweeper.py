"""Hydra discovers sweepers only under `hydra_plugins`; the logic lives in `sweeper.hydra_sweeper`."""

from dataclasses import dataclass
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore

from sweeper.hydra_sweeper import LayoutSweeperImpl


@dataclass
class LayoutSweeperConf:
    _target_: str = "hydra_plugins.layout_sweeper.layout_sweeper.LayoutSweeper"
    max_batch_size: Optional[int] = None  # trials handed to the launcher at once; None = all
    params: Optional[Dict[str, str]] = None  # axes, e.g. {"layout.tp": "1,2,4"}
    # More grids in the same sweep: each is `params` with some axes replaced, e.g. the
    # stock kernels at a few micro-batch sizes beside the main grid. The sweep runs the union.
    grids: Optional[List[Dict[str, str]]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="layout", node=LayoutSweeperConf, provider="layout_sweeper")


class LayoutSweeper(LayoutSweeperImpl):
    pass
