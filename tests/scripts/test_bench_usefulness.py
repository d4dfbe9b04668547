"""scripts/bench_usefulness.py on the tiny Llama: the table's phases and its JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))


def test_bench_prints_and_writes_the_phases(letters_model, tmp_path, capsys):
    import bench_usefulness

    model, _ = letters_model
    out = tmp_path / "bench.json"
    result = bench_usefulness.main(["--model-path", str(model), "--site", "resid_post.1",
                                    "--n-latents", "64", "--k", "4", "--max-words", "150",
                                    "--out", str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved == result
    assert saved["prompts"] == 150
    for key in ("lm_forward_full_s", "suite_lm_s", "suite_probes_s"):
        assert saved[key] > 0
    assert saved["suite_total_s"] == pytest.approx(saved["suite_lm_s"] + saved["suite_probes_s"])
    assert saved["refused"] is None  # thresholds off: every phase ran
    assert 0.0 <= saved["probe_mean_f1"] < 0.6  # a random LM cannot spell
    printed = capsys.readouterr().out
    assert "LM forward alone" in printed and "suite / LM forward" in printed
