"""Run a function on N CPU ranks over gloo with megatron-core's parallel state set up.

    results = run_on_gloo(fn, world_size=2, tp=2, args=(...,))

`fn(rank, *args)` runs in a fresh spawned process per rank; its return value
(picklable) comes back in rank order. An exception on any rank fails the call
with that rank's traceback.
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import time
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, tp, pp, port, fn, args, queue):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state

        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
        )
        torch.manual_seed(1234)
        queue.put((rank, "ok", fn(rank, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_on_gloo(fn, *, world_size=2, tp=1, pp=1, args=(), timeout_s=600):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, tp, pp, port, fn, args, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results = {}
    deadline = time.time() + timeout_s
    try:
        while len(results) < world_size:
            try:
                rank, status, value = queue.get(timeout=1.0)
            except queue_module.Empty:
                # A rank killed before it could report (segfault, OOM kill) must not
                # leave the test waiting for the whole timeout.
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                if time.time() > deadline:
                    raise TimeoutError(f"ranks did not finish within {timeout_s} s")
                continue
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
