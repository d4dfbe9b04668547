"""Folders written by SAELens, sparsify and dictionary_learning read right or refused by name.

Each fixture under tests/fixtures/<tool>/<case>/ was written by that tool's own save function
(scripts/make_interop_fixtures.py, run in a scratch virtualenv holding the tool), beside the
tool's own codes and reconstruction on fixed inputs (expected.safetensors). saetrain must
reproduce them; a field whose value it cannot reproduce must be refused, naming the field.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saetrain.dictionaries import SparseCodes
from saetrain.export.fields import UnknownFieldWarning, UnsupportedFieldError
from saetrain.export.formats import FolderFormatError, folder_format
from saetrain.export.saelens import load_dictionary

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _outputs(folder: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, saetrain's dense codes, saetrain's output) for the fixture's inputs."""
    expected = load_file(folder / "expected.safetensors")
    dictionary = load_dictionary(folder)
    x = expected["x"]
    with torch.no_grad():
        codes = dictionary.encode(x)
        dense = codes.to_dense(dictionary.n_latents) if isinstance(codes, SparseCodes) else codes
        out = dictionary.reconstruct(x, codes)
    return x, dense, out


def _assert_matches(folder: Path) -> None:
    expected = load_file(folder / "expected.safetensors")
    _, codes, out = _outputs(folder)
    assert (expected["codes"] != 0).any(), "the fixture must have active latents"
    assert torch.equal(codes != 0, expected["codes"] != 0), "a different set of active latents"
    torch.testing.assert_close(codes, expected["codes"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected["recon"], rtol=1e-5, atol=1e-5)


# -- SAELens ----------------------------------------------------------------------------------

SAELENS_READ = [
    "topk_training_rescale",  # issue 23: rescale_acts_by_decoder_norm, training format
    "topk_inference_rescale",
    "topk",
    "topk_legacy",  # pre-6.0: activation_fn_str topk + activation_fn_kwargs.k
    "standard",
    "standard_training",
    "gated",
    "jumprelu",
    "jumprelu_no_b_dec_input",  # apply_b_dec_to_input: false on an SAE (Gemma Scope)
    "batchtopk_training",  # topk_threshold → JumpReLU, as SAELens's inference export
    "matryoshka_batchtopk_training",
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
    "jumprelu_skip_transcoder",
    "hook_z",  # reshape_activations: SAELens flattens the heads as saetrain's attn_z does
]


@pytest.mark.parametrize("case", SAELENS_READ)
def test_saelens_folder_matches_saelens(case: str) -> None:
    _assert_matches(FIXTURES / "saelens" / case)


def test_rescaled_topk_decoder_rows_are_not_unit_norm() -> None:
    """The issue's folder is the hard case: its decoder rows are far from unit norm, so reading
    the weights without the field selects other latents."""
    W_dec = load_file(FIXTURES / "saelens" / "topk_training_rescale" / "sae_weights.safetensors")[
        "W_dec"
    ]
    norms = W_dec.norm(dim=-1)
    assert norms.max() / norms.min() > 1.5
    cfg = json.loads((FIXTURES / "saelens" / "topk_training_rescale" / "cfg.json").read_text())
    assert cfg["rescale_acts_by_decoder_norm"] is True


def test_saelens_apply_b_dec_to_input_false_stays_an_sae() -> None:
    dictionary = load_dictionary(FIXTURES / "saelens" / "jumprelu_no_b_dec_input")
    assert not dictionary.transcoder


def test_saelens_jumprelu_log_threshold_form(tmp_path: Path) -> None:
    """An older training format saved JumpReLU's threshold as log_threshold."""
    folder = tmp_path / "jumprelu"
    shutil.copytree(FIXTURES / "saelens" / "jumprelu", folder)
    weights = load_file(folder / "sae_weights.safetensors")
    # exp(log θ) only holds positive thresholds: keep those, and the expected outputs with them.
    assert (weights["threshold"] > 0).any()
    weights["threshold"] = weights["threshold"].clamp_min(1e-6)
    save_file(weights, str(folder / "sae_weights.safetensors"))
    expected_dictionary = load_dictionary(folder)
    weights["log_threshold"] = weights.pop("threshold").log()
    save_file(weights, str(folder / "sae_weights.safetensors"))
    x = load_file(folder / "expected.safetensors")["x"]
    with torch.no_grad():
        torch.testing.assert_close(load_dictionary(folder)(x), expected_dictionary(x))


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("normalize_layer_norm", "normalize_activations='layer_norm'"),
        ("normalize_constant_norm_rescale", "normalize_activations='constant_norm_rescale'"),
        ("normalize_expected_average_only_in", "normalize_activations='expected_average_only_in'"),
        ("hook_head_index", "hook_head_index=1"),
    ],
)
def test_saelens_unsupported_field_is_refused_by_name(case: str, field: str) -> None:
    with pytest.raises(UnsupportedFieldError, match=field):
        load_dictionary(FIXTURES / "saelens" / case)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"architecture": "abstopk"}, "architecture='abstopk'"),
        ({"finetuning_scaling_factor": True}, "finetuning_scaling_factor=True"),
        ({"activation_fn_kwargs": {"k": 7}}, "activation_fn_kwargs.k=7"),
    ],
)
def test_saelens_edited_field_is_refused_by_name(tmp_path: Path, edit: dict, field: str) -> None:
    folder = tmp_path / "topk"
    shutil.copytree(FIXTURES / "saelens" / "topk", folder)
    cfg = json.loads((folder / "cfg.json").read_text()) | edit
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedFieldError, match=field):
        load_dictionary(folder)


