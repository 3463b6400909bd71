"""The `estimate` command end to end, as a script would run it."""

import json
import subprocess
import sys
from pathlib import Path

from core.config import ClusterConfig, Layout, ModelConfig
from sweeper.constants import Calibration, save_calibration
from sweeper.memory import predict_memory
from sweeper.speed import predict_speed

ROOT = Path(__file__).resolve().parents[2]
MODEL = {"num_layers": 24, "hidden_size": 2048, "ffn_hidden_size": 5632, "num_attention_heads": 16,
         "num_query_groups": 16, "vocab_size": 32000, "seq_length": 2048}
CLUSTER = {"gpu_memory_gb": 79.1, "peak_tflops": 989.4, "gpus_per_node": 8}
# What the command makes of CLUSTER (the H100 preset's bandwidths by default).
API_CLUSTER = ClusterConfig(device="cuda", gpus_per_node=8, nodes=1, gpu_memory_gb=79.1,
                            peak_tflops=989.4, intra_node_bw_gbps=450.0, inter_node_bw_gbps=50.0)


def _line(**layout) -> dict:
    base = {"tp": 1, "pp": 1, "vpp": 1, "cp": 1, "dp": 1, "mbs": 4, "gbs": 16, "recompute": "none",
            "sequence_parallel": False, "distributed_optimizer": False, "attention": "fused",
            "norm": "torch"}
    return {"model": dict(MODEL), "layout": {**base, **layout}, "cluster": dict(CLUSTER)}


def _run(lines: list[str], *args: str) -> tuple[int, list[dict], str]:
    proc = subprocess.run([sys.executable, "-m", "sweeper.estimate", *args], cwd=ROOT,
                          input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=60)
    return proc.returncode, [json.loads(x) for x in proc.stdout.splitlines()], proc.stderr


def test_every_line_gets_an_estimate_in_order():
    lines = [json.dumps(_line(mbs=4)), json.dumps(_line(mbs=1)),
             json.dumps(_line(tp=2, pp=2, dp=2, mbs=1, sequence_parallel=True, recompute="full",
                              distributed_optimizer=True, attention="unfused", norm="fused"))]
    code, out, _ = _run(lines)
    assert code == 0
    assert [o["line"] for o in out] == [1, 2, 3]
    for o in out:
        assert set(o) >= {"peak_memory_gb", "fits", "step_time_s", "mfu"}
        assert o["fits"] is True and 0 < o["mfu"] < 1 and o["step_time_s"] > 0
    # The command reports what the API predicts for the same layout.
    model = ModelConfig(name="m", **MODEL)
    cluster = API_CLUSTER
    layout = Layout(mbs=4, gbs=16, attention="sdpa_flash", norm="torch")
    assert abs(out[0]["peak_memory_gb"] - predict_memory(model, cluster, layout, dp=1).peak_gb) < 1e-3
    assert abs(out[0]["step_time_s"] - predict_speed(model, cluster, layout, dp=1).step_time_s) < 1e-5
    assert out[1]["peak_memory_gb"] < out[0]["peak_memory_gb"]  # smaller micro-batch


def test_a_malformed_line_gets_an_error_and_the_others_still_get_results():
    missing = _line()
    del missing["model"]["hidden_size"]
    bad_type = _line(tp="two")
    bad_choice = _line(recompute="sometimes")
    lines = [json.dumps(_line()), json.dumps(missing), "not json", "",
             json.dumps(bad_type), json.dumps(bad_choice), json.dumps(_line(mbs=2))]
    code, out, _ = _run(lines)
    assert code == 1  # any failed line makes the exit status non-zero
    assert [o["line"] for o in out] == [1, 2, 3, 5, 6, 7]  # the blank line 4 is skipped
    assert "peak_memory_gb" in out[0] and "peak_memory_gb" in out[5]
    assert out[1]["error"].startswith("line 2:") and "model.hidden_size" in out[1]["error"]
    assert out[2]["error"].startswith("line 3:") and "JSON" in out[2]["error"]
    assert "layout.tp" in out[3]["error"]
    assert "layout.recompute" in out[4]["error"]


def test_batch_that_does_not_divide_names_gbs():
    code, out, _ = _run([json.dumps(_line(mbs=4, dp=3, gbs=16))])
    assert code == 1
    assert "layout.gbs" in out[0]["error"]


def test_fits_is_false_when_the_memory_is_too_small():
    small = _line()
    small["cluster"]["gpu_memory_gb"] = 16.0
    code, out, _ = _run([json.dumps(small)])
    assert code == 0
    assert out[0]["fits"] is False and out[0]["peak_memory_gb"] > 16.0


def test_optional_bandwidths_change_communication_time():
    slow = _line(tp=8, mbs=4, gbs=16)
    slow["cluster"]["intra_node_bw_gbps"] = 10.0
    code, out, _ = _run([json.dumps(_line(tp=8, mbs=4, gbs=16)), json.dumps(slow)])
    assert code == 0
    assert out[1]["step_time_s"] > out[0]["step_time_s"]


