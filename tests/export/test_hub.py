"""publish_folder against a local stand-in for the hub's HTTP API, and the model card.

The server implements what huggingface_hub's create_repo and upload_folder call (checked against
the installed version's hf_api.py / _commit_api.py): POST /api/repos/create, the preupload
endpoint (answering "regular" for every file, so contents travel base64 in the commit), the NDJSON
commit endpoint, validate-yaml (the model card's front matter) and whoami in case it is asked.
It records every request.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from saetrain.config import PublishConfig
from saetrain.dictionaries import TopKSAE
from saetrain.export.hub import PublishError, check_publish, publish_folder
from saetrain.export.model_card import render_model_card
from saetrain.export.saelens import load_dictionary, save_dictionary
from tests.helpers.fake_hub import REPO

TOKEN = "hf_test_token_0123456789"
METRICS = {"fvu": 0.1234567, "l0": 5.0, "delta_ce": 0.25, "ce_recovered": 0.9, "tokens": 4096.0}


@pytest.fixture
def dictionary_folder(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    sae = TopKSAE(16, 48, k=5, generator=g)
    meta = {
        "model_name": "tiny/llama",
        "hook_name": "blocks.1.hook_resid_post",
        "hook_layer": 1,
        "context_size": 16,
        "saetrain_architecture": "topk",
        "saetrain_site": "resid_post.1",
    }
    run_info = {
        "config": {
            "dictionary": {"architecture": "topk", "k": 5},
            "data": {"path": "text", "data_files": ["/data/*.txt"], "context_size": 16},
        },
        "tokens_seen": 4096,
        "final_metrics": METRICS,
    }
    folder = tmp_path / "resid_post.1"
    save_dictionary(sae, folder, meta, run_info)
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_publish_uploads_exactly_the_folder(fake_hub, dictionary_folder):
    hub, url = fake_hub
    (dictionary_folder / ".cfg.json.abc.tmp").write_bytes(b"half-written")  # never uploaded
    cfg = PublishConfig(repo_id=REPO, private=True, token=TOKEN, endpoint=url, revision="main")
    result = publish_folder(dictionary_folder, cfg, METRICS)

    assert result == f"{url}/{REPO}/tree/main/resid_post.1"
    assert hub.created == [{"name": "saes", "organization": "alice", "visibility": "private",
                            "type": "model"}]  # fmt: skip
    assert len(hub.commits) == 1
    local = {f"resid_post.1/{n}": b for n, b in _files(dictionary_folder).items()}
    del local["resid_post.1/.cfg.json.abc.tmp"]
    assert set(local) == {
        "resid_post.1/cfg.json",
        "resid_post.1/sae_weights.safetensors",
        "resid_post.1/saetrain_run.json",
        "resid_post.1/README.md",
    }
    assert hub.commits[0]["files"] == local  # identical bytes, nothing else
    assert hub.commits[0]["revision"] == "main" and hub.branches == []  # main exists already
    assert hub.validated == [
        {"content": local["resid_post.1/README.md"].decode(), "repoType": "model"}
    ]
    assert {f["path"] for f in hub.preupload[0]["files"]} == set(local)
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)
    # the weights that arrived load back to the same dictionary
    arrived = dictionary_folder.parent / "arrived" / "resid_post.1"
    arrived.mkdir(parents=True)
    for name, data in hub.commits[0]["files"].items():
        (arrived / Path(name).name).write_bytes(data)
    a, b = load_dictionary(arrived), load_dictionary(dictionary_folder)
    assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.W_dec, b.W_dec)


def test_token_from_hf_token_environment(fake_hub, dictionary_folder, monkeypatch):
    hub, url = fake_hub
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    publish_folder(dictionary_folder, PublishConfig(repo_id=REPO, endpoint=url), METRICS)
    assert hub.created[0]["visibility"] == "public"
    assert {auth for _, _, auth in hub.requests} == {"Bearer hf_from_env"}


def test_upload_to_another_branch_creates_it(fake_hub, dictionary_folder):
    hub, url = fake_hub
    cfg = PublishConfig(repo_id=REPO, token=TOKEN, endpoint=url, revision="sweep-1")
    assert publish_folder(dictionary_folder, cfg, METRICS).endswith("/tree/sweep-1/resid_post.1")
    assert hub.branches == ["sweep-1"]
    assert hub.commits[0]["revision"] == "sweep-1" and len(hub.commits[0]["files"]) == 4


def test_no_token_is_a_clear_error_and_files_are_kept(online, dictionary_folder):
    before = _files(dictionary_folder)
    with pytest.raises(PublishError, match=r"publish.token.*HF_TOKEN.*hf auth login"):
        publish_folder(dictionary_folder, PublishConfig(repo_id=REPO), METRICS)
    assert _files(dictionary_folder) == before  # not even the card was written


def test_unreachable_hub_names_the_endpoint_and_keeps_files(online, dictionary_folder):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    cfg = PublishConfig(repo_id=REPO, token=TOKEN, endpoint=endpoint)
    weights = (dictionary_folder / "sae_weights.safetensors").read_bytes()
    with pytest.raises(PublishError, match=rf"{endpoint}.*unreachable.*files are kept") as e:
        publish_folder(dictionary_folder, cfg, METRICS)
    assert "ConnectError" in str(e.value)
    assert (dictionary_folder / "sae_weights.safetensors").read_bytes() == weights
    assert (dictionary_folder / "README.md").is_file()  # the card stays for the next attempt


def test_http_error_names_status_and_endpoint(fake_hub, dictionary_folder):
    hub, url = fake_hub
    hub.fail_commit_with = 403
    cfg = PublishConfig(repo_id=REPO, token=TOKEN, endpoint=url)
    with pytest.raises(PublishError, match=rf"{REPO} at {url}: HTTP 403"):
        publish_folder(dictionary_folder, cfg, METRICS)
    assert (dictionary_folder / "cfg.json").is_file()


def test_offline_mode_is_named(dictionary_folder, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = PublishConfig(repo_id=REPO, token=TOKEN, endpoint="http://127.0.0.1:9")
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE"):
        publish_folder(dictionary_folder, cfg, METRICS)


@pytest.mark.parametrize("repo_id", ["noslash", "a/b/c", "/name"])
def test_bad_repo_id(dictionary_folder, repo_id):
    with pytest.raises(PublishError, match=r"publish.repo_id=.*<user or org>/<name>"):
        publish_folder(dictionary_folder, PublishConfig(repo_id=repo_id, token=TOKEN), {})
    with pytest.raises(PublishError, match=r"publish.repo_id="):
        check_publish(PublishConfig(repo_id=repo_id, token=TOKEN))


def test_check_publish_before_training(online):
    assert check_publish(PublishConfig(repo_id=REPO, token=TOKEN)) == TOKEN
    with pytest.raises(PublishError, match="HF_TOKEN"):
        check_publish(PublishConfig(repo_id=REPO))


def test_model_card_describes_the_folder(dictionary_folder):
    card = render_model_card(dictionary_folder, METRICS, REPO)
    assert card.startswith("---\nlibrary_name: saelens\n")
    for row in [
        "| kind | sparse autoencoder |",
        "| architecture | topk (SAELens `topk`) |",
        "| model | tiny/llama |",
        "| hook | blocks.1.hook_resid_post |",
        "| site | resid_post.1 |",
        "| d_in | 16 |",
        "| d_sae (latents) | 48 |",
        "| k | 5 |",
        "| dataset | local text files: /data/*.txt |",
        "| tokens trained | 4,096 |",
        "| fvu | 0.1235 | fraction of variance unexplained (held-out tokens) |",
        "| ce_recovered | 0.9 | (zero − spliced) / (zero − clean) |",
        'sae = SAE.from_pretrained("alice/saes", "resid_post.1")',
        'sae = SAE.load_from_disk("path/to/resid_post.1")',
        'root = snapshot_download("alice/saes", allow_patterns=["resid_post.1/*"])',
        "from saetrain.export.saelens import load_dictionary",
    ]:
        assert row in card, row
    # metrics in reading order: fvu before l0 before delta_ce; unknown keys last
    assert card.index("| fvu |") < card.index("| l0 |") < card.index("| delta_ce |")
    assert card.index("| ce_recovered |") < card.index("| tokens |")