def test_saelens_unknown_field_is_a_warning_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "topk"
    shutil.copytree(FIXTURES / "saelens" / "topk", folder)
    cfg = json.loads((folder / "cfg.json").read_text()) | {"activation_scale": 2.0}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.warns(UnknownFieldWarning, match="activation_scale"):
        load_dictionary(folder)


def test_saelens_known_folders_read_without_warning(recwarn: pytest.WarningsRecorder) -> None:
    for case in SAELENS_READ:
        load_dictionary(FIXTURES / "saelens" / case)
    assert not [w for w in recwarn if issubclass(w.category, UnknownFieldWarning)]


# -- sparsify ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["topk", "transcoder_skip", "run/layers.3"])
def test_sparsify_folder_matches_sparsify(case: str) -> None:
    folder = FIXTURES / "sparsify" / case
    assert folder_format(folder) == "sparsify"
    _assert_matches(folder)


def test_sparsify_transcode_reads_x_itself() -> None:
    dictionary = load_dictionary(FIXTURES / "sparsify" / "transcoder_skip")
    assert dictionary.transcoder and dictionary.W_skip is not None


def test_sparsify_groupmax_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedFieldError, match="activation='groupmax'"):
        load_dictionary(FIXTURES / "sparsify" / "groupmax")


# -- dictionary_learning ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["standard", "gated", "topk", "batchtopk", "matryoshka_batchtopk", "jumprelu"]
)
def test_dictionary_learning_folder_matches_dictionary_learning(case: str) -> None:
    folder = FIXTURES / "dictionary_learning" / case
    assert folder_format(folder) == "dictionary_learning"
    _assert_matches(folder)


def test_an_unknown_tensor_is_a_warning_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "dl"
    shutil.copytree(FIXTURES / "dictionary_learning" / "topk", folder)
    state = torch.load(folder / "ae.pt", weights_only=True)
    torch.save(state | {"scale": torch.ones(32)}, folder / "ae.pt")
    with pytest.warns(UnknownFieldWarning, match="tensors .* ignored: scale"):
        load_dictionary(folder)
    folder = tmp_path / "sparsify"
    shutil.copytree(FIXTURES / "sparsify" / "topk", folder)
    tensors = load_file(folder / "sae.safetensors")
    save_file(tensors | {"scale": torch.ones(32)}, str(folder / "sae.safetensors"))
    with pytest.warns(UnknownFieldWarning, match="tensors .* ignored: scale"):
        load_dictionary(folder)


