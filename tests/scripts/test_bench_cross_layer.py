"""scripts/bench_cross_layer.py --smoke: both parts at toy sizes (a tiny Llama, a tiny synthetic
generator) write JSON, markdown and the table; the comparison is at equal latents and L0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_cross_layer.py"


@pytest.fixture(scope="module")
def smoke(tiny_model, corpus, tmp_path_factory) -> tuple[dict, Path, str]:
    tmp = tmp_path_factory.mktemp("bench_cross_layer")
    out = tmp / "clb"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "all",
            "--smoke",
            "--threads",
            "1",
            "--out",
            str(out),
            "--work",
            str(tmp / "runs"),
            "--set",
            f"model.name={tiny_model}",
            "--set",
            f"data.data_files=[{corpus}/*.txt]",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.with_suffix(".json").read_text()), out, proc.stdout


def test_smoke_writes_json_markdown_and_table(smoke):
    results, out, stdout = smoke
    assert set(results) >= {"meta", "real_topk", "synthetic"}
    assert results["meta"]["smoke"] is True
    page = out.with_suffix(".md").read_text()
    assert "## real_topk" in page and "## Synthetic cross-layer features" in page
    assert "| per-layer |" in stdout and "| clt |" in stdout


def test_real_rows_compare_at_equal_latents_and_l0(smoke):
    part = smoke[0]["real_topk"]
    rows = {r["dictionary"]: r for r in part["rows"]}
    assert set(rows) == {"per-layer", "clt"}
    layers = part["meta"]["layers"]
    k = part["meta"]["k_per_layer"]
    assert rows["per-layer"]["latents_total"] == rows["clt"]["latents_total"]
    assert rows["per-layer"]["tokens_seen"] == rows["clt"]["tokens_seen"]
    for r in rows.values():
        assert sorted(int(la) for la in r["per_layer"]) == layers
        for v in r["per_layer"].values():
            assert v["l0"] == pytest.approx(k)  # TopK: k per layer on both sides
            assert 0 <= v["fvu"] < 10
        assert r["ce_clean"] > 0 and r["kl_div"] >= 0
    # Same contexts for both replacements: the clean CE agrees exactly.
    assert rows["per-layer"]["ce_clean"] == rows["clt"]["ce_clean"]
    assert rows["per-layer"]["ce_zero_ablated"] == rows["clt"]["ce_zero_ablated"]


def test_synthetic_rows_score_feature_recovery(smoke):
    part = smoke[0]["synthetic"]
    kinds = {r["dictionary"] for r in part["rows"]}
    assert kinds == {"per-layer", "clt"}
    for r in part["rows"]:
        for key in ("fvu_all", "mcc_mean", "mcc_features_mean", "recovered_mean", "f1_mean"):
            assert 0 <= r[key] <= 1.5, (key, r[key])
        assert r["l0_total"] <= r["k"] * part["meta"]["generator"]["n_layers"] + 1e-6
    clt = next(r for r in part["rows"] if r["dictionary"] == "clt")
    assert 0 <= clt["mcc_whole_rows"] <= 1


def test_generator_places_features_from_their_home_layer_on():
    from saetrain.synthetic.cross_layer import CrossLayerConfig, CrossLayerSynthetic

    cfg = CrossLayerConfig(n_layers=3, d=8, features_per_layer=4, active_per_layer=1.0,
                           noise_std=0.0)  # fmt: skip
    data = CrossLayerSynthetic(cfg)
    rows, codes = data.rows(64, torch.Generator().manual_seed(1))
    assert rows.shape == (64, 2 * 3 * 8) and codes.shape == (64, 12)
    d = 8
    no_home0 = (codes[:, data.home == 0] == 0).all(1)
    assert no_home0.any()
    # Nothing homed at layer 0 fires: layer 0's input and output are zero (no noise).
    assert rows[no_home0][:, :d].abs().max() == 0
    assert rows[no_home0][:, 3 * d : 4 * d].abs().max() == 0
    # Layer 2's output is every present feature's coefficient along its layer-2 direction.
    torch.testing.assert_close(rows[:, 5 * d :], codes @ data.dec_dirs[2])
    torch.testing.assert_close(rows[:, 2 * d : 3 * d], codes @ data.enc_dirs[2])
    assert data.clt_rows(1).shape == (4, 2 * d)
    assert abs(float(data.probabilities.sum()) - 3 * 1.0) < 1e-4
