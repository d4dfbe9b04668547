"""dictionary.init_from: a run starts from a saved dictionary (saetrain's folder, or one written in
SAELens's layout by hand) with the folder's architecture and width, exactly the folder's
dictionary on raw activations at step 0, and trains on from there."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saetrain.checks import validate
from saetrain.config import (
    BufferConfig,
    Config,
    DataConfig,
    DictionaryConfig,
    DistributedConfig,
    EvalConfig,
    LoggerConfig,
    ModelConfig,
    SiteConfig,
    TrainerConfig,
)
from saetrain.errors import ConfigError
from saetrain.export.saelens import load_dictionary
from saetrain.preflight import preflight
from saetrain.run import run
from saetrain.training.finetune import read_start, starting_config
from saetrain.training.fit import fold, prepare_trainer


def _cfg(model: Path, corpus: Path, dictionary: DictionaryConfig, **trainer: float) -> Config:
    return Config(
        model=ModelConfig(name=str(model), gguf_package=None, device="cpu"),
        data=DataConfig(data_files=[str(corpus / "*.txt")], context_size=16, holdout_percent=10),
        site=SiteConfig(input="resid_post.1"),
        buffer=BufferConfig(size_tokens=1024, lm_batch_contexts=8),
        dictionary=dictionary,
        trainer=TrainerConfig(
            **{
                "total_tokens": 2048,
                "batch_tokens": 256,
                "lr": 1e-3,
                "warmup_steps": 2,
                "init_batches": 2,
                **trainer,
            }
        ),  # fmt: skip
        eval=EvalConfig(n_tokens=256, batch_contexts=8, compute_ce=False),
        logger=LoggerConfig(log_every=2),
    )


@pytest.fixture(scope="module")
def base_run(tiny_model, corpus, tmp_path_factory):
    """A short TopK run (64 latents, k 4): the folder the fine-tuning runs start from."""
    cfg = _cfg(tiny_model, corpus, DictionaryConfig(architecture="topk", n_latents=64, k=4))
    return run(cfg, tmp_path_factory.mktemp("base"))


def test_finetune_starts_at_the_folder_and_trains_on(base_run, tiny_model, corpus, tmp_path):
    start = DictionaryConfig(init_from=str(base_run.dictionary_dir))  # k, n_latents: defaults
    # A learning rate too small to move anything: the held-out numbers are the folder's, so the
    # start is the folder's dictionary on raw activations, through the whole run.
    frozen = run(_cfg(tiny_model, corpus, start, lr=1e-12, total_tokens=512), tmp_path / "same")
    for key in ("fvu", "mse", "l0", "never_fired_fraction"):
        assert frozen.metrics[key] == pytest.approx(base_run.metrics[key], rel=1e-4), key
    saved = json.loads((frozen.dictionary_dir / "cfg.json").read_text())
    assert (saved["architecture"], saved["d_sae"], saved["k"]) == ("topk", 64, 4)
    info = json.loads((frozen.dictionary_dir / "saetrain_run.json").read_text())
    assert info["init_from"] == {
        "folder": str(base_run.dictionary_dir),
        "taken_from_folder": {"architecture": "topk", "n_latents": 64, "skip": False, "k": 4},
        "normalization": "folder",
    }
    base_info = json.loads((base_run.dictionary_dir / "saetrain_run.json").read_text())
    assert info["normalization_scale"] == base_info["normalization_scale"]

    # Trained on: twice the tokens again, the loss falls and the held-out FVU ends below the
    # folder's.
    tuned = run(_cfg(tiny_model, corpus, start, total_tokens=4096), tmp_path / "tuned")
    log = json.loads((tuned.dictionary_dir / "saetrain_run.json").read_text())["train_log"]
    losses = [row["loss"] for row in log]
    assert losses[-1] < losses[0]
    assert tuned.metrics["fvu"] < base_run.metrics["fvu"]


def _saelens_folder(folder: Path, architecture: str, d_in: int = 32, n: int = 48,
                    transcoder: bool = False) -> Path:  # fmt: skip
    """A folder in SAELens's layout, written by hand: decoder rows of unequal norms (equal ones
    for topk, whose codes cannot be rescaled per latent), raw-activation units."""
    g = torch.Generator().manual_seed(3)
    W_dec = torch.randn(n, d_in, generator=g)
    norms = (
        torch.full((n, 1), 2.5)
        if architecture == "topk"
        else 0.5 + 3 * torch.rand(n, 1, generator=g)
    )
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * norms
    tensors = {"W_enc": 0.3 * torch.randn(d_in, n, generator=g), "W_dec": W_dec,
               "b_enc": 0.1 * torch.randn(n, generator=g), "b_dec": torch.randn(d_in)}  # fmt: skip
    meta = {"model_name": "some/model", "hook_name": "blocks.1.hook_resid_post"}
    cfg = {"architecture": architecture, "d_in": d_in, "d_sae": n, "dtype": "float32",
           "apply_b_dec_to_input": not transcoder, "normalize_activations": "none",
           "metadata": meta}  # fmt: skip
    if architecture == "topk":
        cfg["k"] = 6
    if architecture == "jumprelu":
        tensors["threshold"] = 0.2 + torch.rand(n, generator=g)
    if architecture == "gated":
        b_gate = tensors.pop("b_enc")
        tensors |= {"b_gate": b_gate, "b_mag": 0.1 * torch.randn(n, generator=g),
                    "r_mag": 0.2 * torch.randn(n, generator=g)}  # fmt: skip
    if transcoder:
        cfg["d_out"] = d_in
    folder.mkdir()
    save_file(tensors, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize(
    "architecture, transcoder",
    [
        ("topk", False),
        ("jumprelu", False),
        ("standard", False),
        ("gated", False),
        ("jumprelu", True),
    ],  # fmt: skip
)
def test_start_is_the_folders_dictionary_on_raw_activations(tmp_path, architecture, transcoder):
    """Moved into the run's normalised space (scales estimated here: the folder records none),
    decoder rows made unit norm, and folded back: the folder's outputs and codes on raw rows."""
    folder = _saelens_folder(tmp_path / "sae", architecture, transcoder=transcoder)
    start = read_start(str(folder), "resid_post.1", "resid_post.1")
    assert start.scales is None
    site = SiteConfig("mlp_in.1", "mlp_out.1") if transcoder else SiteConfig("resid_post.1")
    cfg = starting_config(Config(site=site, dictionary=DictionaryConfig(init_from=str(folder))),
                          start, 32)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    width = 64 if transcoder else 32
    samples = 7.0 * torch.randn(512, width, generator=g) + 3.0  # raw: far from E‖x‖² = d
    trainer = prepare_trainer(cfg.dictionary, TrainerConfig(), samples, 32, 32, transcoder,
                              torch.device("cpu"), g, start=start)  # fmt: skip
    assert 0.02 < trainer.scale < 0.5  # estimated: E‖s·x‖² = d
    d = trainer.dictionary
    if d.unit_norm_decoder:
        assert torch.allclose(d.decoder_norms(), torch.ones(48), atol=1e-5)
    loaded, exported = load_dictionary(folder), fold(trainer).exported
    x = samples[:, :32]
    with torch.no_grad():
        assert torch.allclose(exported(x), loaded(x), rtol=1e-4, atol=1e-4)
        codes_a, codes_b = exported.encode(x), loaded.encode(x)
        if architecture == "topk":
            assert torch.equal(codes_a.indices.sort(-1).values, codes_b.indices.sort(-1).values)
        else:
            assert torch.equal(codes_a > 0, codes_b > 0)