def test_dictionary_learning_unknown_class_is_refused_by_name(tmp_path: Path) -> None:
    folder = tmp_path / "dl"
    shutil.copytree(FIXTURES / "dictionary_learning" / "standard", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["trainer"]["dict_class"] = "AutoEncoderNew"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedFieldError, match="trainer.dict_class='AutoEncoderNew'"):
        load_dictionary(folder)


# -- detection --------------------------------------------------------------------------------


def test_a_folder_of_no_format_names_every_layout(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FolderFormatError, match="sae.safetensors.*ae.pt"):
        load_dictionary(tmp_path)


# -- python -m saetrain.evaluate on a foreign folder ------------------------------------------


def test_evaluate_reads_where_a_sparsify_run_was_trained() -> None:
    from saetrain.evaluation.folder import EvaluateConfig, resolve

    r = resolve(EvaluateConfig(path=str(FIXTURES / "sparsify" / "run" / "layers.3")))
    assert r.model.name == "HuggingFaceTB/SmolLM2-135M"
    assert (r.input_site, r.target_site) == ("resid_post.3", "resid_post.3")
    assert r.data.context_size == 64


@pytest.mark.parametrize(
    ("case", "missing", "named"),
    [
        ("sparsify/topk", ["model.name", "site.input"], []),
        ("dictionary_learning/topk", ["site.input"], ["model.name"]),
    ],
)
def test_evaluate_names_the_fields_a_foreign_folder_lacks(
    capsys: pytest.CaptureFixture[str], case: str, missing: list[str], named: list[str]
) -> None:
    from saetrain.evaluate import main

    assert main([f"path={FIXTURES / case}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saetrain.evaluate: error:") and "Traceback" not in err
    for field in missing:
        assert f"{field}=" in err
    for field in named:
        assert f"{field}=" not in err


def test_evaluate_takes_the_fields_from_the_command_line() -> None:
    from saetrain.evaluation.folder import EvaluateConfig, resolve

    cfg = EvaluateConfig(path=str(FIXTURES / "sparsify" / "topk"))
    cfg.model.name = "some/model"
    cfg.site.input = "resid_post.2"
    r = resolve(cfg, {"model.name", "site.input"})
    assert r.model.name == "some/model" and r.input_site == "resid_post.2"


def test_evaluate_a_dictionary_learning_folder_at_mlp_in(
    tiny_model: Path, corpus: Path, tmp_path: Path
) -> None:
    """End to end on a tiny Llama: the folder's lm_name is the model, the site comes from the
    command line, and the MLP-input dictionary is not rewritten as if it read TransformerLens's
    pre-affine hook (dictionary_learning hooks the model's own modules)."""
    from saetrain.evaluate import evaluate_path

    fixture = FIXTURES / "dictionary_learning" / "topk"
    shapes = {"encoder.weight": (64, 32), "encoder.bias": (64,), "decoder.weight": (32, 64)}
    g = torch.Generator().manual_seed(0)
    state = {
        name: (torch.randn(shapes.get(name, (32,)), generator=g) * 0.2 if t.is_floating_point()
               and t.ndim else t)
        for name, t in torch.load(fixture / "ae.pt", weights_only=True).items()
    }  # fmt: skip
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    torch.save(state, folder / "ae.pt")
    cfg = json.loads((fixture / "config.json").read_text())
    cfg["trainer"] |= {"lm_name": str(tiny_model), "activation_dim": 32, "dict_size": 64}
    cfg["buffer"]["ctx_len"] = 16
    (folder / "config.json").write_text(json.dumps(cfg))
    report = evaluate_path(
        folder,
        [
            "site.input=mlp_in.1", "model.device=cpu", "data.path=text",
            f"data.data_files=[{corpus}/*.txt]", "data.holdout_percent=10", "eval.n_tokens=128",
            "eval.batch_contexts=8", "eval.ce_contexts=8",
        ],
    )  # fmt: skip
    r = report.resolved
    assert r.source == "config.json" and r.model.name == str(tiny_model)
    assert (r.input_site, r.data.context_size) == ("mlp_in.1", 16)
    assert 0 < report.metrics["fvu"] < float("inf")
