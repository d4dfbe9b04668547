"""Launching `python -m saetrain` under torchrun from a benchmark, and never leaving ranks behind.

A benchmark runs from a virtual environment that may not be on PATH: the `torchrun` beside the
running interpreter, else the same launcher as a module of that interpreter. torchrun puts each
rank in a session of its own, so a launch that runs too long (or is interrupted) is ended by
killing its whole tree, not only the launcher.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from saetrain.distributed.process_tree import kill_tree


class LaunchTimeout(Exception):
    """A launch ran past its limit; it and everything it started were killed."""

    def __init__(self, timeout_s: float, output: str):
        super().__init__(f"ran past {timeout_s:g} s (killed)")
        self.timeout_s = timeout_s
        self.output = output  # what it printed until then


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


def run_launch(
    command: Sequence[str],
    env: Mapping[str, str],
    cwd: str | Path | None,
    timeout_s: float | None,
) -> tuple[int, str]:
    """(exit code, output: stdout and stderr together) of `command`, run in its own process
    group. Past `timeout_s` its whole tree is killed and LaunchTimeout raised; an interrupt
    (Ctrl-C, a signal handler's exception) kills the tree too before it goes on."""
    proc = subprocess.Popen(
        list(command),
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the agent and every worker
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        output, _ = proc.communicate()
        raise LaunchTimeout(timeout_s or 0.0, output) from None
    except BaseException:
        kill_tree(proc.pid)
        proc.wait()
        raise
    return proc.returncode, output
