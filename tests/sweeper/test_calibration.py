"""Calibration: JSON round trip, and a fit that recovers known constants from trials."""

import dataclasses
import json

import pytest

from core.config import ClusterConfig, ConfigError, Layout, ModelConfig, TrialConfig, as_dict
from core.records import PEAK_MEMORY, PEAK_MEMORY_MAX, PeakMemory, RankRecord, rss_peak_fields
from core.spec import TrialSpec
from sweeper.calibration import fit_calibration, measured_memory
from sweeper.constants import Calibration, cpu_calibration, default_calibration, load_calibration, save_calibration
from sweeper.memory import predict_memory
from sweeper.speed import predict_speed

MODEL = ModelConfig(name="m", num_layers=8, hidden_size=1024, ffn_hidden_size=2816,
                    num_attention_heads=8, num_query_groups=4, vocab_size=32000, seq_length=2048)
H100 = ClusterConfig(name="one_h100", device="cuda", gpus_per_node=1, nodes=1, gpu_memory_gb=79.1,
                     peak_tflops=989.4, intra_node_bw_gbps=450.0, inter_node_bw_gbps=50.0)


def test_save_and_load_round_trip(tmp_path):
    cal = Calibration(activation_scale=1.25, memory_offset_gb=-0.5, launch_per_layer_s=1e-4,
                      compute_scale={"sdpa": 1.5}, source={"ok": 3})
    path = tmp_path / "calibration.json"
    save_calibration(cal, path)
    loaded = load_calibration(path)
    assert loaded.activation_scale == 1.25
    assert loaded.memory_offset_gb == -0.5
    assert loaded.launch_per_layer_s == 1e-4
    assert loaded.compute_scale["sdpa"] == 1.5
    assert loaded.compute_scale["triton"] == 1.0  # a kernel the file lacks keeps its default
    assert loaded.source == {"ok": 3}


def test_load_rejects_unknown_constants_and_non_numbers(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"activation_scael": 1.0}))
    with pytest.raises(ConfigError, match="activation_scael"):
        load_calibration(path)
    path.write_text(json.dumps({"fragmentation": "lots"}))
    with pytest.raises(ConfigError, match="fragmentation"):
        load_calibration(path)


def test_defaults_follow_the_device():
    assert dataclasses.replace(default_calibration(H100), source={}) == Calibration()
    # Presets from the explicit peak and memory: 139.8 GiB at H100 compute is an H200
    # (faster memory), a 312 TFLOP/s peak an A100.
    h200 = default_calibration(dataclasses.replace(H100, gpu_memory_gb=139.8))
    assert h200.source == {"preset": "h200"} and h200.memory_bandwidth_tbps > Calibration().memory_bandwidth_tbps
    a100 = default_calibration(dataclasses.replace(H100, peak_tflops=312.0))
    assert a100.source == {"preset": "a100"} and a100.memory_bandwidth_tbps < Calibration().memory_bandwidth_tbps
    cpu = ClusterConfig(device="cpu")
    assert default_calibration(cpu) == cpu_calibration()
    assert cpu_calibration().optimizer_temp_bytes == 0.0


def _records(truth: Calibration, layouts, status="ok"):
    out = []
    for layout in layouts:
        memory = predict_memory(MODEL, H100, layout, truth)
        speed = predict_speed(MODEL, H100, layout, truth)
        # the keys a CUDA trial writes: each rank's PeakMemory fields, the trial's peak
        peaks = PeakMemory(allocated_gb=memory.allocated_gb, reserved_gb=memory.reserved_gb).fields()
        out.append({"layout": as_dict(layout), "status": status, "step_time_s": speed.step_time_s,
                    "peak_memory_gb_max": memory.reserved_gb, "ranks": [{"rank": 0, **peaks}]})
    return out


