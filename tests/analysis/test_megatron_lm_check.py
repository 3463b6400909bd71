"""The printed Megatron-LM command, checked by Megatron-LM itself (tag core_v0.16.1, on CPU).

Megatron-LM's folder is ../shared/megatron_lm beside the repository, or $LAYOUT_SWEEP_MEGATRON_LM;
without it these tests skip. Every model preset x a layout of each kind goes through
Megatron-LM's parse_args + validate_args (tests/analysis/megatron_lm_parse.py, one process
for all lines) and must be accepted with the layout's own values; then one small model is
built and trained one step by pretrain_gpt.py's own model provider and forward step with
our --spec (the folder's check_cpu.py); and the printed NAME's fusions (_fused_qkv_grad,
_wgrad_fusion) go through Megatron-LM's own get_model (megatron-core DDP) and train_step,
giving the main_grad of the same NAME without them (megatron_lm_grads.py).
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from analysis.megatron_args import megatron_lm_command
from core.choices import spec_name
from core.config import Layout, ModelConfig, model_from_dict
from sweeper.validity import invalid_reason

REPO = Path(__file__).resolve().parents[2]
MEGATRON_LM = Path(os.environ.get("LAYOUT_SWEEP_MEGATRON_LM", REPO.parent / "shared" / "megatron_lm"))
PARSER = Path(__file__).with_name("megatron_lm_parse.py")
GRADS = Path(__file__).with_name("megatron_lm_grads.py")

pytestmark = pytest.mark.skipif(not (MEGATRON_LM / "megatron" / "training" / "arguments.py").exists(),
                                reason=f"no Megatron-LM folder at {MEGATRON_LM} (set LAYOUT_SWEEP_MEGATRON_LM)")

PRESETS = {p.stem: model_from_dict(yaml.safe_load(p.read_text()))
           for p in sorted((REPO / "conf" / "model").glob("*.yaml"))}
# kind -> (layout, world size): each parallelism and recompute axis, the kernels varied too.
KINDS = {
    "cp1 base": (Layout(mbs=1, gbs=8, attention="sdpa_cudnn", norm="triton", qkv_grad="fused"), 1),
    "tp2 dp2": (Layout(tp=2, mbs=1, gbs=8, attention="triton", norm="triton"), 4),
    "pp2 vpp2": (Layout(pp=2, vpp=2, mbs=1, gbs=8, attention="megatron", norm="megatron"), 2),
    "tp2 sp": (Layout(tp=2, sequence_parallel=True, mbs=2, gbs=8, attention="sdpa", norm="torch",
                      swiglu="triton"), 2),
    "selective": (Layout(mbs=2, gbs=8, recompute="selective", attention="sdpa_flash", norm="triton"), 1),
    "full uniform": (Layout(mbs=1, gbs=8, recompute="full", recompute_method="uniform",
                            recompute_num_layers=2, attention="sdpa_cudnn", norm="triton"), 1),
    "full block pp2": (Layout(pp=2, mbs=1, gbs=8, recompute="full", recompute_method="block",
                              recompute_num_layers=1, attention="sdpa_cudnn", norm="triton"), 2),
    "distopt dp2": (Layout(mbs=2, gbs=8, distributed_optimizer=True, attention="sdpa_cudnn",
                           norm="triton", cuda_graph=True, add_norm="fused"), 2),
}


def _run(cases: list[dict]) -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": f"{MEGATRON_LM}{os.pathsep}{REPO}", "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, str(PARSER)], input="\n".join(json.dumps(c) for c in cases),
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.removeprefix("RESULT ") for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return {r["id"]: r for r in map(json.loads, lines)}


def _case(case_id: str, model: ModelConfig, layout: Layout, world: int, **change) -> dict:
    cmd = megatron_lm_command(model, layout, world_size=world)
    return {"id": case_id, "args": change.get("args", cmd.args), "env": change.get("env", cmd.env),
            "world_size": world}


def _expected(model: ModelConfig, layout: Layout, world: int) -> dict:
    full = layout.recompute == "full"
    return {"tensor_model_parallel_size": layout.tp, "pipeline_model_parallel_size": layout.pp,
            "virtual_pipeline_model_parallel_size": layout.vpp if layout.vpp > 1 else None,
            "context_parallel_size": layout.cp, "data_parallel_size": layout.dp(world),
            "micro_batch_size": layout.mbs, "global_batch_size": layout.gbs,
            "recompute_granularity": None if layout.recompute == "none" else layout.recompute,
            "recompute_method": layout.recompute_method if full else None,
            "recompute_num_layers": layout.recompute_num_layers if full else None,
            "sequence_parallel": layout.sequence_parallel,
            "use_distributed_optimizer": layout.distributed_optimizer,
            "num_layers": model.num_layers, "hidden_size": model.hidden_size,
            "ffn_hidden_size": model.ffn_hidden_size, "num_attention_heads": model.num_attention_heads,
            "num_query_groups": model.num_query_groups, "kv_channels": model.head_dim,
            "seq_length": model.seq_length, "padded_vocab_size": model.vocab_size,
            "position_embedding_type": "rope" if layout.attention == "megatron" else "none",
            "bf16": True, "spec_layers": model.num_layers // (layout.pp * layout.vpp),
            "spec_final_norm": {"triton": "TritonRMSNorm", "torch": "TorchRMSNorm"}.get(layout.norm, "WrappedTorchNorm")}


def _negative_cases() -> list[dict]:
    """Negative controls: the mistakes the old command made, which the checker must catch."""
    model = PRESETS["llama_1b3"]
    tp2, world = KINDS["tp2 dp2"]
    vpp = KINDS["pp2 vpp2"][0]
    good = megatron_lm_command(model, vpp, world_size=2).args
    i = good.index("--num-virtual-stages-per-pipeline-rank")
    old_vpp = good[:i] + ["--virtual-pipeline-model-parallel-size"] + good[i + 1:]
    vocab = megatron_lm_command(model, Layout(mbs=1, gbs=8), world_size=1).args
    j = vocab.index("--vocab-size")
    full_vocab = vocab[:j + 1] + [str(model.vocab_size)] + vocab[j + 2:]  # V, not V-1
    return [_case("no env", model, tp2, world, env={}),
            _case("old vpp flag", model, vpp, 2, args=old_vpp),
            _case("vocab V", model, Layout(mbs=1, gbs=8), 1, args=full_vocab)]


# The recommendations the issue found rejected: the predicted best of these, as printed.
RECOMMENDED = [("llama_1b3", "h100_80gb", 512), ("llama2_13b", "h100_80gb", 512),
               ("llama2_70b", "h100_80gb", 1024), ("llama_1b3", "local_gpu", 16)]


def _recommended_cases() -> list[dict]:
    from analysis.recommend import predicted

    cases = []
    for model, cluster, gbs in RECOMMENDED:
        best = predicted(model, cluster, gbs, top=1)["best"]
        cases.append({"id": f"recommended {model} {cluster}", "args": best["megatron_lm"]["args"],
                      "env": best["megatron_lm"]["env"], "world_size": best["world_size"]})
    return cases


@pytest.fixture(scope="module")
def checked() -> tuple[dict, dict]:
    """Megatron-LM's verdicts on every preset x layout kind, the recommendations and the
    negative controls, in one process."""
    cases, expected = _negative_cases() + _recommended_cases(), {}
    for name, model in PRESETS.items():
        for kind, (layout, world) in KINDS.items():
            assert invalid_reason(model, layout, world) is None, (name, kind)
            cases.append(_case(f"{name} | {kind}", model, layout, world))
            expected[f"{name} | {kind}"] = _expected(model, layout, world)
    return _run(cases), expected


def test_every_preset_and_layout_kind_is_accepted_with_its_values(checked):
    results, expected = checked
    table = ["| preset | layout | accepted | values match |", "|---|---|---|---|"]
    wrong = {}
    for case_id, want in expected.items():
        got = results[case_id]
        values = got.get("values", {})
        diff = {k: (values.get(k), v) for k, v in want.items() if values.get(k) != v}
        if got["status"] != "ok" or diff:
            wrong[case_id] = got.get("why") or diff
        name, kind = case_id.split(" | ")
        table.append(f"| {name} | {kind} | {got['status'] == 'ok'} | {got['status'] == 'ok' and not diff} |")
    print("\n".join(table))
    assert not wrong, wrong


def test_predicted_recommendations_are_accepted(checked):
    results, _ = checked
    verdicts = {k: (v["status"], v.get("why")) for k, v in results.items() if k.startswith("recommended ")}
    assert len(verdicts) == len(RECOMMENDED) and all(s == "ok" for s, _ in verdicts.values()), verdicts


def test_megatron_lm_rejects_what_the_command_avoids(checked):
    results, _ = checked
    assert results["no env"]["status"] == "validate rejected"
    assert "CUDA_DEVICE_MAX_CONNECTIONS" in results["no env"]["why"]
    assert results["old vpp flag"]["status"] == "parse rejected"
    assert results["vocab V"]["status"] == "ok"
    assert results["vocab V"]["values"]["padded_vocab_size"] != PRESETS["llama_1b3"].vocab_size


def test_pretrain_gpt_builds_and_steps_our_spec_on_cpu():
    """pretrain_gpt.py's own model provider (gpt_builders.py, --spec) and forward_step, on CPU:
    a 2-layer model with our SDPA attention (RoPE inside) and torch RMSNorm. check_cpu.py's
    forward uses token ids below 31999 and seq 256, hence this shape."""
    model = replace(PRESETS["tiny"], num_layers=2, vocab_size=32000, seq_length=256)
    layout = Layout(mbs=2, gbs=8, attention="sdpa", norm="torch")
    cmd = megatron_lm_command(model, layout, world_size=1)
    env = {**os.environ, "PYTHONPATH": f"{MEGATRON_LM}{os.pathsep}{REPO}", "MLMRUN_CPU_FORWARD": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}  # the shared folder stays as it is
    done = subprocess.run([sys.executable, str(MEGATRON_LM / "check_cpu.py"), *cmd.args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=MEGATRON_LM)
    out = done.stdout
    assert done.returncode == 0, (out[-2000:], done.stderr[-3000:])
    built = next(line for line in out.splitlines() if line.startswith("[4] GPTModel built"))
    params = f"{model.num_params():,} parameters"
    assert built.startswith(f"[4] GPTModel built: {params}"), built
    assert "core attention: SDPACoreAttention | norm: TorchRMSNorm" in out and "rotary: NoneType" in out
    assert "[6] forward+backward through pretrain_gpt.forward_step on CPU: loss" in out


# main_grad after Megatron-LM's train_step, fused NAME against the same NAME without the fusions,
# both fp32 on CPU: max |difference| over max |stock value|, per parameter. The fused paths
# accumulate with addmm into main_grad instead of a GEMM then DDP's add, and the RoPE backward
# writes one buffer instead of a concatenation: rounding at most (1e-5); a double add is ~1.
GRAD_RTOL = 1e-5
ITERATIONS, MICRO_BATCHES = 2, 2  # the second iteration starts after train_step's zero_grad_buffer


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, dict]:
    """One layer of `tiny` with one query head per KV group (where megatron's q, k, v are views
    of the QKV output, so the fused RoPE backward runs), the kernels of the H200 sweep's best
    layout that reach the spec (our SDPA attention, Triton norm and SwiGLU, add_norm and qkv_grad
    fused): the printed line without --bf16 (fp32), three runs in one process."""
    tiny = PRESETS["tiny"]
    model = replace(tiny, num_layers=1, num_query_groups=tiny.num_attention_heads, seq_length=32)
    layout = Layout(mbs=1, gbs=MICRO_BATCHES, attention="sdpa", norm="triton", swiglu="triton",
                    add_norm="fused", qkv_grad="fused")
    args = [a for a in megatron_lm_command(model, layout, world_size=1).args if a != "--bf16"]
    name = args[args.index("--spec") + 2]
    runs = [{"id": "stock", "spec": spec_name("sdpa", "triton", "triton", "fused")}, {"id": "fused", "spec": name},
            {"id": "double add", "spec": name, "plant": "double_add"}]
    out = tmp_path_factory.mktemp("grads") / "grads.pt"
    # TRITON_INTERPRET: our RoPE and norm kernels run (interpreted) as on the GPU; without it the
    # RoPE falls back to torch and the fused QKV backward never runs. TORCHDYNAMO_DISABLE: megatron's
    # torch.compile'd bias-dropout-add runs eager (5 s of compiling, the same math in every run).
    env = {**os.environ, "PYTHONPATH": f"{MEGATRON_LM}{os.pathsep}{REPO}", "PYTHONDONTWRITEBYTECODE": "1",
           "TRITON_INTERPRET": "1", "TORCHDYNAMO_DISABLE": "1"}
    case = {"args": args, "runs": runs, "iterations": ITERATIONS}
    done = subprocess.run([sys.executable, str(GRADS), str(out)], input=json.dumps(case), capture_output=True,
                          text=True, env=env, timeout=300, cwd=MEGATRON_LM)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    return name, torch.load(out)


def _relative_errors(got: dict, want: dict) -> dict[str, float]:
    assert got.keys() == want.keys()
    return {k: float((got[k] - want[k]).abs().max() / want[k].abs().max()) for k in want}


def test_printed_fusions_train_in_megatron_lm_with_the_stock_gradients(trained):
    name, runs = trained
    assert name == "sdpa_attention_triton_norm_triton_swiglu_fused_add_norm_fused_qkv_grad_wgrad_fusion"
    stock, fused = runs["stock"], runs["fused"]
    # The fused paths ran: every decoder weight went straight into main_grad, the fused-QKV RoPE
    # backward ran once per layer and micro-batch; megatron's output layer and embedding did not.
    decoder = sorted(k for k in stock["main_grad"] if k.startswith("decoder."))
    assert fused["fused_params"] == decoder and stock["fused_params"] == []
    assert fused["rope_qkv_calls"] == ITERATIONS * MICRO_BATCHES and stock["rope_qkv_calls"] == 0
    errors = _relative_errors(fused["main_grad"], stock["main_grad"])
    print(f"worst main_grad difference, fused over stock: {max(errors.values()):.2e} of the tensor's max")
    assert max(errors.values()) <= GRAD_RTOL, errors
    assert all(g.abs().max() > 0 for g in stock["main_grad"].values())  # no gradient trivially equal
    loss = [[step["lm loss"] for step in run["losses"]] for run in (fused, stock)]
    assert loss[0] == pytest.approx(loss[1], rel=1e-6)


def test_a_planted_double_add_fails_the_comparison(trained):
    """Negative control: kernels.wgrad adding each weight gradient twice (what a missing
    grad_added_to_main_grad would do with DDP's hook adding the real gradient again)."""
    _, runs = trained
    errors = _relative_errors(runs["double add"]["main_grad"], runs["stock"]["main_grad"])
    linears = {k: v for k, v in errors.items() if "linear_" in k}
    assert linears and min(linears.values()) > 0.5, errors  # twice the gradient: off by ~1
    assert max(errors.values()) > GRAD_RTOL
