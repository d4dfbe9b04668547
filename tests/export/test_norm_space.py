"""mlp_in dictionaries saved for TransformerLens's ln2.hook_normalized (before the norm's affine):
the affine read off each family's norm, the rewrite that keeps every code and reconstruction, the
round trip through a folder, and a run whose SAELens weights work on g(x) where saetrain's work on
the model's own MLP input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from saetrain.config import DictionaryConfig, DictionarySpec, SiteConfig
from saetrain.dictionaries import ARCHITECTURES, Dictionary, SparseCodes, build_dictionary
from saetrain.export.model_card import render_model_card
from saetrain.export.norm_space import (
    NORM_FILE,
    Affine,
    NormFoldError,
    from_norm_space,
    norm_affine,
    to_norm_space,
)
from saetrain.export.saelens import load_dictionary, save_dictionary
from saetrain.run import run
from tests.helpers.runs import _config

D = 16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("d", [576, 37])
def test_the_affine_of_each_family_s_norm_is_read_exactly(d):
    g = _gen(0)
    llama = LlamaRMSNorm(d)
    llama.weight.data = torch.randn(d, generator=g)
    gemma = Gemma2RMSNorm(d)  # output · (1 + weight)
    gemma.weight.data = torch.randn(d, generator=g)
    layer = torch.nn.LayerNorm(d)  # GPT-2, GPT-NeoX: weight and bias
    layer.weight.data, layer.bias.data = torch.randn(d, generator=g), torch.randn(d, generator=g)

    a = norm_affine(llama, d)
    assert torch.equal(a.scale, llama.weight.data) and not a.shift.any()
    a = norm_affine(gemma, d)
    torch.testing.assert_close(a.scale, 1.0 + gemma.weight.data, rtol=0, atol=3e-7)
    assert not a.shift.any()
    a = norm_affine(layer, d)
    assert torch.equal(a.scale, layer.weight.data) and torch.equal(a.shift, layer.bias.data)
    # A bf16 model's untrained norm: exactly the identity affine, so the fold changes no bit.
    a = norm_affine(LlamaRMSNorm(d).to(torch.bfloat16), d)
    assert torch.equal(a.scale, torch.ones(d)) and not a.shift.any()


def test_a_module_that_is_not_a_norm_is_refused_and_a_zero_scale_is_read_as_zero():
    with pytest.raises(NormFoldError, match="neither RMS nor layer normalisation"):
        norm_affine(torch.nn.Linear(D, D), D)
    norm = Gemma3RMSNorm(D)  # Gemma 3: output · (1 + weight); weight −1 zeroes a channel
    norm.weight.data = torch.randn(D, generator=_gen(1))
    norm.weight.data[3] = -1.0
    a = norm_affine(norm, D)
    assert a.zero_channels() == [3] and a.scale[3] == 0.0 and not a.shift.any()
    inverse = a.inverse()  # 1/0 is 0: the model's channel is constant there, z is lost
    assert inverse.scale[3] == 0.0 and bool(inverse.scale.isfinite().all())
    assert bool(inverse.shift.isfinite().all())


def test_an_input_side_with_a_zero_scale_is_folded_exactly_and_a_target_side_refused():
    """A skip transcoder mlp_in → mlp_out on a norm that zeroes channel 5: fed z, the rewrite
    gives the original's codes and output of x = z·a (any z: the model's channel 5 is 0 there),
    and the undo gives back the original on every x the model makes. An SAE on it would have to
    predict z's channel 5, which x does not carry: refused."""
    original = _random_dictionary("jumprelu", True, True, seed=3)
    scale = _affine(10, shift=False).scale.clone()
    scale[5] = 0.0
    inp = Affine(scale, torch.zeros(D, dtype=torch.float64))
    z = torch.randn(64, D, generator=_gen(4), dtype=torch.float64)
    x = z * inp.scale  # channel 5 is 0, as the model's MLP input always is there
    rewritten = to_norm_space(original, inp, None)
    with torch.no_grad():
        want_codes = _dense(original.encode(x), 48)
        assert float(want_codes.abs().sum()) > 0
        torch.testing.assert_close(_dense(rewritten.encode(z), 48), want_codes, rtol=1e-9, atol=0)
        torch.testing.assert_close(rewritten(z), original(x), rtol=1e-9, atol=1e-12)
        back = from_norm_space(rewritten, inp, None)
        assert all(bool(p.isfinite().all()) for p in back.parameters())
        torch.testing.assert_close(back(x), original(x), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(_dense(back.encode(x), 48), want_codes, rtol=1e-9, atol=0)
    sae = _random_dictionary("topk", False, False, seed=3)
    with pytest.raises(NormFoldError, match="zero scale at channel 5"):
        to_norm_space(sae, inp, inp)


def _random_dictionary(arch: str, transcoder: bool, skip: bool, seed: int) -> Dictionary:
    cfg = DictionaryConfig(architecture=arch, n_latents=48, k=4, skip=skip)
    d = build_dictionary(cfg, D, D, torch.device("cpu"), _gen(seed), transcoder=transcoder)
    d = d.double()
    with torch.no_grad():
        g = _gen(seed + 1)
        for p in d.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return d.eval()


def _dense(codes: SparseCodes | torch.Tensor, n: int) -> torch.Tensor:
    return codes.to_dense(n) if isinstance(codes, SparseCodes) else codes


def _affine(seed: int, shift: bool) -> Affine:
    g = _gen(seed)
    scale = (0.5 + torch.rand(D, generator=g, dtype=torch.float64)) * torch.where(
        torch.rand(D, generator=g) < 0.2, -1.0, 1.0
    ).double()
    offset = torch.randn(D, generator=g, dtype=torch.float64) if shift else torch.zeros(D)
    return Affine(scale, offset.double())


CASES = [
    pytest.param(arch, transcoder, skip, id=f"{arch}-{name}")
    for arch in sorted(ARCHITECTURES)
    for name, transcoder, skip in (("sae", False, False), ("transcoder", True, False),
                                   ("skip", True, True))
]  # fmt: skip


@pytest.mark.parametrize(("arch", "transcoder", "skip"), CASES)
def test_the_rewrite_keeps_every_code_and_maps_the_output(arch, transcoder, skip):
    """Fed z, the rewritten dictionary gives the original's codes of x = z·a + c, and predicts
    (y − c_out)/a_out on an mlp_in target, y itself elsewhere."""
    original = _random_dictionary(arch, transcoder, skip, seed=3)
    inp = _affine(10, shift=True)  # a LayerNorm's weight and bias
    out = None if transcoder else inp  # an SAE on mlp_in; a transcoder mlp_in → mlp_out
    z = torch.randn(64, D, generator=_gen(4), dtype=torch.float64)
    x = z * inp.scale + inp.shift
    rewritten = to_norm_space(original, inp, out)
    with torch.no_grad():
        want_codes = _dense(original.encode(x), 48)
        got_codes = _dense(rewritten.encode(z), 48)
        assert float(want_codes.abs().sum()) > 0  # some latents fire: not vacuously equal
        torch.testing.assert_close(got_codes, want_codes, rtol=1e-9, atol=1e-9)
        y = original(x)
        want = y if out is None else (y - out.shift) / out.scale
        torch.testing.assert_close(rewritten(z), want, rtol=1e-9, atol=1e-9)
        assert not torch.allclose(rewritten.W_enc, original.W_enc)  # the weights did change
        back = from_norm_space(rewritten, inp, out)
        for (name, p), q in zip(original.named_parameters(), back.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-9, msg=name)
    assert torch.equal(original.W_enc, _random_dictionary(arch, transcoder, skip, 3).W_enc)


def test_a_saved_folder_holds_the_rewritten_weights_and_loads_back(tmp_path):
    original = _random_dictionary("topk", False, False, seed=5).float()
    affine = Affine(_affine(6, shift=False).scale.float(), torch.zeros(D))
    meta = {"hook_name": "blocks.1.ln2.hook_normalized"}
    folder = save_dictionary(original, tmp_path / "f", meta, norm_affines=(affine, affine))
    raw = load_file(folder / "sae_weights.safetensors")
    torch.testing.assert_close(raw["W_enc"], original.W_enc * affine.scale[:, None])
    torch.testing.assert_close(raw["W_dec"], original.W_dec / affine.scale)
    sidecar = load_file(folder / NORM_FILE)
    assert sorted(sidecar) == ["input.scale", "input.shift", "target.scale", "target.shift"]
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["saetrain_norm_affine_folded"] == ["input", "target"]
    loaded = load_dictionary(folder)
    for (name, p), q in zip(original.named_parameters(), loaded.parameters(), strict=True):
        torch.testing.assert_close(q, p, msg=name)
    # Saved again without an affine (another site under the same name): no stale sidecar.
    save_dictionary(original, folder, {"hook_name": "blocks.1.hook_resid_post"})
    assert not (folder / NORM_FILE).exists()
    assert torch.equal(load_dictionary(folder).W_enc, original.W_enc)


def _saved(model: torch.nn.Module, tiny_model: Path, folder: Path) -> Path:
    """`model` saved into `folder` with the tiny Llama's tokenizer files."""
    model.save_pretrained(folder)
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def _mlp_norm_tensors(model_dir: Path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Layer 1's MLP norm, its output h (the model's own tensor) and z = g(x), what
    TransformerLens's ln2.hook_normalized fires on, for some random tokens."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    norm = model.model.layers[1].post_attention_layernorm
    seen = {}
    norm.register_forward_hook(lambda m, args, out: seen.update(x=args[0], h=out))
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=_gen(2))
    with torch.no_grad():
        model(ids)
    x, h = seen["x"].reshape(-1, 32), seen["h"].reshape(-1, 32)
    z = x / (x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps).sqrt()  # TL's hook
    return norm, h, z


