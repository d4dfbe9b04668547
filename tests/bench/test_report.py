"""saetrain.bench.report and launch: the tables, cells, commands and launches benchmarks share."""

from __future__ import annotations

import math
import os
import platform
import sys

import pytest

from saetrain.bench.launch import LaunchTimeout, run_launch, torchrun_command
from saetrain.bench.report import fmt, md_table, package_versions


def test_md_table_lines():
    assert md_table(["a", "b"], [[1, "x"], [2.5, None]]) == [
        "| a | b |",
        "|---|---|",
        "| 1 | x |",
        "| 2.5 | None |",
    ]


def test_cells_round_floats_and_mark_missing_values():
    assert (fmt(0.123456), fmt(1.0, 1), fmt(None), fmt(math.nan), fmt(7)) == (
        "0.1235",
        "1.0",
        "–",
        "–",
        "7",
    )


def test_package_versions_name_python_and_missing_packages():
    versions = package_versions(["torch", "no-such-distribution-here"])
    assert versions["python"] == platform.python_version()
    assert versions["torch"] and versions["no-such-distribution-here"] is None


def test_torchrun_command_ends_with_the_world_size():
    command = torchrun_command(4)
    assert command[-2:] == ["--standalone", "--nproc-per-node=4"]
    assert "torchrun" in command[0] or command[1:3] == ["-m", "torch.distributed.run"]


def test_a_launch_past_its_limit_is_killed_with_its_output():
    code = "import time; print('started', flush=True); time.sleep(60)"
    with pytest.raises(LaunchTimeout) as caught:
        run_launch([sys.executable, "-c", code], os.environ, None, 2)
    assert "started" in caught.value.output
    assert run_launch([sys.executable, "-c", "print('ok')"], os.environ, None, 60) == (0, "ok\n")
