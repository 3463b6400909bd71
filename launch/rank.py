"""One rank of one trial: `python -m launch.rank TRIAL_DIR/spec.json`.

Runs the trial's steps and writes `rank{N}.json` whatever happens; the
supervisor turns a rank that died without one into a record too.
`python -m launch.rank --spare DEVICE IMPORT_LOG` is a rank started ahead of
its trial (`launch.spare`).
"""

from __future__ import annotations

import importlib
import os
import platform
import socket
import sys
import time
import traceback

from core.records import RankRecord, rank_path, write_json_atomic
from core.spec import TrialSpec
from launch import spare
from launch.divergence import Diverged
from launch.record import classify


def _version(module: str):
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001 - a missing version is not a failed trial
        return None


def environment(device: str) -> dict:
    """Where and with what this rank ran: recorded with every trial."""
    import torch

    return {
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": _version("megatron.core"),
        "triton": _version("triton"),
        "device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu"),
    }


def run(spec: TrialSpec) -> dict:
    from launch import distributed

    rank, world = distributed.init(spec.layout, device=spec.cluster.device, timeout_s=spec.trial.timeout_s)
    try:
        if spec.cluster.device == "cuda":
            from launch.gpu_trial import run_steps
        else:
            from launch.cpu_trial import run_steps
        return run_steps(spec, rank=rank, world=world)
    finally:
        distributed.shutdown()


def serve(device: str, import_log: str) -> int:
    """A spare rank (launch.spare): import the trial path for DEVICE, wait for one rank, run it."""
    from launch import distributed  # noqa: F401 - imported ahead of need

    if device == "cuda":
        import launch.gpu_trial  # noqa: F401
    else:
        import launch.cpu_trial  # noqa: F401
    import kernels.megatron_attention  # noqa: F401
    import kernels.megatron_norm  # noqa: F401

    spec_path = spare.receive(import_log)
    return 0 if spec_path is None else main([spec_path])


def main(argv: list[str]) -> int:
    spec = TrialSpec.load(argv[0])
    rank = int(os.environ["RANK"])
    record = RankRecord(rank=rank, status="error", started_at=time.time(),
                        prestarted="LAYOUT_SWEEP_ASSIGNED_AT" in os.environ)
    try:
        record.env = environment(spec.cluster.device)
        record.update(run(spec))
        record.status = "ok"
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a record
        record.update(status=classify(exc), error=f"{type(exc).__name__}: {exc}"[:2000],
                      traceback=traceback.format_exc()[-8000:])
        if isinstance(exc, Diverged):
            record.update(exc.record)  # the step it diverged at, and the losses until then
    record.finished_at = time.time()
    write_json_atomic(rank_path(spec.trial_dir, rank), record.to_dict())
    sys.stdout.flush()
    return 0 if record.status == "ok" else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--spare"]:
        os._exit(serve(*sys.argv[2:4]))
    os._exit(main(sys.argv[1:]))
