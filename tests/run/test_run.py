"""`run()` wired end to end for every architecture, as an SAE and as a transcoder.

A tiny randomly initialised Llama and a word-level tokenizer are saved to a local folder, so each
run takes seconds; the real model is exercised in test_e2e.py.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from saetrain.dictionaries import ARCHITECTURES
from saetrain.export.saelens import load_dictionary
from saetrain.run import run
from tests.helpers.runs import _config


@pytest.mark.parametrize("target", [None, "mlp_out.1"], ids=["sae", "skip_transcoder"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_run_trains_evaluates_and_saves(tiny_model, corpus, tmp_path, arch, target):
    cfg = _config(tiny_model, corpus, arch, target)
    result = run(cfg, tmp_path)
    folder = tmp_path / ("mlp_in.1-mlp_out.1" if target else "resid_post.1")
    assert result.dictionary_dir == folder
    m = result.metrics
    assert 0.0 < m["fvu"] < m["fvu_zero_baseline"] + 1.0
    assert m["l0"] > 0
    assert m["ce_clean"] > 0 and m["ce_zero_ablated"] > 0 and m["ce_spliced"] > 0
    run_info = json.loads((folder / "saetrain_run.json").read_text())
    assert run_info["tokens_seen"] == 2048
    assert run_info["config"]["dictionary"]["architecture"] == arch
    assert run_info["final_metrics"]["fvu"] == pytest.approx(m["fvu"])
    cfg_json = json.loads((folder / "cfg.json").read_text())
    assert cfg_json["apply_b_dec_to_input"] is (target is None)
    assert ("hook_name_out" in cfg_json["metadata"]) is (target is not None)
    loaded = load_dictionary(folder)
    assert loaded.d_in == 32 and loaded.n_latents == 64
    assert (loaded.W_skip is not None) is (target is not None)


def test_same_config_same_numbers(tiny_model, corpus, tmp_path):
    """On CPU a run with the same config gives the same numbers."""
    cfg = _config(tiny_model, corpus, "topk", None)
    a = run(cfg, tmp_path / "a").metrics
    b = run(cfg, tmp_path / "b").metrics
    c = run(replace(cfg, seed=1), tmp_path / "c").metrics
    assert a["fvu"] == b["fvu"] and a["ce_spliced"] == b["ce_spliced"]
    assert a["fvu"] != c["fvu"]


def test_context_longer_than_the_model_allows_is_named(tiny_model, corpus, tmp_path):
    from saetrain.errors import ConfigError

    cfg = _config(tiny_model, corpus, "topk", None)
    cfg = replace(cfg, data=replace(cfg.data, context_size=4096))
    with pytest.raises(ConfigError, match="data.context_size=4096.*max_position_embeddings"):
        run(cfg, tmp_path)


def test_a_short_run_reads_only_the_tokens_it_trains_on(tiny_model, corpus, tmp_path, caplog):
    """A quick look (4 steps of 64 tokens) with a long run's buffer (2¹⁸ rows): the LM runs on
    the 256 rows trained on (up to one LM batch more), not on a whole buffer first."""
    cfg = _config(tiny_model, corpus, "topk", None)
    cfg = replace(
        cfg,
        buffer=replace(cfg.buffer, size_tokens=2**18),
        trainer=replace(cfg.trainer, total_tokens=256, batch_tokens=64, init_batches=1),
    )
    with caplog.at_level("INFO", logger="saetrain"):
        result = run(cfg, tmp_path)
    stream = json.loads((result.dictionary_dir / "saetrain_run.json").read_text())["stream"]
    lm_batch_rows = cfg.buffer.lm_batch_contexts * (cfg.data.context_size - 1)
    assert 256 <= stream["lm_tokens"] < 256 + lm_batch_rows
    assert stream["buffer_rows"] == 256 and stream["buffer_tokens"] == 2**18
    said = [r.getMessage() for r in caplog.records if "this run draws" in r.getMessage()]
    assert said == [
        "buffer: this run draws 256 rows (4 steps × 64), fewer than the buffer's 262144 "
        "(buffer.size_tokens); the buffer holds just those (filled once, shuffled, never refilled)"
    ]
