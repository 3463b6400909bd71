"""A layout is parsed once: the job runs the spec.json the sweeper wrote, and a rank log says it started."""

import os
import time

from omegaconf import OmegaConf

from core.config import Layout, RootConfig, TrialConfig, as_dict
from core.paths import git_commit
from core.spec import SPEC_FILE, Prediction, TrialSpec
from launch.main import job_spec
from launch.supervise import started
from launch.trial import prepare


def _cfg(**layout):
    cfg = OmegaConf.create(as_dict(RootConfig()))  # as Hydra composes it: the defaults, untyped
    for key, value in layout.items():
        cfg.layout[key] = value
    return cfg


PREDICTION = Prediction(peak_memory_gb=1.0, fits=True, step_time_s=2.0, mfu=0.25, memory_terms_gb={"weights": 1.0})


def _planned(trial_dir) -> TrialSpec:
    root = RootConfig()
    return TrialSpec(model=root.model, cluster=root.cluster, layout=Layout(tp=2, mbs=4), trial=TrialConfig(seed=7),
                     trial_dir=str(trial_dir), git_commit="abc", prediction=PREDICTION)


def test_the_job_runs_the_spec_the_sweeper_wrote_not_its_composed_config(tmp_path):
    planned = _planned(tmp_path)
    prepare(planned)
    spec = job_spec(_cfg(tp=1, mbs=1), str(tmp_path))  # what Hydra composed in the job differs
    assert spec.layout == planned.layout and spec.trial == planned.trial and spec.trial_dir == planned.trial_dir
    assert spec.prediction == PREDICTION
    assert spec.git_commit == git_commit()  # the tree the job runs, not the one the sweep planned from
    assert TrialSpec.load(tmp_path / SPEC_FILE) == planned


def test_without_a_spec_the_job_composes_one_and_saves_it_for_the_ranks(tmp_path):
    spec = job_spec(_cfg(tp=2, mbs=2), str(tmp_path))
    assert (spec.layout.tp, spec.layout.mbs, spec.prediction) == (2, 2, None)
    assert TrialSpec.load(tmp_path / SPEC_FILE) == spec


def test_prepare_clears_an_earlier_runs_rank_files_so_only_this_launch_reads_as_started(tmp_path):
    for name in ("rank0.log", "rank1.log", "rank0.json", "result.json.previous-error-1"):
        (tmp_path / name).write_text("earlier run")
    assert started(tmp_path)
    prepare(_planned(tmp_path))
    assert not started(tmp_path)  # spec.json alone is not a start: the sweeper wrote it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json.previous-error-1", SPEC_FILE]
    (tmp_path / "rank1.log").write_text("")
    assert started(tmp_path)
    old = time.time() - 100
    os.utime(tmp_path / "rank1.log", (old, old))
    assert not started(tmp_path, since=old + 50)  # a log from before this job was submitted


def test_a_direct_run_local_writes_its_spec_first(tmp_path):
    """`launch.trial.run_local` called without the sweeper (the CUDA tests and benchmarks do):
    the ranks still find spec.json. Without the write they could not start (their log's
    folder did not even exist)."""
    from core.config import ClusterConfig, ModelConfig
    from launch.trial import run_local

    layout = Layout(gbs=4, mbs=2)
    spec = TrialSpec(model=ModelConfig(), layout=layout, trial_dir=str(tmp_path / layout.name),
                     cluster=ClusterConfig(name="cpu1", device="cpu", gpus_per_node=1, gpu_memory_gb=8.0,
                                           peak_tflops=1.0),
                     trial=TrialConfig(warmup_steps=1, measure_steps=1, timeout_s=120))
    record = run_local(spec)
    assert record["status"] == "ok", record.get("reason")
    assert TrialSpec.load(tmp_path / layout.name / SPEC_FILE) == spec
