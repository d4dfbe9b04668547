"""Cross-layer dictionaries (issue 12) through the whole pipeline on the tiny Llama of conftest.py:
a CLT over mlp_in.* → mlp_out.* and a crosscoder over resid_post.* (3 layers each) train,
evaluate (per-site FVU, per-layer L0 and CE checked against an independent computation with
plain forward hooks) and save; checkpoint + resume is bitwise the uninterrupted run; a `*`
transcoder pattern trains one folder per layer."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import saetrain
from saetrain.activations.model import load_lm
from saetrain.activations.tokens import TokenSource
from saetrain.config import CheckpointConfig
from saetrain.dictionaries.clt import CLTLoader
from saetrain.evaluation.evaluate import first_contexts
from saetrain.export.saelens import load_dictionary
from saetrain.run import run
from saetrain.training import trainer as trainer_module
from saetrain.training.checkpoint import list_checkpoints
from tests.helpers.cross_layer import replaced_ce, site_fvu_and_l0
from tests.helpers.runs import _tiny_overrides

CLT = ["site.input=mlp_in.*", "site.target=mlp_out.*", "site.layers=[0,1,2]",
       "dictionary.kind=clt", "dictionary.k=4"]  # fmt: skip
CROSSCODER = ["site.input=resid_post.*", "site.layers=[0,1,2]", "dictionary.kind=crosscoder",
              "dictionary.k=4"]  # fmt: skip
MLP_IN = [f"mlp_in.{li}" for li in range(3)]
MLP_OUT = [f"mlp_out.{li}" for li in range(3)]
RESID = [f"resid_post.{li}" for li in range(3)]
CE_KEYS = ("ce_clean", "ce_spliced", "ce_zero_ablated", "delta_ce", "ce_recovered", "kl_div")


def _cfg(tiny_model: Path, corpus: Path, extra: list[str]):
    return saetrain.config_from_overrides(_tiny_overrides(tiny_model, corpus) + extra)


def _load_clt_directly(folder: Path):
    """The CLT class's own loader on the saved files, without load_dictionary."""
    cfg = json.loads((folder / "cfg.json").read_text())
    return CLTLoader.from_saelens(cfg, load_file(folder / "sae_weights.safetensors")).eval()


def _held_out(cfg):
    """The held-out contexts run() evaluated on, and the first ce_contexts of them."""
    model, tokenizer = load_lm(cfg.model, torch.device("cpu"))
    n = max(math.ceil(cfg.eval.n_tokens / cfg.data.context_size), cfg.eval.ce_contexts)
    batches = TokenSource(cfg.data, tokenizer, cfg.seed).held_out(n, cfg.eval.batch_contexts)
    return model, batches, first_contexts(batches, cfg.eval.ce_contexts)


@pytest.fixture(scope="module")
def clt_run(tiny_model, corpus, tmp_path_factory):
    cfg = _cfg(tiny_model, corpus, CLT)
    return cfg, run(cfg, tmp_path_factory.mktemp("clt_run"))


@pytest.fixture(scope="module")
def crosscoder_run(tiny_model, corpus, tmp_path_factory):
    cfg = _cfg(tiny_model, corpus, CROSSCODER)
    return cfg, run(cfg, tmp_path_factory.mktemp("crosscoder_run"))


def _check_common(result, folder_name: str, kind: str, targets: list[str]) -> dict:
    assert result.dictionary_dir.name == folder_name
    assert [d.name for d in result.dictionaries] == [folder_name]
    m = result.metrics
    for site in targets:
        assert 0.0 < m[f"fvu.{site}"] < 2.0, site
    for key in CE_KEYS:
        assert math.isfinite(m[key]), key
    assert m["ce_clean"] > 0 and m["ce_spliced"] > 0 and m["ce_zero_ablated"] > 0
    info = json.loads((result.dictionary_dir / "saetrain_run.json").read_text())
    assert info["tokens_seen"] == 2048
    assert info["config"]["dictionary"]["kind"] == kind
    assert info["final_metrics"]["fvu"] == pytest.approx(m["fvu"])
    # one normalisation scale per site
    assert len(info["normalization_scale"]) == 3
    return json.loads((result.dictionary_dir / "cfg.json").read_text())