def test_settings_taken_from_the_folder_conflicts_named(base_run, tiny_model, corpus, tmp_path):
    folder = str(base_run.dictionary_dir)
    ok = _cfg(tiny_model, corpus, DictionaryConfig(init_from=folder, k=4, aux_k=8))
    preflight(ok)  # the folder's own k set again, and a training setting: fine
    for dictionary, message in [
        (DictionaryConfig(init_from=folder, k=8), r"dictionary.k=8, but the folder .* holds k=4"),
        (DictionaryConfig(init_from=folder, architecture="relu"),
         r"dictionary.architecture='relu', but the folder .* holds architecture='topk'"),
        (DictionaryConfig(init_from=folder, expansion_factor=4),
         r"expansion_factor=4 × d_in=32 = 128 latents, but the folder .* holds 64"),
        (DictionaryConfig(init_from=str(tmp_path / "none")), "init_from=.*: no such folder"),
    ]:  # fmt: skip
        out = tmp_path / "out"
        with pytest.raises(ConfigError, match=message):
            run(_cfg(tiny_model, corpus, dictionary), out)
        assert not out.exists()  # refused before the LM loads or the run folder is made


def test_sites_must_fit_the_folder(base_run, tiny_model, corpus, tmp_path):
    base = _cfg(tiny_model, corpus, DictionaryConfig(init_from=str(base_run.dictionary_dir)))
    transcoder = dataclasses.replace(base, site=SiteConfig("mlp_in.1", "mlp_out.1"))
    with pytest.raises(ConfigError, match=r"holds an SAE \(32 → 32\), but the run's sites "
                                          r"mlp_in.1 → mlp_out.1 make a transcoder"):  # fmt: skip
        preflight(transcoder)
    narrow = _saelens_folder(tmp_path / "narrow", "topk", d_in=16)
    with pytest.raises(ConfigError, match=r"16 → 16 wide, but the run's sites resid_post.1 are "
                                          r"32 → 32 wide"):  # fmt: skip
        preflight(dataclasses.replace(base, dictionary=DictionaryConfig(init_from=str(narrow))))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dictionary": DictionaryConfig(init_from="x", kind="crosscoder"),
          "site": SiteConfig("resid_post.*", layers=[0, 1])}, "dictionary.kind='crosscoder'"),
        ({"site": SiteConfig("resid_post.*")}, "trains one per layer"),
        ({"distributed": DistributedConfig(shard_latents=True)}, "distributed.shard_latents"),
    ],
)  # fmt: skip
def test_kinds_a_run_cannot_start_from_are_refused(change, message):
    cfg = dataclasses.replace(Config(dictionary=DictionaryConfig(init_from="x")), **change)
    with pytest.raises(ConfigError, match=r"dictionary.init_from='x'.*" + message):
        validate(cfg)