def test_calibration_file_is_used(tmp_path):
    path = tmp_path / "calibration.json"
    save_calibration(Calibration(activation_scale=2.0), path)
    _, plain, _ = _run([json.dumps(_line())])
    code, calibrated, _ = _run([json.dumps(_line())], "--calibration", str(path))
    assert code == 0
    assert calibrated[0]["peak_memory_gb"] > plain[0]["peak_memory_gb"]
    code, out, err = _run([json.dumps(_line())], "--calibration", str(tmp_path / "missing.json"))
    assert code == 2 and out == [] and "missing.json" in err


def test_an_invalid_layout_names_the_rule_like_the_sweeper():
    lines = [json.dumps(_line(vpp=2)), json.dumps(_line(tp=3, dp=1, gbs=12, mbs=4)),
             json.dumps(_line(sequence_parallel=True)), json.dumps(_line(mbs=16))]
    code, out, _ = _run(lines)
    assert code == 1
    assert "vpp > 1) needs pp > 1" in out[0]["error"]
    assert "not divisible by tp 3" in out[1]["error"]
    assert "sequence parallel needs tp > 1" in out[2]["error"]
    # A valid layout that only exceeds the device's memory is an estimate, not an error.
    assert out[3]["fits"] is False and out[3]["peak_memory_gb"] > CLUSTER["gpu_memory_gb"]


def test_huge_and_non_finite_numbers_are_refused_per_line():
    good = json.dumps(_line())
    lines = [good.replace('"dp": 1,', '"dp": 1e300,'),
             good.replace('"dp": 1,', '"dp": ' + "1" + "0" * 300 + ","),
             good.replace('"peak_tflops": 989.4', '"peak_tflops": Infinity'),
             good.replace('"peak_tflops": 989.4', '"peak_tflops": 1e999'),
             good.replace('"peak_tflops": 989.4', '"peak_tflops": NaN'),
             good]
    assert all(a != good for a in lines[:-1])  # each replacement applied
    code, out, _ = _run(lines)
    assert code == 1 and [o["line"] for o in out] == [1, 2, 3, 4, 5, 6]
    assert all("error" in o for o in out[:5]) and "peak_memory_gb" in out[5]
    assert "layout.dp" in out[0]["error"] and "layout.dp" in out[1]["error"]
    assert "Infinity" in out[2]["error"] and "1e999" in out[3]["error"] and "NaN" in out[4]["error"]


def test_a_bad_byte_costs_only_its_own_line():
    good = json.dumps(_line()).encode()
    data = good + b"\n" + b'{"model": "\xff"}\n' + good + b"\n"
    proc = subprocess.run([sys.executable, "-m", "sweeper.estimate"], cwd=ROOT, input=data,
                          capture_output=True, timeout=60)
    out = [json.loads(x) for x in proc.stdout.decode().splitlines()]  # strict JSON, every line
    assert proc.returncode == 1 and [o["line"] for o in out] == [1, 2, 3]
    assert "not UTF-8" in out[1]["error"]
    assert out[0]["peak_memory_gb"] == out[2]["peak_memory_gb"]


def test_cuda_graph_is_an_optional_layout_field():
    code, out, _ = _run([json.dumps(_line(mbs=1, gbs=16)), json.dumps(_line(mbs=1, gbs=16, cuda_graph=True)),
                         json.dumps(_line(mbs=1, gbs=16, cuda_graph="yes"))])
    assert out[1]["step_time_s"] < out[0]["step_time_s"] / 2  # eager mbs 1 is host-bound
    assert "layout.cuda_graph" in out[2]["error"] and code == 1


def test_fusion_axes_are_optional_layout_fields():
    # wgrad_defer=step at mbs 1 (16 micro-batches) saves the per-micro-batch main_grad
    # read-modify-write (sweeper.speed); an unknown choice and a rule of sweeper.validity
    # (the deferral needs pp = 1) are errors of their own lines.
    base = dict(mbs=1, gbs=16, cuda_graph=True, norm="triton")
    code, out, _ = _run([json.dumps(_line(**base)), json.dumps(_line(**base, wgrad_defer="step")),
                         json.dumps(_line(**base, wgrad_defer="always")),
                         json.dumps(_line(**base, wgrad_defer="step", pp=2))])
    assert out[1]["step_time_s"] < out[0]["step_time_s"]
    layout = Layout(mbs=1, gbs=16, cuda_graph=True, norm="triton", attention="sdpa_flash", wgrad_defer="step")
    expected = predict_speed(ModelConfig(**MODEL), API_CLUSTER, layout, dp=1)
    assert out[1]["step_time_s"] == round(expected.step_time_s, 6)
    assert "layout.wgrad_defer: must be one of off, step" in out[2]["error"]
    assert "wgrad_defer=step needs pp = 1" in out[3]["error"] and code == 1


def test_megatron_lm_layouts_outside_the_trial_path_still_get_estimates():
    # Context parallelism and a ragged uniform recompute group run in Megatron-LM (with
    # Transformer Engine); only the sweeper's own trial path refuses them.
    code, out, _ = _run([json.dumps(_line(cp=2, mbs=1)),
                         json.dumps(_line(recompute="full", recompute_num_layers=5)),
                         json.dumps(_line(cp=3, mbs=1))])
    assert "peak_memory_gb" in out[0] and "peak_memory_gb" in out[1]
    assert "2*cp = 6" in out[2]["error"] and code == 1  # 2048 % 6: Megatron-LM's own rule
