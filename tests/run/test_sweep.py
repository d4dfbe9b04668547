"""A real two-job Hydra multirun on the tiny Llama writes summary.csv / .md / .png at its end."""

from __future__ import annotations

import csv
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from saetrain.sweep import SUMMARY_CSV, SUMMARY_MD, SUMMARY_PNG, main, summarize_sweep
from saetrain.synthetic.tiny_llama import build_corpus, build_tiny_llama


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    model, corpus = build_tiny_llama(root / "model"), build_corpus(root / "corpus")
    folder = root / "multirun"
    overrides = [
        f"model.name={model}", "model.gguf_package=null", "model.device=cpu",
        f"data.data_files=[{corpus}/*.txt]", "data.context_size=16", "data.holdout_percent=10",
        "site.input=resid_post.1", "buffer.size_tokens=1024", "buffer.lm_batch_contexts=8",
        "dictionary.n_latents=64", "trainer.total_tokens=2048", "trainer.batch_tokens=256",
        "trainer.lr=1e-3", "trainer.warmup_steps=2", "trainer.init_batches=2",
        "eval.n_tokens=256", "eval.batch_contexts=8", "eval.ce_contexts=8", "logger.log_every=4",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "saetrain", "-m", *overrides, "dictionary.k=4,8",
         f"hydra.sweep.dir={folder}"],
        capture_output=True, text=True, timeout=300, cwd=root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"sweep summary written to {folder / SUMMARY_CSV}" in proc.stdout
    return folder


def _rows(folder: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((folder / SUMMARY_CSV).read_text())))


def test_multirun_writes_the_summary(sweep):
    rows = _rows(sweep)
    assert [(r["job"], r["dictionary.k"], r["dictionary"]) for r in rows] == [
        ("0", "4", "resid_post.1"),
        ("1", "8", "resid_post.1"),
    ]
    for row in rows:
        info = json.loads((sweep / row["job"] / "resid_post.1" / "saetrain_run.json").read_text())
        final = info["final_metrics"]
        assert info["config"]["dictionary"]["k"] == int(row["dictionary.k"])
        for key in ("l0", "fvu", "delta_ce", "ce_recovered", "mse", "never_fired_fraction",
                    "never_fired_tokens", "dead_fraction", "dead_window_tokens"):  # fmt: skip
            assert float(row[key]) == final[key], key  # repr round-trips floats exactly
        assert float(row["never_fired_pct"]) == pytest.approx(100 * final["never_fired_fraction"])
        assert float(row["dead_pct"]) == pytest.approx(100 * final["dead_fraction"])
        # 2048 tokens trained, shorter than trainer.dead_after_tokens: the window is the run.
        assert final["dead_window_tokens"] == 2048
        assert row["tokens_seen"] == "2048" and row["architecture"] == "topk"
        assert row["site"] == "resid_post.1" and row["error"] == ""
    assert [float(r["l0"]) for r in rows] == [4.0, 8.0]  # TopK: L0 is k
    assert float(rows[1]["fvu"]) < float(rows[0]["fvu"])  # more latents per token, less error

    md = (sweep / SUMMARY_MD).read_text()
    head = "| job | dictionary.k | L0 | FVU | ΔCE | CE recovered | never fired % | dead % |"
    assert head in md
    assert "model.name" not in md  # the same in every job: not a swept field
    fvu0 = float(rows[0]["fvu"])
    assert f"| 0 | 4 | 4 | {fvu0:.4g} |" in md
    assert (sweep / SUMMARY_PNG).read_bytes().startswith(b"\x89PNG")


def test_by_hand_reports_jobs_without_results(sweep, tmp_path, capsys):
    # a third job that died before saving
    broken = sweep / "2" / ".hydra"
    broken.mkdir(parents=True)
    (broken / "overrides.yaml").write_text("- dictionary.k=16\n- site.input=resid_post.1\n")
    try:
        assert main([str(sweep)]) == 0
        rows = _rows(sweep)
        assert [r["job"] for r in rows] == ["0", "1", "2"]
        assert rows[2]["dictionary.k"] == "16" and "no saetrain_run.json" in rows[2]["error"]
        assert rows[2]["fvu"] == ""
        md = (sweep / SUMMARY_MD).read_text()
        assert "3 jobs, 2 dictionaries with results" in md
        assert "- job 2 (dictionary.k=16): no saetrain_run.json" in md
        assert "| job | dictionary.k |" in capsys.readouterr().out
    finally:
        import shutil

        shutil.rmtree(sweep / "2")
        summarize_sweep(sweep)


def test_not_a_sweep_folder(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "holds no job folders" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2


def test_png_skipped_without_matplotlib(sweep, tmp_path, monkeypatch, caplog):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy)
    (copy / SUMMARY_PNG).unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level(logging.WARNING):
        summarize_sweep(copy)
    assert "matplotlib is not installed" in caplog.text
    assert not (copy / SUMMARY_PNG).exists() and (copy / SUMMARY_CSV).is_file()
