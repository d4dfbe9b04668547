"""Ending a torchrun launch whole: the launcher and every rank below it.

torchrun starts each worker in its own session, so killing the launcher's process group leaves
the ranks running (and holding its output pipe). Used by the tests' and benchmarks' launchers,
which must stay bounded in time when a rank hangs.
"""

from __future__ import annotations

import collections
import os
import signal
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc; empty where there is no /proc), children first."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children[ppid].append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and everything below it (its descendants listed before it dies)."""
    for p in [*descendants(pid), pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
