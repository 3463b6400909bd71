"""The layout sweeper's expansion of axes: the main grid, extra grids, command-line axes."""

import json
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


def test_each_trials_spec_is_written_before_the_launcher_gets_its_job(tmp_path):
    """A layout is parsed once: the job finds the sweeper's spec.json, prediction inside."""
    from core.config import ClusterConfig, Layout, ModelConfig, TrialConfig
    from core.spec import Prediction, TrialSpec
    from sweeper.launching import launch_blocking
    from sweeper.plan import Point

    points = [Point(model=ModelConfig(), cluster=ClusterConfig(), layout=Layout(mbs=mbs), trial=TrialConfig(),
                    overrides=[f"layout.mbs={mbs}"],
                    prediction=Prediction(peak_memory_gb=1.0, fits=True, step_time_s=1.0, mfu=0.1 * mbs,
                                          memory_terms_gb={"weights": 1.0})) for mbs in (1, 2)]
    (tmp_path / points[0].name).mkdir()
    (tmp_path / points[0].name / "rank0.log").write_text("an earlier run")
    seen = {}

    class Launcher:
        def launch(self, jobs, initial_job_idx):
            for job in jobs:
                name = job[-1].removeprefix("hydra.sweep.subdir=")
                files = sorted(p.name for p in (tmp_path / name).iterdir())
                seen[name] = (TrialSpec.load(tmp_path / name / "spec.json"), files)
            return []

    launch_blocking(Launcher(), points, tmp_path, "abc", batch_size=2)
    for point in points:
        spec, files = seen[point.name]
        assert spec.layout == point.layout and spec.prediction == point.prediction and spec.git_commit == "abc"
        assert files == ["spec.json"]  # the earlier run's rank log is gone: it would read as started
        # the launcher ran nothing: each trial gets a record saying its job never started
        record = json.loads((tmp_path / point.name / "result.json").read_text())
        assert record["status"] == "error" and "never started" in record["reason"]
