"""Megatron-LM's own parse_args + validate_args on many command lines in one process (CPU).

    PYTHONPATH=<megatron_lm folder>:<repo> python megatron_lm_parse.py < cases.jsonl > results.jsonl

Each input line: {"id", "args": [...], "env": {NAME: VALUE}, "world_size": N}. Each output
line, after "RESULT ": {"id", "status": "ok" | "parse rejected" | "validate rejected", "why", "values"}.
It does what ../shared/megatron_lm/check_args.py does (the GPU taken as Hopper, arch 9,
which only the CUDA_DEVICE_MAX_CONNECTIONS rule reads), one process for all lines because
importing Megatron-LM's arguments takes seconds, and returns the parsed values:
the padded vocabulary comes from Megatron-LM's own tokenizer builder, and `--spec` is
imported through megatron-core's import_module and its block resolved against these args.
"""

import contextlib
import io
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("RANK", "0")
os.environ.setdefault("LOCAL_RANK", "0")

import megatron.training.arguments as margs  # noqa: E402
from megatron.core.transformer.spec_utils import import_module  # noqa: E402
from megatron.training import global_vars  # noqa: E402
from megatron.training.tokenizer import build_tokenizer  # noqa: E402

margs.get_device_arch_version = lambda: 9  # Hopper (H100/H200), as check_args.py
PREFIX = "RESULT "
ENV_KEYS = ("CUDA_DEVICE_MAX_CONNECTIONS",)  # the exports validate_args reads
VALUES = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
          "virtual_pipeline_model_parallel_size", "context_parallel_size", "data_parallel_size",
          "micro_batch_size", "global_batch_size", "recompute_granularity", "recompute_method",
          "recompute_num_layers", "recompute_modules", "sequence_parallel", "use_distributed_optimizer",
          "overlap_grad_reduce", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
          "group_query_attention", "num_query_groups", "kv_channels", "seq_length",
          "max_position_embeddings", "position_embedding_type", "bf16", "transformer_impl",
          "normalization", "swiglu", "add_bias_linear", "untie_embeddings_and_output_weights")


def check(case: dict) -> dict:
    for key in ENV_KEYS:
        os.environ.pop(key, None)
    os.environ.update({k: v for k, v in case.get("env", {}).items() if k in ENV_KEYS})
    os.environ["WORLD_SIZE"] = str(case["world_size"])
    sys.argv = ["pretrain_gpt.py", *case["args"]]
    out = {"id": case["id"]}
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            args = margs.parse_args()
    except SystemExit:
        return {**out, "status": "parse rejected", "why": quiet.getvalue()[-300:]}
    try:
        with contextlib.redirect_stdout(quiet):
            margs.validate_args(args, {})
            build_tokenizer(args)  # sets args.padded_vocab_size, as set_global_variables does
    except BaseException as exc:  # noqa: BLE001 - validate_args asserts; every reason is a result
        return {**out, "status": "validate rejected", "why": f"{type(exc).__name__}: {exc}"[:400]}
    values = {k: getattr(args, k, None) for k in VALUES}
    values["padded_vocab_size"] = args.padded_vocab_size
    values["spec"] = args.spec
    if args.spec:
        global_vars.set_args(args)  # what initialize_megatron sets before building the model
        try:
            block = import_module(args.spec)
            values["spec_layers"] = len(block.layer_specs)
            norm = getattr(block.layer_norm, "module", block.layer_norm)  # a ModuleSpec with params, or a class
            values["spec_final_norm"] = getattr(norm, "__name__", type(norm).__name__)
        except Exception as exc:  # noqa: BLE001 - a spec that does not resolve is a result too
            return {**out, "status": "spec rejected", "why": f"{type(exc).__name__}: {exc}"[:400]}
        finally:
            global_vars.set_args(None)
    return {**out, "status": "ok", "values": json.loads(json.dumps(values, default=str))}


def main() -> None:
    for line in sys.stdin:
        if line.strip():
            # A prefix: Megatron-LM's loggers write to stdout too.
            print(PREFIX + json.dumps(check(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
