"""The Triton kernels build for Hopper (sm_90) ahead of time, with no GPU: every launch the
wrappers make at real and odd sizes, in fp32, fp16 and bf16 (kernels/compile_check.py). The
interpreted kernel tests never run the compiler; this is what catches a kernel that only fails to
build, before a scarce GPU run does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
triton = pytest.importorskip("triton")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
pytestmark = pytest.mark.skipif(not PTXAS.exists(), reason="this Triton has no CUDA ptxas")
KERNELS = {"decode", "gather_dot", "segment_reduce", "topk_encode"}


def _run(args: list[str], tmp_path: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # really compile, no earlier cache
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_every_launch_builds_for_sm90_in_each_dtype(tmp_path):
    out = tmp_path / "compile.json"
    proc = _run(
        ["-m", "saetrain.kernels.compile_check", "--arch", "90", "--quick", "--json", str(out)],
        tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    rows = result["launches"]
    assert result["ok"] and all(r["ok"] for r in rows)
    assert {(r["kernel"], r["dtype"]) for r in rows} == {
        (k, d) for k in KERNELS for d in ("fp32", "fp16", "bf16")
    }
    # The fused encoder at both real k (K_PAD 32 and 128) and both fp32 precisions was built.
    topk = [r for r in rows if r["kernel"] == "topk_encode"]
    assert {r["constexprs"]["K_PAD"] for r in topk} >= {8, 32, 128}
    assert {r["constexprs"]["PRECISION"] for r in topk if r["dtype"] == "fp32"} == {"ieee", "tf32"}
    for r in rows:  # a real cubin: registers counted by cuobjdump, shared memory within sm_90's
        assert 0 < r["reg"] <= 255 and 0 <= r["shared_bytes"] <= 232448, r
    assert any(r["shared_bytes"] > 0 for r in topk)  # the tl.dot tiles are staged in shared memory
    assert "| sm_90 | topk_encode | bf16 | real-k128 |" in proc.stdout


def test_a_launch_that_cannot_build_is_reported_not_raised(tmp_path):
    """A block that is not a power of two fails in the compiler: the row says so, with the
    compiler's message, and the next launch is still built."""
    script = (
        "import json, torch\n"
        "from saetrain.kernels import compile_check as cc\n"
        "bad = next(cc.launches((cc.SHAPES[-1],), (torch.bfloat16,)))\n"
        "bad.args['BLOCK_D'] = 48\n"
        "good = next(cc.launches((cc.SHAPES[-1],), (torch.bfloat16,)))\n"
        "print(json.dumps([cc.build(bad, 90), cc.build(good, 90)]))\n"
    )
    proc = _run(["-c", script], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    bad, good = json.loads(proc.stdout.strip().splitlines()[-1])
    assert bad["kernel"] == "decode" and bad["ok"] is False
    assert "power of 2" in bad["error"] or "power of two" in bad["error"], bad["error"]
    assert good["ok"] is True and good["reg"] > 0
