"""Planning a sweep: classification, pruning by predicted memory, order, resume."""

from pathlib import Path

from core.config import ClusterConfig, Layout, ModelConfig, SweepConfig, TrialConfig
from core.records import result_path, write_json_atomic
from core.spec import Prediction, TrialSpec
from launch.record import base_record
from sweeper.plan import Point, classify, order, prediction_for

MODEL = ModelConfig(name="m", num_layers=8, hidden_size=1024, ffn_hidden_size=2816,
                    num_attention_heads=8, num_query_groups=8, vocab_size=32000, seq_length=1024)
GPU = ClusterConfig(name="g", device="cuda", gpus_per_node=8, nodes=1, gpu_memory_gb=80.0, peak_tflops=989.4)


def point(cluster=GPU, **layout):
    return Point(model=MODEL, cluster=cluster, layout=Layout(gbs=64, **layout), trial=TrialConfig())


def test_invalid_points_are_never_predicted_or_launched(tmp_path):
    p = point(tp=3)
    classify(p, sweep=SweepConfig(), sweep_dir=tmp_path)
    assert p.status == "invalid" and p.prediction is None


def test_predicted_oom_is_skipped_unless_pruning_is_off(tmp_path):
    small = ClusterConfig(name="s", device="cuda", gpus_per_node=8, gpu_memory_gb=1.0, peak_tflops=989.4)
    p = point(cluster=small, tp=1, mbs=8)
    classify(p, sweep=SweepConfig(), sweep_dir=tmp_path)
    expected = prediction_for(MODEL, small, p.layout).peak_memory_gb
    assert p.status == "skipped"
    assert p.reason == f"predicted OOM: {expected:.1f} GiB > 1.0 GiB"
    q = point(cluster=small, tp=1, mbs=8)
    classify(q, sweep=SweepConfig(prune_predicted_oom=False), sweep_dir=tmp_path)
    assert q.status == "launch"


def test_launch_order_follows_predicted_mfu(tmp_path):
    points = [point(tp=t, mbs=m) for t in (1, 2, 8) for m in (1, 4)]
    for p in points:
        classify(p, sweep=SweepConfig(), sweep_dir=tmp_path)
    launched = order(points)
    mfus = [p.prediction.mfu for p in launched]
    assert mfus == sorted(mfus, reverse=True) and len(launched) == len(points)


def test_prediction_round_trips_through_its_json():
    layout = Layout(gbs=64, tp=2)
    typed = prediction_for(MODEL, GPU, layout)
    assert Prediction.from_dict(typed.to_dict()) == typed
    assert typed.fits and 0 < typed.mfu < 1 and typed.reserved_gb is not None  # every field made here
    assert abs(sum(typed.memory_terms_gb.values()) - typed.peak_memory_gb) < 0.01  # GiB, 3-decimal rounding


def _record(p: Point, status: str, tmp_path) -> dict:
    spec = TrialSpec(model=p.model, cluster=p.cluster, layout=p.layout, trial=p.trial,
                     trial_dir=str(tmp_path / p.name), git_commit=None, prediction=None)
    record = base_record(spec, status)
    if status == "ok":
        record.update(step_time_s=1.0, tokens_per_s=1.0, mfu={"palm": 0.1, "megatron": 0.1})
    return record


def test_resume_skips_recorded_trials_and_reruns_failures_only_when_asked(tmp_path):
    done, failed = point(tp=1), point(tp=2)
    write_json_atomic(result_path(Path(tmp_path) / done.name), _record(done, "ok", tmp_path))
    write_json_atomic(result_path(Path(tmp_path) / failed.name), _record(failed, "error", tmp_path))
    classify(done, sweep=SweepConfig(), sweep_dir=tmp_path)
    classify(failed, sweep=SweepConfig(), sweep_dir=tmp_path)
    assert done.status == "done" and failed.status == "done"
    again = point(tp=2)
    classify(again, sweep=SweepConfig(rerun_failed=True), sweep_dir=tmp_path)
    assert again.status == "launch" and again.previous == "error"


def test_interrupted_lost_and_damaged_records_are_run_again(tmp_path):
    interrupted, lost, damaged, shaped = point(tp=1), point(tp=2), point(tp=4), point(tp=8)
    write_json_atomic(result_path(tmp_path / interrupted.name), _record(interrupted, "interrupted", tmp_path))
    write_json_atomic(result_path(tmp_path / lost.name), _record(lost, "lost", tmp_path))
    write_json_atomic(result_path(tmp_path / damaged.name), [1, 2])
    bad = _record(shaped, "ok", tmp_path)
    bad["layout"]["tp"] = 0
    write_json_atomic(result_path(tmp_path / shaped.name), bad)
    for p in (interrupted, lost, damaged, shaped):
        classify(p, sweep=SweepConfig(), sweep_dir=tmp_path)
        assert p.status == "launch", p.name
    assert interrupted.damaged is None and lost.damaged is None
    assert damaged.damaged == "not a JSON object but list"
    assert shaped.damaged == "layout.tp is 0, not a positive integer"


def test_cpu_cluster_skips_what_needs_cuda(tmp_path):
    p = point(cluster=ClusterConfig(), tp=1, pp=2, mbs=1)
    p.layout.gbs, p.layout.distributed_optimizer = 8, True
    classify(p, sweep=SweepConfig(), sweep_dir=tmp_path)
    assert p.status == "skipped" and p.reason == "needs CUDA: distributed optimizer"  # pp=2 runs on CPU


def test_max_trials_keeps_the_best_predicted_and_records_the_rest(tmp_path):
    points = [point(tp=t, mbs=m) for t in (1, 2, 8) for m in (1, 4)]
    for p in points:
        classify(p, sweep=SweepConfig(), sweep_dir=tmp_path)
    everything = [p.name for p in order(list(points))]
    for p in points:
        p.status = "launch"
    top = order(points, max_trials=2)
    assert [p.name for p in top] == everything[:2]
    rest = [p for p in points if p.name not in everything[:2]]
    assert all(p.status == "skipped" and p.reason.startswith("outside the top 2 by predicted MFU (rank ")
               for p in rest)