def test_fit_recovers_activation_scale_and_compute_scale():
    truth = dataclasses.replace(Calibration(), activation_scale=1.3,
                                compute_scale={"sdpa": 1.4, "triton": 0.8})
    layouts = [Layout(mbs=mbs, gbs=64, attention=attn, recompute=rc, cuda_graph=True)  # GPU bound
               for mbs in (8, 16) for attn in ("sdpa", "triton") for rc in ("none", "selective")]
    fitted = fit_calibration(_records(truth, layouts), MODEL, H100)
    assert fitted.activation_scale == pytest.approx(1.3, rel=1e-6)
    assert fitted.memory_offset_gb == pytest.approx(0.0, abs=1e-6)
    assert fitted.compute_scale["sdpa"] == pytest.approx(1.4, rel=1e-6)
    assert fitted.compute_scale["triton"] == pytest.approx(0.8, rel=1e-6)
    # A kernel without trials takes the median of all ratios.
    assert fitted.compute_scale["sdpa_cudnn"] == pytest.approx((0.8 + 1.4) / 2, rel=1e-6)
    assert fitted.source["ok"] == len(layouts)
    # Refitted predictions reproduce the measurements.
    for record, layout in zip(_records(truth, layouts), layouts):
        speed = predict_speed(MODEL, H100, layout, fitted)
        memory = predict_memory(MODEL, H100, layout, fitted)
        assert speed.step_time_s == pytest.approx(record["step_time_s"])
        assert memory.allocated_gb == pytest.approx(record["ranks"][0]["peak_memory_allocated_gb"])


def test_fit_scales_launch_cost_from_host_bound_trials():
    # The host 1.5x slower than the defaults say, per layer and per micro-batch alike.
    base = Calibration()
    truth = dataclasses.replace(base, launch_per_layer_s=1.5 * base.launch_per_layer_s,
                                launch_per_microbatch_s=1.5 * base.launch_per_microbatch_s,
                                eager_step_host_s=1.5 * base.eager_step_host_s,
                                kernel_launch_per_layer_s={k: 1.5 * v for k, v in base.kernel_launch_per_layer_s.items()})
    layouts = [Layout(mbs=1, gbs=16), Layout(mbs=1, gbs=32)]
    fitted = fit_calibration(_records(truth, layouts), MODEL, H100)
    assert fitted.launch_per_layer_s == pytest.approx(truth.launch_per_layer_s, rel=1e-6)
    assert fitted.launch_per_microbatch_s == pytest.approx(truth.launch_per_microbatch_s, rel=1e-6)


def test_fit_learns_a_constant_memory_offset():
    truth = dataclasses.replace(Calibration(), memory_offset_gb=1.7)
    layouts = [Layout(mbs=mbs, gbs=32) for mbs in (1, 2, 4, 8, 16)]  # MIN_LINE_POINTS of them
    fitted = fit_calibration(_records(truth, layouts), MODEL, H100)
    assert fitted.memory_offset_gb == pytest.approx(1.7, abs=0.05)
    # Fewer trials than that: one residual cannot become an offset, only the scale moves.
    noisy = _records(Calibration(), layouts[:3])
    noisy[1]["ranks"][0]["peak_memory_allocated_gb"] += 0.4
    fitted = fit_calibration(noisy, MODEL, H100)
    assert fitted.memory_offset_gb == 0.0 and fitted.activation_scale == pytest.approx(1.0)
    larger = _records(dataclasses.replace(Calibration(), activation_scale=1.1), layouts[:3])
    fitted = fit_calibration(larger, MODEL, H100)
    assert fitted.memory_offset_gb == 0.0 and fitted.activation_scale == pytest.approx(1.1)


