"""The layout sweeper's expansion of axes: the main grid, extra grids, command-line axes."""

from types import SimpleNamespace

from sweeper.hydra_sweeper import LayoutSweeperImpl


def _combos(params, grids=None, arguments=()):
    sweeper = LayoutSweeperImpl(params=params, grids=grids)
    sweeper.hydra_context = SimpleNamespace(config_loader=None)
    return [dict(o.split("=", 1) for o in combo) for combo in sweeper._combinations(list(arguments))]


def test_main_grid_is_the_cartesian_product():
    combos = _combos({"layout.mbs": "1,2", "layout.tp": "1,2,4"})
    assert len(combos) == 6
    assert {(c["layout.mbs"], c["layout.tp"]) for c in combos} == {(m, t) for m in "12" for t in "124"}


def test_extra_grids_replace_some_axes_and_add_their_points():
    params = {"layout.mbs": "1,2,4", "layout.attention": "sdpa_cudnn"}
    grids = [{"layout.attention": "megatron", "layout.mbs": "1,2"}, {"layout.cuda_graph": True}]
    combos = _combos(params, grids)
    main = [c for c in combos if c["layout.attention"] == "sdpa_cudnn" and "layout.cuda_graph" not in c]
    stock = [c for c in combos if c["layout.attention"] == "megatron"]
    graphs = [c for c in combos if c.get("layout.cuda_graph") == "True"]
    assert [c["layout.mbs"] for c in main] == ["1", "2", "4"]
    assert [c["layout.mbs"] for c in stock] == ["1", "2"]
    assert [c["layout.mbs"] for c in graphs] == ["1", "2", "4"]  # the main grid's other axes
    assert len(combos) == 8


def test_command_line_axes_apply_to_every_grid():
    combos = _combos({"layout.mbs": "1,2,4"}, [{"layout.attention": "megatron"}], ["layout.tp=1,2"])
    assert len(combos) == 12
    assert {c["layout.tp"] for c in combos} == {"1", "2"}