@pytest.fixture(scope="module")
def llama_with_trained_norms(tiny_model: Path, tmp_path_factory) -> Path:
    """The tiny Llama with random MLP-norm weights: an untrained norm's affine is the identity."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    g = _gen(11)
    for layer in model.model.layers:
        w = layer.post_attention_layernorm.weight
        w.data = (0.5 + torch.rand(w.shape, generator=g)) * torch.where(
            torch.rand(w.shape, generator=g) < 0.25, -1.0, 1.0
        )
    return _saved(model, tiny_model, tmp_path_factory.mktemp("trained_norms"))


@pytest.fixture(scope="module")
def mlp_in_run(llama_with_trained_norms, corpus, tmp_path_factory):
    cfg = _config(llama_with_trained_norms, corpus, "topk", None)
    cfg = replace(cfg, site=SiteConfig(input="mlp_in.1"))
    return run(cfg, tmp_path_factory.mktemp("mlp_in_run"))


def test_a_run_on_mlp_in_exports_for_ln2_hook_normalized(llama_with_trained_norms, mlp_in_run):
    folder = mlp_in_run.dictionary_dir
    assert (folder / NORM_FILE).exists()
    meta = json.loads((folder / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.1.ln2.hook_normalized"
    card = render_model_card(folder, mlp_in_run.metrics)
    assert "norm's affine is folded in" in card and NORM_FILE in card

    # The model's own tensors: resid_mid entering the MLP norm (h = its output).
    norm, h, z = _mlp_norm_tensors(llama_with_trained_norms)

    # SAELens's TopK SAE from the raw file, on z; saetrain's loaded dictionary, on h.
    w = load_file(folder / "sae_weights.safetensors")
    pre = (z - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    top = pre.topk(4, dim=-1)
    codes = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    recon_z = codes @ w["W_dec"] + w["b_dec"]
    ours = load_dictionary(folder)
    with torch.no_grad():
        our_codes = _dense(ours.encode(h), 64)
        torch.testing.assert_close(codes, our_codes, rtol=1e-4, atol=1e-5)
        scale = norm_affine(norm, 32).scale
        torch.testing.assert_close(recon_z * scale, ours(h), rtol=1e-4, atol=1e-5)
        # Without the fold SAELens would have read z with weights made for h: other codes.
        unfolded = _dense(ours.encode(z), 64)
        assert not torch.allclose(unfolded, codes, atol=1e-3)


def test_another_tool_s_folder_at_ln2_hook_normalized_is_evaluated_on_the_norm_s_output(
    llama_with_trained_norms, corpus, mlp_in_run, tmp_path
):
    """A SAELens folder from another tool at ln2.hook_normalized reads g(x): saetrain, which
    feeds mlp_in, rewrites it with the model's norm — the run's own numbers come back."""
    from saetrain.evaluate import evaluate_path

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    src = mlp_in_run.dictionary_dir
    weights = (src / "sae_weights.safetensors").read_bytes()
    (foreign / "sae_weights.safetensors").write_bytes(weights)
    cfg = json.loads((src / "cfg.json").read_text())
    cfg["metadata"] = {k: v for k, v in cfg["metadata"].items() if not k.startswith("saetrain_")}
    (foreign / "cfg.json").write_text(json.dumps(cfg))  # TL-space weights, no sidecar
    data = ["data.path=text", f"data.data_files=[{corpus}/*.txt]", "data.holdout_percent=10"]
    evals = ["eval.n_tokens=256", "eval.batch_contexts=8", "eval.ce_contexts=8"]
    report = evaluate_path(foreign, [*data, *evals, "model.device=cpu"])
    assert report.resolved.input_site == "mlp_in.1"
    for key in ("fvu", "l0", "ce_spliced"):
        assert report.metrics[key] == pytest.approx(mlp_in_run.metrics[key], rel=1e-4), key


@pytest.fixture(scope="module")
def llama_with_a_zero_norm_channel(tiny_model: Path, tmp_path_factory) -> Path:
    """The tiny Llama with layer 1's MLP norm zeroing channel 7 (Gemma 3 270M has such norms)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    w = model.model.layers[1].post_attention_layernorm.weight
    w.data = 0.5 + torch.rand(w.shape, generator=_gen(12))
    w.data[7] = 0.0
    return _saved(model, tiny_model, tmp_path_factory.mktemp("zero_norm"))