def test_an_oom_where_a_fit_was_predicted_widens_the_margin():
    layout = Layout(mbs=48, gbs=192)  # predicted about 61 GiB: fits a 79.1 GiB H100
    before = predict_memory(MODEL, H100, layout)
    assert before.fits
    oom = {"layout": as_dict(layout), "status": "oom", "step_time_s": None, "peak_memory_gb": None}
    ok = _records(Calibration(), [Layout(mbs=2, gbs=32)])
    fitted = fit_calibration(ok + [oom], MODEL, H100)
    assert not predict_memory(MODEL, H100, layout, fitted).fits
    assert predict_memory(MODEL, H100, Layout(mbs=2, gbs=32), fitted).fits


def test_fit_ignores_failed_and_malformed_records():
    good = _records(Calibration(), [Layout(mbs=4, gbs=32)])
    junk = [{"layout": {"tp": 1, "mbs": 2}, "status": "error", "step_time_s": 9.0, "peak_memory_gb": 1.0},
            {"layout": {"no_such_field": 3}, "status": "ok", "step_time_s": 1.0, "peak_memory_gb": 1.0},
            {"layout": {"mbs": 2}, "status": "ok", "step_time_s": None, "peak_memory_gb": None}]
    fitted = fit_calibration(good + junk, MODEL, H100)
    assert fitted.compute_scale["sdpa"] == pytest.approx(1.0)
    assert fitted.activation_scale == pytest.approx(1.0)
    assert fitted.source["ok"] == 1


def _trial(cluster, ranks):
    """A trial record as launch.record assembles it from rank records."""
    from analysis.results import to_row
    from launch.record import trial_record

    spec = TrialSpec(model=MODEL, cluster=cluster, layout=Layout(gbs=8), trial=TrialConfig(), trial_dir="t")
    ranks = [{"rank": i, "status": "ok", "step_times_s": [1.0, 1.0], **fields} for i, fields in enumerate(ranks)]
    record = trial_record(spec, ranks, wall_s=1.0)
    return record, to_row(record)


def test_the_fit_and_the_report_read_the_peak_the_trial_writes():
    # CUDA: the ranks write PeakMemory.fields() (launch/gpu_trial.py); the trial's one peak is
    # the reserved one, the report shows it, and the fit reads the same figures back.
    written = [PeakMemory(allocated_gb=10.0, reserved_gb=11.0, device_used_gb=13.5),
               PeakMemory(allocated_gb=12.0, reserved_gb=12.5, device_used_gb=14.0)]
    record, row = _trial(H100, [p.fields() for p in written])
    assert record[PEAK_MEMORY] == [11.0, 12.5] and record[PEAK_MEMORY_MAX] == 12.5
    assert row["peak_memory_gb"] == 12.5
    assert measured_memory(record) == (12.0, 12.5, 14.0)
    # CPU: the ranks write their RSS (launch/cpu_trial.py); the fit reads it as its peak.
    record, row = _trial(ClusterConfig(), [rss_peak_fields(0.7), rss_peak_fields(0.9)])
    assert row["peak_memory_gb"] == 0.9 and measured_memory(record) == (0.9, None, None)
    # A CUDA record with the reserved peak only, even as a bare number (the old hand-made
    # form), never passes it off as the allocated one: the drift of issue 15.
    record, _ = _trial(H100, [{PEAK_MEMORY: 11.0}])
    record[PEAK_MEMORY] = 11.0
    assert measured_memory(record) == (None, 11.0, None)
    assert fit_calibration([record], MODEL, H100).source["ok"] == 0


def test_peak_memory_keys_are_rank_record_fields():
    # PeakMemory writes and reads keys the typed rank record declares: a renamed field fails here.
    keys = set(PeakMemory(allocated_gb=1.0, reserved_gb=1.0).fields()) | set(rss_peak_fields(1.0))
    assert keys <= set(RankRecord(rank=0, status="ok").__dataclass_fields__)
    rank = RankRecord(rank=0, status="ok").update(PeakMemory(allocated_gb=1.0, reserved_gb=2.0).fields())
    assert PeakMemory.from_rank(rank.to_dict()) == PeakMemory(allocated_gb=1.0, reserved_gb=2.0)
