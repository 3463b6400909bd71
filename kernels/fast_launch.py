"""Launch a compiled Triton kernel again without `JITFunction.run`'s per-call host work.

`kernel[grid](...)` binds every argument, computes the specialization key (dtype and
16-byte alignment of each pointer, divisibility of each int), looks the compiled kernel up,
re-checks the globals it read, then launches. For a short kernel called in eager training
steps that costs more host time than the GPU spends (H200: an RMSNorm forward of 8192 x 5120
takes ~40 us on the GPU). `CachedLaunch` does the first call through `kernel[grid]`, keeps
the CompiledKernel under a key the caller builds, and later calls its launcher directly:
the same `run(grid, stream, function, metadata, hooks, *args)` call that Triton 3.6-3.9's
`JITFunction.run` ends with.

The caller's key must hold everything Triton specializes on, for the arguments that can
vary: dtypes, pointer alignment (`aligned`), and the value of every int not marked
`do_not_specialize`. Under TRITON_INTERPRET=1 (no compiled kernel) and on Triton versions
without that launcher, every call goes through `kernel[grid]`.
"""

from __future__ import annotations

import torch

try:  # Triton >= 3.4 keeps its launch hooks (profilers) here
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton: always the regular path
    _knobs = None


def aligned(t: torch.Tensor) -> bool:
    """Triton's pointer specialization: 16-byte aligned data pointer."""
    return t.data_ptr() % 16 == 0


class CachedLaunch:
    """One @triton.jit kernel's compiled variants, launched directly after the first call.

    Runtime arguments come first in the kernel's signature, then its constexprs in order;
    `launch` takes them as (args, constexprs) and passes num_warps / num_stages on."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled = {}  # key -> CompiledKernel, or None: always the regular path

    def launch(self, key, grid, args, constexprs: dict, *, num_warps: int, num_stages: int = 1):
        """key: a tuple whose first item is the CUDA device index (`device_index`)."""
        compiled = self.compiled.get(key, False)
        if compiled:
            device = torch._C._cuda_getDevice()  # torch.cuda.current_device() minus its checks
            if key[0] == device:  # loaded for this device (key[0]: the caller's device index)
                hooks = _knobs.runtime
                enter, leave = _active(hooks.launch_enter_hook), _active(hooks.launch_exit_hook)
                stream = torch._C._cuda_getCurrentRawStream(device)
                values = (*args, *constexprs.values())
                # Launch metadata is only read by an enter hook (profilers): skip building it.
                meta = None if enter is None else compiled.launch_metadata(grid, stream, *values)
                compiled.run(grid[0], grid[1] if len(grid) > 1 else 1,
                             grid[2] if len(grid) > 2 else 1, stream, compiled.function,
                             compiled.packed_metadata, meta, enter, leave, *values)
                return
        result = self.kernel[grid](*args, **constexprs, num_warps=num_warps,
                                   num_stages=num_stages)
        if compiled is False:
            self.compiled[key] = result if self._direct_ok(result, len(args), constexprs) else None

    def _direct_ok(self, result, n_args, constexprs) -> bool:
        """Whether this Triton gave back a CompiledKernel whose launcher we know how to call."""
        if _knobs is None or not hasattr(result, "packed_metadata"):
            return False  # the interpreter returns no compiled kernel
        names = list(self.kernel.arg_names)
        if names[n_args:] != list(constexprs):
            raise TypeError(f"{self.kernel.fn.__name__}: constexprs must follow the runtime "
                            f"arguments in signature order, got {list(constexprs)}")
        result._init_handles()  # loads the module: sets function and the launcher
        return hasattr(result, "function") and callable(getattr(result, "run", None))


def device_index(t: torch.Tensor) -> int:
    """The CUDA device index of t, -1 on CPU (interpreter: never launched directly)."""
    return t.get_device()  # an int, without building a torch.device


def _active(hook):
    """A launch hook as the launcher takes it: None when nothing is installed (Triton <= 3.6
    keeps None there; 3.7+ an empty HookChain, which would still be called per launch)."""
    if hook is None or getattr(hook, "calls", True) == []:
        return None
    return hook

