"""SAELens-layout save/load round trip and atomic writes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from saetrain.atomic import atomic_write_bytes
from saetrain.dictionaries import TopKSAE
from saetrain.export.saelens import CFG_FILE, WEIGHTS_FILE, load_dictionary, save_dictionary

META = {"model_name": "m", "hook_name": "blocks.3.hook_resid_post", "hook_layer": 3}


def _trained_looking_sae(d: int = 24, n: int = 96, k: int = 5) -> TopKSAE:
    g = torch.Generator().manual_seed(0)
    sae = TopKSAE(d, n, k=k, generator=g)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return sae


def test_round_trip_gives_identical_outputs(tmp_path):
    sae = _trained_looking_sae()
    save_dictionary(sae, tmp_path, META)
    loaded = load_dictionary(tmp_path)
    assert isinstance(loaded, TopKSAE) and loaded.k == sae.k
    x = torch.randn(50, sae.d_in, generator=torch.Generator().manual_seed(1)) * 3
    assert torch.equal(loaded(x), sae(x))
    codes_a, codes_b = sae.encode(x), loaded.encode(x)
    assert torch.equal(codes_a.to_dense(sae.n_latents), codes_b.to_dense(sae.n_latents))


def test_files_follow_the_saelens_layout(tmp_path):
    sae = _trained_looking_sae(d=24, n=96, k=5)
    save_dictionary(sae, tmp_path, META, run_info={"tokens_seen": 123})
    cfg = json.loads((tmp_path / CFG_FILE).read_text())
    assert cfg["architecture"] == "topk"
    assert (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (24, 96, 5)
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["hook_name"] == "blocks.3.hook_resid_post"  # older SAELens reads it here
    assert "d_out" not in cfg  # only transcoders carry it
    tensors = load_file(tmp_path / WEIGHTS_FILE)
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    assert shapes == {"W_enc": (24, 96), "b_enc": (96,), "W_dec": (96, 24), "b_dec": (24,)}
    assert json.loads((tmp_path / "saetrain_run.json").read_text())["tokens_seen"] == 123
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_loading_a_folder_without_a_dictionary_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_dictionary(tmp_path / "nope")


def test_loading_an_unknown_architecture_names_it(tmp_path):
    save_dictionary(_trained_looking_sae(), tmp_path, META)
    cfg = json.loads((tmp_path / CFG_FILE).read_text())
    cfg["architecture"] = "quantum"
    (tmp_path / CFG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantum"):
        load_dictionary(tmp_path)


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "w.bin"
    atomic_write_bytes(target, b"old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["w.bin"]
