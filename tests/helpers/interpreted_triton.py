"""Import the Triton kernels interpreted on CPU, without changing the rest of the suite.

Triton reads TRITON_INTERPRET when the kernels are decorated, so the variable is set while the
kernel module is (re)imported and restored afterwards: other tests keep the fast torch path.

On a CUDA machine, `SAETRAIN_TRITON_TESTS=cuda` runs the same tests on the compiled kernels
instead (scripts/gpu_check.py does): the module is imported without the interpreter and wrapped
so that each kernel call moves its CPU tensors to the GPU and its results back. The tests, their
inputs and their float64 oracles stay exactly as they are on CPU.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from types import ModuleType
from typing import Any

SWITCH = "SAETRAIN_TRITON_TESTS"


def import_interpreted_triton_ops() -> ModuleType | None:
    """saetrain.kernels.triton_ops with interpreted kernels, or None when triton is missing.

    With SAETRAIN_TRITON_TESTS=cuda: the compiled kernels, run on the GPU (see the module doc).
    """
    if os.environ.get(SWITCH, "") == "cuda":
        return _import_compiled_on_cuda()
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401

        if "saetrain.kernels.triton_ops" in sys.modules:
            return importlib.reload(sys.modules["saetrain.kernels.triton_ops"])
        from saetrain.kernels import triton_ops

        return triton_ops
    except ImportError:
        return None
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


def _import_compiled_on_cuda() -> ModuleType:
    """The compiled kernel module behind a proxy that runs every call on the GPU."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"{SWITCH}=cuda, but torch sees no CUDA device")
    before = os.environ.pop("TRITON_INTERPRET", None)  # compiled, whatever the caller set
    try:
        module = sys.modules.get("saetrain.kernels.triton_ops")
        if module is None:
            from saetrain.kernels import triton_ops as module
        elif module.INTERPRETED:
            module = importlib.reload(module)
    finally:
        if before is not None:
            os.environ["TRITON_INTERPRET"] = before
    return OnDevice(module, torch.device("cuda"))


def _move(value: Any, device: Any) -> Any:
    """Tensors (also inside tuples, lists and NamedTuples such as SortPlan) moved to `device`."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)  # keeps a transposed view's strides (preserve_format)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_move(v, device) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    return value


class OnDevice(ModuleType):
    """A stand-in for the kernel module: its public functions take CPU tensors, run the kernels
    on `device` and return CPU tensors; everything else is the module's own attribute.

    `INTERPRETED` is True because the dispatcher (ops.use_triton) only asks it to know whether
    the module accepts CPU tensors, which this one does.
    """

    INTERPRETED = True

    def __init__(self, module: ModuleType, device: Any):
        super().__init__(module.__name__, module.__doc__)
        self._module = module
        self._device = device
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if not name.startswith("_") and fn.__module__ == module.__name__:
                setattr(self, name, self._wrap(fn))

    def _wrap(self, fn: Any) -> Any:
        def on_device(*args: Any, **kwargs: Any) -> Any:
            # The tests' fixtures set TRITON_INTERPRET=1 around each call; a kernel compiled on
            # its first call must not see it (Triton 3.6 then mis-builds tl.topk's helpers).
            saved = os.environ.pop("TRITON_INTERPRET", None)
            try:
                out = fn(*_move(args, self._device), **_move(kwargs, self._device))
            finally:
                if saved is not None:
                    os.environ["TRITON_INTERPRET"] = saved
            return _move(out, "cpu")

        on_device.__name__ = fn.__name__
        on_device.__doc__ = fn.__doc__
        return on_device

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)
