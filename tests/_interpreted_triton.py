"""Import the Triton kernels interpreted on CPU, without changing the rest of the suite.

Triton reads TRITON_INTERPRET when the kernels are decorated, so the variable is set while the
kernel module is (re)imported and restored afterwards: other tests keep the fast torch path.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType


def import_interpreted_triton_ops() -> ModuleType | None:
    """saetrain.kernels.triton_ops with interpreted kernels, or None when triton is missing."""
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
