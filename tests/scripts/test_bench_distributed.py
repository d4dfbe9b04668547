"""scripts/bench_distributed.py --smoke: 1 and 2 ranks under torchrun, data and dictionary
parallel and latents sharded, at toy sizes; the JSON holds a row for each with a finite held-out
FVU, and the benchmarks page section is replaced in place, not appended twice."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from saetrain.distributed.process_tree import kill_tree

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_distributed.py"
TIMEOUT_S = 300  # the smoke run takes well under 90 s on 2 idle cores


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_distributed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("bench_distributed")
    out, doc = tmp / "bench.json", tmp / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Earlier section\n\nkept\n")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--out", str(out)]
    command += ["--doc", str(doc), "--workdir", str(tmp / "work")]
    proc = subprocess.Popen(
        command,
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)  # torchrun's ranks run in sessions of their own
        output, _ = proc.communicate()
        pytest.fail(f"bench_distributed.py --smoke ran past {TIMEOUT_S} s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-4000:]
    return json.loads(out.read_text()), doc


def test_rows_for_one_and_two_ranks_in_both_modes(smoke):
    result, _ = smoke
    assert result["smoke"] is True
    assert result["machine"]["cpu_count"] == os.cpu_count()
    rows = {(r["mode"], r["nproc"]): r for r in result["rows"]}
    assert set(rows) == {(m, n) for m in ("data", "dictionary", "sharded") for n in (1, 2)}
    for (mode, nproc), r in rows.items():
        assert r["world_size"] == nproc
        assert r["dictionaries"] == (4 if mode == "dictionary" else 1)
        assert len(r["fvu"]) == r["dictionaries"]
        assert all(math.isfinite(f) and f >= 0 for f in r["fvu"]), r["fvu"]
        assert r["tokens_seen"] == result["sizes"]["tokens"]
        for key in ("wall_s", "tokens_per_s", "pipeline_rows_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        assert r["lm_tokens"] >= result["sizes"]["tokens"]
    # The LM made the same rows in all, whichever share of them each rank made.
    assert rows[("data", 1)]["lm_tokens"] == rows[("data", 2)]["lm_tokens"]
    assert rows[("dictionary", 1)]["lm_tokens"] == rows[("dictionary", 2)]["lm_tokens"]
    # The list's entry on the single dictionary's site (same seed, same rows) is that dictionary,
    # on 1 rank (the list) and on 2 (the all_to_all exchange against the gather).
    last = f"d{result['model']['layers'] - 1}"
    for n in (1, 2):
        listed = rows[("dictionary", n)]
        same = listed["fvu"][listed["names"].index(last)]
        assert abs(same - rows[("data", n)]["fvu"][0]) < 1e-5, (n, same, rows[("data", n)])
        # Latents sharded over n ranks: the data-parallel dictionary (same global batches).
        sharded = rows[("sharded", n)]["fvu"][0]
        assert abs(sharded - rows[("data", n)]["fvu"][0]) < 1e-5, (n, sharded)


def test_the_section_is_written_and_replaced_in_place(smoke, tmp_path):
    result, doc = smoke
    page = doc.read_text()
    assert page.startswith("# Benchmarks\n\n## Earlier section\n\nkept\n")
    assert page.count("## Several processes") == 1
    assert "| data parallel | 2 | 1 |" in page and "| dictionary parallel | 2 | 4 |" in page
    assert "| latents sharded | 2 | 1 |" in page
    # Written again (before another section, here): replaced, the rest of the page kept.
    bench = _load_script()
    again = tmp_path / "page.md"
    again.write_text(page + "\n## Later section\n\nalso kept\n")
    bench.write_section(again, bench.section(result))
    bench.write_section(again, bench.section(result))
    text = again.read_text()
    assert text.count("## Several processes") == 1
    assert text.count("## Earlier section") == 1 and text.endswith(
        "## Later section\n\nalso kept\n"
    )
