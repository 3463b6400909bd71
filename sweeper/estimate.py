"""The `estimate` command: predicted memory and speed for layouts read as JSON lines.

    python -m sweeper.estimate [--calibration cal.json] < layouts.jsonl > estimates.jsonl

Each input line is one object:
    {"model": {"num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups", "vocab_size", "seq_length"},
     "layout": {"tp", "pp", "dp", "mbs", "gbs", and optionally "vpp" (1), "cp" (1),
                "recompute" ("none" | "selective" | "full"), "recompute_method" ("uniform"),
                "recompute_num_layers" (1), "sequence_parallel" (false),
                "distributed_optimizer" (false), "attention" ("fused" | "unfused", or a
                kernel name of core.choices; "fused"), "norm" ("fused" | "torch", or a
                kernel name; "fused"), "cuda_graph" (false), and each fusion axis of
                core.choices.FUSION_CHOICES ("swiglu", "loss", "optimizer_step", "add_norm",
                "qkv_grad", "grad_buffer", "embedding_grad", "wgrad_defer": "off" | "step";
                each defaults to its first choice, megatron-core's own path)},
     "cluster": {"gpu_memory_gb", "peak_tflops", "gpus_per_node", and optionally
                 "intra_node_bw_gbps", "inter_node_bw_gbps", "device" ("cuda")}}
Each output line, in input order: {"line": n, "peak_memory_gb", "fits", "step_time_s",
"mfu", "mfu_megatron"}, or {"line": n, "error": "line n: <field>: <what is wrong>"}.
A layout megatron would refuse (tp not dividing the heads, vpp with pp=1, sp with
tp=1, ...) gets an error naming the rule, as the sweeper's `invalid` records do; one
that only exceeds the device's memory gets "fits": false. Numbers must be finite
(NaN, Infinity, 1e999 are refused) and integers at most MAX_INT; every output line is
strict JSON. Input is read as bytes and decoded per line, so a line that is not UTF-8
gets an error and the others their estimates. Blank input lines are skipped. Exit
status: 0 if every line got an estimate, 1 if any line got an error (the others still
get theirs), 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Optional

from core.choices import ATTENTION_KERNELS, FUSION_CHOICES, NORM_KERNELS, RECOMPUTE, RECOMPUTE_METHODS
from core.config import ClusterConfig, Layout, ModelConfig
from sweeper.constants import Calibration, load_calibration
from sweeper.memory import predict_memory
from sweeper.speed import predict_speed
from sweeper.validity import invalid_reason

MAX_INT = 2**24  # ranks, layers, widths, batch sizes: far past any real one, far from overflow

MODEL_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "vocab_size", "seq_length")
# The coarse names ("fused", "unfused") mapped onto the kernels the models know, and every
# kernel of core.choices as itself.
ATTENTION = {"fused": "sdpa_flash", "unfused": "megatron", **{k: k for k in ATTENTION_KERNELS}}
NORM = {"fused": "triton", **{k: k for k in NORM_KERNELS}}


class FieldError(ValueError):
    """A malformed input field; the message names it."""


def _section(data: dict, name: str) -> dict:
    value = data.get(name)
    if not isinstance(value, dict):
        raise FieldError(f"{name}: missing or not an object")
    return value


def _int(section: dict, prefix: str, key: str, default: Optional[int] = None) -> int:
    value = section.get(key, default)
    if value is None:
        raise FieldError(f"{prefix}.{key}: missing")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FieldError(f"{prefix}.{key}: must be a positive integer, got {_short(value)}")
    if value > MAX_INT:
        raise FieldError(f"{prefix}.{key}: must be at most {MAX_INT}, got {_short(value)}")
    return value


def _number(section: dict, prefix: str, key: str, default: Optional[float] = None) -> float:
    value = section.get(key, default)
    if value is None:
        raise FieldError(f"{prefix}.{key}: missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e15:
        raise FieldError(f"{prefix}.{key}: must be a positive finite number, got {_short(value)}")
    return float(value)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _bool(section: dict, prefix: str, key: str) -> bool:
    value = section.get(key, False)
    if not isinstance(value, bool):
        raise FieldError(f"{prefix}.{key}: must be true or false, got {value!r}")
    return value


def _choice(section: dict, prefix: str, key: str, choices, default: str) -> str:
    value = section.get(key, default)
    if value not in choices:
        raise FieldError(f"{prefix}.{key}: must be one of {', '.join(choices)}, got {value!r}")
    return choices[value] if isinstance(choices, dict) else value


def parse_model(data: dict) -> ModelConfig:
    m = _section(data, "model")
    model = ModelConfig(name=str(m.get("name", "model")),
                        **{k: _int(m, "model", k) for k in MODEL_FIELDS})
    if model.hidden_size % model.num_attention_heads:
        raise FieldError("model.num_attention_heads: does not divide hidden_size")
    if model.num_attention_heads % model.num_query_groups:
        raise FieldError("model.num_query_groups: does not divide num_attention_heads")
    return model


def parse_layout(data: dict) -> tuple[Layout, int]:
    d = _section(data, "layout")
    layout = Layout(
        tp=_int(d, "layout", "tp"), pp=_int(d, "layout", "pp"), vpp=_int(d, "layout", "vpp", 1),
        cp=_int(d, "layout", "cp", 1), mbs=_int(d, "layout", "mbs"), gbs=_int(d, "layout", "gbs"),
        recompute=_choice(d, "layout", "recompute", RECOMPUTE, "none"),
        recompute_method=_choice(d, "layout", "recompute_method", RECOMPUTE_METHODS, "uniform"),
        recompute_num_layers=_int(d, "layout", "recompute_num_layers", 1),
        sequence_parallel=_bool(d, "layout", "sequence_parallel"),
        distributed_optimizer=_bool(d, "layout", "distributed_optimizer"),
        attention=_choice(d, "layout", "attention", ATTENTION, "fused"),
        norm=_choice(d, "layout", "norm", NORM, "fused"),
        cuda_graph=_bool(d, "layout", "cuda_graph"),
        **{axis: _choice(d, "layout", axis, choices, choices[0]) for axis, choices in FUSION_CHOICES.items()},
    )
    dp = _int(d, "layout", "dp")
    if layout.gbs % (layout.mbs * dp):
        raise FieldError(f"layout.gbs: {layout.gbs} is not divisible by mbs*dp = {layout.mbs * dp}")
    return layout, dp


def parse_cluster(data: dict, world: int) -> ClusterConfig:
    c = _section(data, "cluster")
    per_node = _int(c, "cluster", "gpus_per_node")
    device = _choice(c, "cluster", "device", ("cuda", "cpu"), "cuda")
    defaults = ClusterConfig() if device == "cpu" else ClusterConfig(
        intra_node_bw_gbps=450.0, inter_node_bw_gbps=50.0)  # the H100 preset's
    return ClusterConfig(
        name=str(c.get("name", "cluster")), device=device, gpus_per_node=per_node,
        nodes=-(-world // per_node),
        gpu_memory_gb=_number(c, "cluster", "gpu_memory_gb"),
        peak_tflops=_number(c, "cluster", "peak_tflops"),
        intra_node_bw_gbps=_number(c, "cluster", "intra_node_bw_gbps", defaults.intra_node_bw_gbps),
        inter_node_bw_gbps=_number(c, "cluster", "inter_node_bw_gbps", defaults.inter_node_bw_gbps),
    )


def megatron_reason(model: ModelConfig, layout: Layout, world: int) -> Optional[str]:
    """The sweeper's validity rules, less the two that only this project's trial path adds.

    A layout here may come from Megatron-LM runs (Transformer Engine), which run context
    parallelism (given seq_length % (2 * cp) == 0, Megatron-LM's arguments.py) and uniform
    recompute groups that leave a ragged last group; both get estimates.
    """
    if layout.cp > 1 and model.seq_length % (2 * layout.cp):
        return f"seq_length {model.seq_length} is not divisible by 2*cp = {2 * layout.cp} (context parallel)"
    probe = dataclasses.replace(layout, cp=1, recompute_num_layers=1)
    return invalid_reason(model, probe, world // layout.cp)


def _finite(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise FieldError(f"number {text[:40]} is not finite")
    return value


def _no_constant(name: str):
    raise FieldError(f"{name} is not a number JSON allows")


def estimate_line(text: str, calibration: Optional[Calibration]) -> dict:
    try:
        data = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except FieldError:
        raise
    except ValueError as err:
        raise FieldError(f"not JSON ({err})") from None
    if not isinstance(data, dict):
        raise FieldError("not a JSON object")
    model = parse_model(data)
    layout, dp = parse_layout(data)
    world = layout.tp * layout.pp * layout.cp * dp
    reason = megatron_reason(model, layout, world)
    if reason:
        raise FieldError(f"layout: invalid: {reason}")
    cluster = parse_cluster(data, world)
    memory = predict_memory(model, cluster, layout, calibration, dp=dp)
    speed = predict_speed(model, cluster, layout, calibration, dp=dp)
    return {"peak_memory_gb": round(memory.peak_gb, 3), "fits": memory.fits,
            "step_time_s": round(speed.step_time_s, 6), "mfu": round(speed.mfu, 5),
            "mfu_megatron": round(speed.mfu_megatron, 5)}


def _lines(stdin):
    """(number, text or None if not UTF-8) per input line, from bytes where there are any."""
    source = getattr(stdin, "buffer", stdin)
    for number, raw in enumerate(source, start=1):
        if isinstance(raw, str):
            yield number, raw
            continue
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError:
            yield number, None


def _answer(number: int, text: Optional[str], calibration) -> tuple[dict, bool]:
    """(output object, whether it is an error) for one input line."""
    if text is None:
        return {"line": number, "error": f"line {number}: not UTF-8 text"}, True
    try:
        out = {"line": number, **estimate_line(text, calibration)}
        json.dumps(out, allow_nan=False)  # an overflow to inf or nan must not print
        return out, False
    except FieldError as err:
        return {"line": number, "error": f"line {number}: {err}"}, True
    except Exception as err:  # one odd line must not cost the others their answers
        return {"line": number, "error": f"line {number}: {type(err).__name__}: {str(err)[:200]}"}, True


def main(argv=None, stdin=None, stdout=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeper.estimate", description=__doc__.split("\n")[0])
    parser.add_argument("--calibration", help="calibration JSON (default: built-in constants)")
    args = parser.parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    try:
        calibration = load_calibration(args.calibration) if args.calibration else None
    except (OSError, ValueError) as err:  # ConfigError and bad JSON are ValueErrors
        print(f"estimate: cannot read calibration {args.calibration}: {err}", file=sys.stderr)
        return 2
    failed = False
    for number, text in _lines(stdin):
        if text is not None and not text.strip():
            continue
        out, error = _answer(number, text, calibration)
        failed = failed or error
        stdout.write(json.dumps(out, allow_nan=False) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