def _sparsify_folder(folder: Path, d_in: int = 32, n: int = 48) -> Path:
    """A folder in sparsify's layout (cfg.json + sae.safetensors, encoder.weight [n, d_in]),
    written by hand with unit decoder rows as sparsify keeps them."""
    g = torch.Generator().manual_seed(5)
    W_dec = torch.randn(n, d_in, generator=g)
    tensors = {
        "encoder.weight": 0.3 * torch.randn(n, d_in, generator=g),
        "encoder.bias": 0.1 * torch.randn(n, generator=g),
        "W_dec": W_dec / W_dec.norm(dim=1, keepdim=True),
        "b_dec": torch.randn(d_in),
    }
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
           "num_latents": n, "k": 6, "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": d_in}  # fmt: skip
    folder.mkdir()
    save_file(tensors, folder / "sae.safetensors")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def test_a_sparsify_folder_starts_as_the_dictionary_it_holds(tmp_path):
    """Read through the same loader as every format: TopK with sparsify's k and width, and the
    start folded back gives the folder's codes and outputs on raw rows."""
    folder = _sparsify_folder(tmp_path / "layers.1")
    start = read_start(str(folder), "resid_post.1", "resid_post.1")
    cfg = starting_config(
        Config(site=SiteConfig("resid_post.1"), dictionary=DictionaryConfig(init_from=str(folder))),
        start,
        32,
    )
    assert (cfg.dictionary.architecture, cfg.dictionary.k, cfg.dictionary.n_latents) == (
        "topk",
        6,
        48,
    )
    g = torch.Generator().manual_seed(0)
    samples = 5.0 * torch.randn(512, 32, generator=g) - 1.0
    trainer = prepare_trainer(cfg.dictionary, TrainerConfig(), samples, 32, 32, False,
                              torch.device("cpu"), g, start=start)  # fmt: skip
    loaded, exported = load_dictionary(folder), fold(trainer).exported
    with torch.no_grad():
        assert torch.allclose(exported(samples), loaded(samples), rtol=1e-4, atol=1e-4)
        a, b = exported.encode(samples), loaded.encode(samples)
        assert torch.equal(a.indices.sort(-1).values, b.indices.sort(-1).values)
