"""What run() reports besides the weights: metrics.jsonl, wandb (offline), and hub upload of every
finished dictionary (against the local stand-in hub of test_hub.py)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from saetrain.config import DictionarySpec, LoggerConfig, PublishConfig
from saetrain.errors import ConfigError
from saetrain.export.hub import PublishError
from saetrain.run import run
from tests.helpers.runs import _config


def test_metrics_jsonl_holds_every_logged_step_and_the_final_metrics(tiny_model, corpus, tmp_path):
    cfg = _config(tiny_model, corpus, "topk", None)  # 8 steps, a row every 4
    result = run(cfg, tmp_path)
    lines = [
        json.loads(x) for x in (result.dictionary_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["step"] for row in lines[:-1]] == [4, 8]
    assert lines[1]["tokens"] == 2048 and 0 < lines[1]["fvu"] < 1.5
    assert lines[-1]["final"]["fvu"] == pytest.approx(result.metrics["fvu"])
    m = result.metrics
    assert m["never_fired_count"] == pytest.approx(64 * m["never_fired_fraction"])


def test_wandb_offline_run_of_two_dictionaries(tiny_model, corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    cfg = _config(tiny_model, corpus, "topk", None)
    cfg = replace(
        cfg,
        logger=LoggerConfig(name="wandb", log_every=4),
        dictionaries=[DictionarySpec(name="a"), DictionarySpec(name="b", dictionary={"k": 8})],
    )
    result = run(cfg, tmp_path / "out")
    assert [r.name for r in result.dictionaries] == ["a", "b"]
    runs = list((tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1  # one wandb run shared by both dictionaries
    for name in ("a", "b"):
        assert (tmp_path / "out" / name / "metrics.jsonl").exists()


def test_publish_uploads_each_finished_dictionary(fake_hub, tiny_model, corpus, tmp_path):  # noqa: F811
    hub, url = fake_hub
    cfg = _config(tiny_model, corpus, "topk", None)
    cfg = replace(
        cfg,
        publish=PublishConfig(repo_id="alice/saes", token="hf_test", endpoint=url),
        dictionaries=[DictionarySpec(name="k4"), DictionarySpec(name="k8", dictionary={"k": 8})],
    )
    run(cfg, tmp_path)
    uploaded = {path for commit in hub.commits for path in commit["files"]}
    for name in ("k4", "k8"):
        for file in ("cfg.json", "sae_weights.safetensors", "saetrain_run.json", "README.md"):
            assert f"{name}/{file}" in uploaded
            if file != "README.md":
                assert (
                    hub.commits[0 if name == "k4" else 1]["files"][f"{name}/{file}"]
                    == (tmp_path / name / file).read_bytes()
                )


def test_no_token_fails_before_training(online, tiny_model, corpus, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    cfg = _config(tiny_model, corpus, "topk", None)
    cfg = replace(cfg, publish=PublishConfig(repo_id="alice/saes"))
    with pytest.raises(ConfigError, match="needs a HuggingFace token"):
        run(cfg, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing was trained


def test_unreachable_hub_keeps_the_trained_files(online, tiny_model, corpus, tmp_path):  # noqa: F811
    cfg = _config(tiny_model, corpus, "topk", None)
    cfg = replace(
        cfg,
        publish=PublishConfig(repo_id="alice/saes", token="hf_x", endpoint="http://127.0.0.1:9"),
    )
    with pytest.raises(PublishError, match="(?s)saved locally.*127.0.0.1:9"):
        run(cfg, tmp_path)
    assert (tmp_path / "resid_post.1" / "sae_weights.safetensors").exists()


def test_publish_prefix_places_each_dictionary_under_it(fake_hub, tiny_model, corpus, tmp_path):  # noqa: F811
    hub, url = fake_hub
    cfg = _config(tiny_model, corpus, "topk", None)
    cfg = replace(
        cfg,
        publish=PublishConfig(
            repo_id="alice/saes", token="hf_test", endpoint=url, prefix="dictionary.k=4"
        ),
    )
    run(cfg, tmp_path)
    (commit,) = hub.commits
    assert set(commit["files"]) == {
        f"dictionary.k=4/resid_post.1/{f}"
        for f in ("cfg.json", "sae_weights.safetensors", "saetrain_run.json", "metrics.jsonl",
                  "README.md")
    }  # fmt: skip
    card = (tmp_path / "resid_post.1" / "README.md").read_text()
    assert 'SAE.from_pretrained("alice/saes", "dictionary.k=4/resid_post.1")' in card


def test_sweep_jobs_get_their_overrides_as_upload_prefix():
    from hydra.types import RunMode

    from saetrain.__main__ import multirun_prefix

    assert multirun_prefix(RunMode.MULTIRUN, "dictionary.k=16,trainer.lr=0.001") == (
        "dictionary.k=16,trainer.lr=0.001"
    )
    assert multirun_prefix(RunMode.MULTIRUN, "") is None
    assert multirun_prefix(RunMode.RUN, "dictionary.k=16") is None