def test_a_zero_norm_scale_folds_a_transcoder_s_input_and_names_an_sae_s_site_honestly(
    llama_with_a_zero_norm_channel, corpus, tmp_path
):
    """mlp_in.1 → mlp_out.1: the input side is folded (cfg.json says ln2.hook_normalized, and
    SAELens's arithmetic on z gives saetrain's codes of h). An SAE on mlp_in.1 cannot be: its
    cfg.json names mlp_in.1, never the hook of the tensor before the scale, and the card says
    why."""
    model_dir = llama_with_a_zero_norm_channel
    cfg = _config(model_dir, corpus, "topk", "mlp_out.1")
    sae_spec = DictionarySpec(
        name="sae", site={"input": "mlp_in.1", "target": None}, dictionary={"skip": False}
    )
    cfg = replace(cfg, dictionaries=[DictionarySpec(name="tc"), sae_spec])
    result = run(cfg, tmp_path)
    tc, sae = result.dictionaries[0].dictionary_dir, result.dictionaries[1].dictionary_dir

    meta = json.loads((tc / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.1.ln2.hook_normalized"
    assert meta["hook_name_out"] == "blocks.1.hook_mlp_out"
    assert meta["saetrain_norm_affine_folded"] == ["input"]
    assert "saetrain_hook_not_transformer_lens" not in meta

    meta = json.loads((sae / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "mlp_in.1"
    cfg_json = json.loads((sae / "cfg.json").read_text())
    assert cfg_json["hook_name"] == "mlp_in.1"  # the legacy top-level copy too
    assert "channel 7" in meta["saetrain_hook_not_transformer_lens"]["input"]
    assert not (sae / NORM_FILE).exists() and "saetrain_norm_affine_folded" not in meta
    card = render_model_card(sae, result.dictionaries[1].metrics)
    assert "`mlp_in.1`" in card and "zero scale at channel 7" in card
    assert "could not be rewritten" in card

    # The model's tensors: z at TransformerLens's hook, h the norm's output (channel 7 is 0).
    _, h, z = _mlp_norm_tensors(model_dir)
    assert not h[:, 7].any() and bool(z[:, 7].abs().gt(0).all())
    w = load_file(tc / "sae_weights.safetensors")
    pre = z @ w["W_enc"] + w["b_enc"]  # a transcoder: no b_dec on the input
    top = pre.topk(4, dim=-1)
    codes = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    out_z = codes @ w["W_dec"] + w["b_dec"] + z @ w["W_skip"].T
    ours = load_dictionary(tc)
    with torch.no_grad():
        torch.testing.assert_close(codes, _dense(ours.encode(h), 64), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out_z, ours(h), rtol=1e-4, atol=1e-5)
