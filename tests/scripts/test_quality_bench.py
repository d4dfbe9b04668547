"""scripts/quality_bench.py --smoke: every part runs at toy sizes and writes JSON, markdown, PNG."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "quality_bench.py"
ARCHITECTURES = {"relu", "gated", "topk", "batchtopk", "jumprelu", "matryoshka"}
ROW_KEYS = {"architecture", "target_l0", "how", "l0", "fvu", "never_fired_fraction"}


def run_bench(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "qb"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("quality_bench")
    return run_bench(tmp), tmp / "qb"


def test_smoke_writes_json_markdown_and_png(smoke):
    results, out = smoke
    assert set(results) >= {"meta", "real", "synthetic", "peers"}
    assert results["meta"]["smoke"] is True
    assert out.with_suffix(".png").stat().st_size > 1000
    page = out.with_suffix(".md").read_text()
    assert "## (a) Real activations at matched L0" in page
    assert "## (b) Known features" in page
    # The published SynthSAEBench figures are quoted with their source.
    assert "arXiv:2602.14687" in page and "0.7927" in page
    assert "![" in page and "qb.png" in page


def test_real_rows_for_every_architecture_l0_and_budget(smoke):
    real = smoke[0]["real"]
    assert set(real["meta"]["budgets"]) == {"N/4", "N"}
    rows = [r for r in real["rows"] if r["library"] == "saetrain"]
    assert {r["architecture"] for r in rows} == ARCHITECTURES
    for arch in ARCHITECTURES:
        got = {(r["target_l0"], r["budget"]) for r in rows if r["architecture"] == arch}
        assert got == {(4.0, "N/4"), (4.0, "N"), (8.0, "N/4"), (8.0, "N")}
    for r in rows:
        assert ROW_KEYS <= set(r) and {"delta_ce", "dead_fraction", "train_tokens"} <= set(r)
        assert 0 <= r["fvu"] < 2 and r["l0"] > 0
        assert math.isnan(r["delta_ce"])  # synthetic rows stand in for the LM: no ΔCE
        if r["architecture"] in ("relu", "gated", "jumprelu"):
            assert r["how"].startswith("target_l0=") and r["lambda_factor"] > 0
        else:
            assert r["how"] == f"k={int(r['target_l0'])}"
    quarter, full = real["meta"]["budgets"]["N/4"], real["meta"]["budgets"]["N"]
    assert 0 < quarter < full
    assert {r["train_tokens"] for r in rows} == {quarter, full}


def test_synthetic_rows_report_recovery(smoke):
    synth = smoke[0]["synthetic"]
    assert {r["architecture"] for r in synth["rows"]} == ARCHITECTURES
    assert len({r["target_l0"] for r in synth["rows"]}) == 2
    for r in synth["rows"]:
        assert ROW_KEYS | {"mcc", "f1", "precision", "recall", "uniqueness"} <= set(r)
        for key in ("mcc", "f1", "precision", "recall", "uniqueness"):
            assert 0 <= r[key] <= 1
        assert r["mcc"] > 0.3
    assert synth["reference"]["rows"] and "2602.14687" in synth["reference"]["source"]


def test_from_json_re_renders(smoke, tmp_path):
    results, out = smoke
    copy = tmp_path / "again"
    copy.with_suffix(".json").write_text(json.dumps(results))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--from-json", "--out", str(copy)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert copy.with_suffix(".md").read_text() == out.with_suffix(".md").read_text().replace(
        "qb.png", "again.png"
    )
    assert copy.with_suffix(".png").exists()


def test_tiny_lm_gives_delta_ce(tmp_path, tiny_model, corpus):
    """With an LM (a tiny random Llama here), activations come from it and ΔCE is measured."""
    results = run_bench(
        tmp_path,
        "--parts",
        "a",
        "--archs",
        "topk,relu",
        "--model",
        str(tiny_model),
        "--data",
        str(corpus / "*.txt"),
        "--tokens",
        "4096",
    )
    assert "synthetic" not in results
    real = results["real"]
    assert real["meta"]["site"] == "resid_post.1" and real["meta"]["ce_contexts"] > 0
    assert real["meta"]["train_rows"] == 4096
    rows = real["rows"]
    assert {r["architecture"] for r in rows} == {"topk", "relu"} and len(rows) == 8
    for r in rows:
        assert math.isfinite(r["delta_ce"]) and math.isfinite(r["ce_recovered"])


def load_script():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import quality_bench
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return quality_bench


def test_set_overrides_are_scoped():
    qb = load_script()
    sets = qb.parse_sets(["trainer.lr=0.001", "jumprelu:dictionary.jumprelu_bandwidth=0.1"])
    assert sets == {
        "*": {"trainer.lr": "0.001"},
        "jumprelu": {"dictionary.jumprelu_bandwidth": "0.1"},
    }
    d, t, how = qb.matched_configs("jumprelu", 32, 256, 4096, 512, sets, True)
    assert d.target_l0 == 32 and d.jumprelu_bandwidth == 0.1 and t.lr == 0.001
    assert t.total_tokens == 4096 and t.batch_tokens == 512 and d.n_latents == 256
    assert how.startswith("target_l0=32 from θ₀=") and how.endswith("(+--set)")
    d, t, how = qb.matched_configs("topk", 32, 256, 4096, 512, sets, True)
    assert d.k == 32 and d.jumprelu_bandwidth != 0.1 and how == "k=32"
    with pytest.raises(SystemExit):
        qb.parse_sets(["nosuch:trainer.lr=1"])


def test_peer_rows_when_sparsify_is_importable(monkeypatch):
    """(c) with a stand-in for sparsify's trainer: rows on the same budgets, scored the same way."""
    qb = load_script()
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import peers
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    calls = []

    def fake_train(train, *, n_latents, k, batch_size, seed, **kw):
        calls.append((len(train), k, batch_size, kw["optimizer"]))
        w = torch.randn(train.shape[1], n_latents, generator=torch.Generator().manual_seed(seed))
        w_dec = (w / w.norm(dim=0, keepdim=True)).T.contiguous()
        info = {"library": "sparsify (stand-in)", "train_seconds": 0.0}
        return peers.PeerWeights(w, torch.zeros(n_latents), w_dec, train.mean(0), info)

    monkeypatch.setattr(peers, "sparsify_available", lambda: True)
    monkeypatch.setattr(peers, "train_sparsify_topk", fake_train)
    args = qb.parse_args(["--smoke"])
    g = torch.Generator().manual_seed(0)
    train, held = torch.randn(1024, 8, generator=g), torch.randn(256, 8, generator=g)
    results = {"real": {"rows": []}}
    qb.run_peers(args, train, held, None, [("N/4", 256), ("N", 1024)], results, lambda: None)
    assert results["peers"]["available"]["sparsify"] is True
    rows = results["real"]["rows"]
    assert [(r["target_l0"], r["budget"]) for r in rows] == [
        (4.0, "N/4"),
        (4.0, "N"),
        (8.0, "N/4"),
        (8.0, "N"),
    ]
    assert sorted(c[:3] for c in calls) == [
        (256, 4, 256),
        (256, 8, 256),
        (1024, 4, 256),
        (1024, 8, 256),
    ]
    for r in rows:
        assert r["library"] == "sparsify (stand-in)" and r["architecture"] == "topk"
        assert r["l0"] == pytest.approx(r["target_l0"]) and 0 < r["fvu"]