def test_clt_run_trains_evaluates_and_saves(clt_run):
    cfg, result = clt_run
    saved = _check_common(result, "mlp_in.0-2-mlp_out.0-2", "clt", MLP_OUT)
    m = result.metrics
    assert (saved["architecture"], saved["clt_architecture"], saved["n_layers"]) == (
        "clt",
        "topk",
        3,
    )
    assert (saved["d_in_per_layer"], saved["d_out_per_layer"], saved["d_sae_per_layer"]) == (
        32, 32, 64,
    )  # fmt: skip
    # TopK in each layer: at most k=4 active per layer, and the total is their sum
    for site in MLP_IN:
        assert 0 < m[f"l0.{site}"] <= 4.0
    assert m["l0"] == pytest.approx(sum(m[f"l0.{s}"] for s in MLP_IN), rel=1e-9)
    tensors = load_file(result.dictionary_dir / "sae_weights.safetensors")
    assert tensors["W_enc"].shape == (3, 32, 64)
    assert [tuple(tensors[f"W_dec.{li}"].shape) for li in range(3)] == [
        (64, 96),
        (64, 64),
        (64, 32),
    ]
    assert tensors["b_dec"].shape == (96,) and tensors["b_enc"].shape == (192,)


def test_clt_run_metrics_equal_an_independent_computation_from_the_saved_files(clt_run):
    """fvu.mlp_out.ℓ, l0.mlp_in.ℓ and the CE with all three mlp_out replaced at once, recomputed
    from the saved (raw-scale) weights with plain forward hooks, equal what the run reported:
    the export folds the per-site scales correctly and evaluation splices causally."""
    cfg, result = clt_run
    clt = load_dictionary(result.dictionary_dir)
    assert clt.kind == "clt" and clt.n_layers == 3
    model, batches, ce_batches = _held_out(cfg)
    fvu, l0 = site_fvu_and_l0(model, clt, MLP_IN, MLP_OUT, batches)
    m = result.metrics
    for site in MLP_OUT:
        assert m[f"fvu.{site}"] == pytest.approx(fvu[site], rel=1e-4), site
    for site in MLP_IN:
        assert m[f"l0.{site}"] == pytest.approx(l0[site], rel=1e-9), site
    ce = replaced_ce(model, clt, "clt", MLP_IN, MLP_OUT, ce_batches)
    for key, value in ce.items():
        assert m[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert ce["ce_spliced"] != ce["ce_clean"]


def test_clt_run_folder_reloads_with_identical_outputs(clt_run):
    _, result = clt_run
    reference = _load_clt_directly(result.dictionary_dir)
    loaded = load_dictionary(result.dictionary_dir)
    x = torch.randn(20, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


def test_crosscoder_run_trains_evaluates_and_saves(crosscoder_run):
    cfg, result = crosscoder_run
    saved = _check_common(result, "resid_post.0-2", "crosscoder", RESID)
    assert (saved["architecture"], saved["crosscoder_architecture"]) == ("crosscoder", "topk")
    assert (saved["n_sources"], saved["d_source"], saved["d_sae"]) == (3, 32, 64)
    assert 0 < result.metrics["l0"] <= 4.0
    tensors = load_file(result.dictionary_dir / "sae_weights.safetensors")
    assert tensors["W_enc"].shape == (3, 32, 64) and tensors["W_dec"].shape == (64, 3, 32)
    assert tensors["b_dec"].shape == (3, 32) and tensors["b_enc"].shape == (64,)


def test_crosscoder_run_reloads_and_its_metrics_equal_an_independent_computation(crosscoder_run):
    cfg, result = crosscoder_run
    cc = load_dictionary(result.dictionary_dir)
    assert cc.kind == "crosscoder" and cc.source_widths == (32, 32, 32)
    model, batches, ce_batches = _held_out(cfg)
    fvu, _ = site_fvu_and_l0(model, cc, RESID, RESID, batches)
    m = result.metrics
    for site in RESID:
        assert m[f"fvu.{site}"] == pytest.approx(fvu[site], rel=1e-4), site
    ce = replaced_ce(model, cc, "crosscoder", RESID, RESID, ce_batches)
    for key, value in ce.items():
        assert m[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # the saved weights are what the load gives back, bit for bit
    tensors = load_file(result.dictionary_dir / "sae_weights.safetensors")
    assert torch.equal(cc.W_enc.detach(), tensors["W_enc"].reshape(96, 64))
    assert torch.equal(cc.W_dec.detach(), tensors["W_dec"].reshape(64, 96))


def _fail_at_step(monkeypatch, n: int) -> None:
    real = trainer_module.Trainer.step
    calls = [0]

    def step(self, batch):
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError("crash")
        return real(self, batch)

    monkeypatch.setattr(trainer_module.Trainer, "step", step)


@pytest.mark.parametrize(
    "extra",
    [CLT, CLT + ["dictionary.architecture=jumprelu", "dictionary.jumprelu_sparsity_loss=tanh",
                 "dictionary.jumprelu_pre_act_coefficient=0.01"],
     CLT + ["dictionary.architecture=batchtopk"], CROSSCODER],
    ids=["clt-topk", "clt-jumprelu", "clt-batchtopk", "crosscoder-topk"],
)  # fmt: skip
def test_cross_layer_resume_is_bitwise_the_uninterrupted_run(
    tiny_model, corpus, tmp_path, monkeypatch, extra
):
    extra = extra + ["eval.n_tokens=64", "eval.compute_ce=false", "trainer.total_tokens=1280"]
    cfg = _cfg(tiny_model, corpus, extra)  # 5 steps of 256 tokens, a checkpoint after each
    cfg = replace(cfg, checkpoint=CheckpointConfig(every_tokens=256, keep_last=2))
    whole = run(cfg, tmp_path / "whole")
    _fail_at_step(monkeypatch, 4)
    with pytest.raises(RuntimeError, match="crash"):
        run(cfg, tmp_path / "broken")
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path / "broken")] == [
        "step-000000002.pt", "step-000000003.pt",
    ]  # fmt: skip
    resumed = run(replace(cfg, resume=str(tmp_path / "broken")), tmp_path / "elsewhere")
    assert resumed.output_dir == tmp_path / "broken"
    a = load_file(whole.dictionary_dir / "sae_weights.safetensors")
    b = load_file(resumed.dictionary_dir / "sae_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    info = json.loads((resumed.dictionary_dir / "saetrain_run.json").read_text())
    assert info["stream"]["resumed_at_step"] == 3 and info["tokens_seen"] == 1280
    assert resumed.metrics["fvu"] == whole.metrics["fvu"]
    for site in MLP_OUT if "dictionary.kind=clt" in extra else RESID:
        assert resumed.metrics[f"fvu.{site}"] == whole.metrics[f"fvu.{site}"]


@pytest.mark.parametrize(
    ("layers", "expected"),
    [(None, [0, 1, 2]), ("[0,2]", [0, 2])],
    ids=["every-layer", "layers-0-2"],
)
def test_transcoder_pattern_trains_one_folder_per_layer(tiny_model, corpus, tmp_path, layers,
                                                        expected):  # fmt: skip
    extra = ["site.input=mlp_in.*", "site.target=mlp_out.*", "trainer.total_tokens=1024"]
    if layers is not None:
        extra.append(f"site.layers={layers}")
    result = run(_cfg(tiny_model, corpus, extra), tmp_path)
    names = [f"mlp_in.{li}-mlp_out.{li}" for li in expected]
    assert [d.name for d in result.dictionaries] == names
    for name, layer in zip(names, expected, strict=True):
        folder = tmp_path / name
        loaded = load_dictionary(folder)
        assert loaded.kind == "single" and loaded.transcoder
        assert (loaded.d_in, loaded.d_out, loaded.n_latents) == (32, 32, 64)
        saved = json.loads((folder / "cfg.json").read_text())
        assert saved["metadata"]["hook_name"] == f"blocks.{layer}.ln2.hook_normalized"
        assert saved["metadata"]["hook_name_out"] == f"blocks.{layer}.hook_mlp_out"
        metrics = json.loads((folder / "saetrain_run.json").read_text())["final_metrics"]
        assert 0 < metrics["fvu"] < 2 and metrics["l0"] > 0


def test_clt_and_crosscoder_on_one_stream_equal_their_separate_runs(
    tiny_model, corpus, tmp_path, clt_run, crosscoder_run
):
    """Both kinds in one run (`dictionaries`, one LM pass, rows holding every site) train to the
    same weights, bit for bit, as each alone, and report the same held-out metrics."""
    entries = [
        {"name": "clt", "site": {"input": "mlp_in.*", "target": "mlp_out.*", "layers": [0, 1, 2]},
         "dictionary": {"kind": "clt", "k": 4}},
        {"name": "cc", "site": {"input": "resid_post.*", "layers": [0, 1, 2]},
         "dictionary": {"kind": "crosscoder", "k": 4}},
    ]  # fmt: skip
    base = _cfg(tiny_model, corpus, ["dictionary.k=4"])
    both = run(saetrain.api.check(replace(base, dictionaries=entries)), tmp_path)
    assert [d.name for d in both.dictionaries] == ["clt", "cc"]
    for (_, alone), result in zip((clt_run, crosscoder_run), both.dictionaries, strict=True):
        a = load_file(alone.dictionary_dir / "sae_weights.safetensors")
        b = load_file(result.dictionary_dir / "sae_weights.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (result.name, key)
        for key, value in alone.metrics.items():
            assert result.metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("arch", ["jumprelu", "batchtopk"])
def test_threshold_clt_on_layers_0_and_2_metrics_equal_an_independent_computation(
    tiny_model, corpus, tmp_path, arch
):
    """A JumpReLU CLT (tanh penalty, pre-activation loss) or a BatchTopK CLT (a per-layer
    threshold at inference) on non-adjacent layers [0, 2]: the
    CLT's layer index is the position in site.layers (its layer-1 latents read mlp_in.2), and its
    per-site FVU, per-layer L0 and replaced CE are what plain hooks give from the saved files."""
    extra = ["site.input=mlp_in.*", "site.target=mlp_out.*", "site.layers=[0,2]",
             "dictionary.kind=clt", f"dictionary.architecture={arch}",
             "dictionary.jumprelu_sparsity_loss=tanh",
             "dictionary.jumprelu_pre_act_coefficient=0.01",
             "trainer.total_tokens=1024"]  # fmt: skip
    cfg = _cfg(tiny_model, corpus, extra)
    result = run(cfg, tmp_path)
    assert result.dictionary_dir.name == "mlp_in.0_2-mlp_out.0_2"
    clt = load_dictionary(result.dictionary_dir)
    assert (clt.architecture, clt.n_layers, clt.layer_latents) == (arch, 2, 64)
    inputs, targets = ["mlp_in.0", "mlp_in.2"], ["mlp_out.0", "mlp_out.2"]
    m = result.metrics
    assert {f"fvu.{s}" for s in targets} | {f"l0.{s}" for s in inputs} <= m.keys()
    assert "fvu.mlp_out.1" not in m and "l0.mlp_in.1" not in m
    model, batches, ce_batches = _held_out(cfg)
    fvu, l0 = site_fvu_and_l0(model, clt, inputs, targets, batches)
    for site in targets:
        assert m[f"fvu.{site}"] == pytest.approx(fvu[site], rel=1e-4), site
    for site in inputs:
        assert l0[site] > 0
        assert m[f"l0.{site}"] == pytest.approx(l0[site], rel=1e-9), site
    ce = replaced_ce(model, clt, "clt", inputs, targets, ce_batches)
    for key, value in ce.items():
        assert m[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
