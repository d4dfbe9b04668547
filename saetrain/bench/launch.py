"""The torchrun command a benchmark launches `python -m saetrain` with.

A benchmark runs from a virtual environment that may not be on PATH: the `torchrun` beside the
running interpreter, else the same launcher as a module of that interpreter.
"""

from __future__ import annotations

import sys
from pathlib import Path


def torchrun_command(nproc: int, standalone: bool = True) -> list[str]:
    """The launcher and its first options: `[torchrun, --standalone, --nproc-per-node=N]`."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if torchrun.exists():
        command = [str(torchrun)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run"]
    if standalone:
        command.append("--standalone")
    return [*command, f"--nproc-per-node={nproc}"]
