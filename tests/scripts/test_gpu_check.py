"""scripts/gpu_check.py --cpu-smoke: every part of the GPU check runs at toy sizes on CPU, so the
command left ready for a GPU machine does not rot between the sessions that have one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PARTS = ["env", "kernel_tests", "kernel_sizes", "bench_kernels", "pipeline", "e2e"]


def test_cpu_smoke_writes_every_part_and_the_tables(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu-smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["meta"]["cpu_smoke"] is True
    assert list(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        assert part["status"] in ("pass", "skipped"), (name, part.get("reason"))
    assert report["parts"]["kernel_tests"]["reason"].startswith("skipped: no CUDA")
    # What the GPU run reports is really computed: checks, bench rows, pipeline rates, metrics.
    sizes = report["parts"]["kernel_sizes"]
    assert {c["dtype"] for c in sizes["checks"]} == {"fp32", "fp16", "bf16"}
    assert {c["op"] for c in sizes["checks"]} >= {"decode", "gather_dot", "segment_reduce"}
    assert {c["kind"] for c in sizes["checks"]} >= {"random", "all_equal", "ties"}
    bench_rows = report["parts"]["bench_kernels"]["rows"]
    assert bench_rows and all(r["step_profile"]["top"] for r in bench_rows)
    top = bench_rows[0]["step_profile"]["top"]  # the profiled step's own ops, largest first
    assert any("topk" in t["name"] for t in top) and top[0]["share"] >= top[-1]["share"]
    pipeline = report["parts"]["pipeline"]
    assert pipeline["sweep"]["ks"] == [4, 8, 16, 32] and pipeline["lm_alone"]["rows_per_s"] > 0
    e2e = report["parts"]["e2e"]
    assert e2e["returncode"] == 0 and "sae_weights.safetensors" in e2e["exported"]
    again = e2e["reads_cache"]  # the second run read the activations the first one cached
    assert again["returncode"] == 0 and again["stream"]["cached_tokens"] > 0
    assert again["stream"]["lm_tokens"] < e2e["stream"]["lm_tokens"]
    assert len(report["targets"]) == 7
    assert all(t["status"] in ("PASS", "FAIL") for t in report["targets"])
    table = (out / "results.md").read_text()
    assert "| target | limit | measured | status |" in table
    assert "CPU smoke run" in table
    assert "### Where the step's time goes" in table
    assert "part e2e" in proc.stdout and "streaming training" in proc.stdout


def test_the_part_budgets_fit_the_default_total():
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    assert list(gpu_check.BUDGET_S) == PARTS
    assert sum(gpu_check.BUDGET_S.values()) <= gpu_check.parse_args([]).budget_s <= 8 * 60 - 30


def test_help_and_unknown_part():
    script = str(ROOT / "scripts" / "gpu_check.py")
    shown = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and "--cpu-smoke" in shown.stdout
    bad = subprocess.run(
        [sys.executable, script, "--parts", "env,nope"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown part" in bad.stderr


def test_a_failing_or_hanging_part_does_not_stop_the_others(tmp_path):
    """A part that hangs is killed at its limit, one that raises is recorded; the next one runs."""
    out = tmp_path / "out"
    script = str(ROOT / "scripts" / "gpu_check.py")
    proc = subprocess.run(
        [sys.executable, script, "--cpu-smoke", "--out", str(out), "--budget-s", "45",
         "--parts", "env,kernel_sizes,bench_kernels"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env=os.environ | {"SAETRAIN_GPU_CHECK_FAULT": "env:hang,kernel_sizes:raise"},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    parts = json.loads((out / "results.json").read_text())["parts"]
    assert parts["env"]["status"] == "timeout"
    assert parts["kernel_sizes"] == parts["kernel_sizes"] | {
        "status": "error",
        "reason": "RuntimeError: fault injected into kernel_sizes",
    }
    assert parts["bench_kernels"]["status"] == "pass"
    assert "fault injected into kernel_sizes" in (out / "gpu_check.log").read_text()
    assert (out / "results.md").exists()
