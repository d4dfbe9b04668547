"""Model diffing: a crosscoder over the same site of two tiny Llamas that share a tokenizer
(model_b), read on the same tokens. Its per-model FVU and CE are checked against an independent
computation with plain forward hooks; a second model with another tokenizer, or model_b with a
dictionary that is not a crosscoder, is refused before training."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

import saetrain
from saetrain.activations.model import load_lm
from saetrain.activations.tokens import TokenSource
from saetrain.errors import ConfigError
from saetrain.evaluate import evaluate_path
from saetrain.evaluation.evaluate import first_contexts
from saetrain.export.saelens import load_dictionary
from saetrain.run import run
from tests.helpers.cross_layer import _layer_output, _nll_sum, _with_layer_output, capture, tiny_lm
from tests.helpers.runs import _tiny_overrides

SITE = "resid_post.1"


@pytest.fixture(scope="module")
def model_b(tiny_model, tmp_path_factory) -> Path:
    """The tiny Llama with layer 1's weights perturbed: a 'fine-tuned' model, same tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_llama_b")
    shutil.copytree(tiny_model, folder, dirs_exist_ok=True)
    model = tiny_lm(tiny_model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.model.layers[1].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    return folder


def _cfg(tiny_model: Path, corpus: Path, model_b: Path, extra: list[str] = ()):
    return saetrain.config_from_overrides(
        _tiny_overrides(tiny_model, corpus)
        + [
            f"site.input={SITE}",
            "dictionary.kind=crosscoder",
            "dictionary.k=4",
            f"model_b.name={model_b}",
            *extra,
        ]  # fmt: skip
    )


@pytest.fixture(scope="module")
def diff_run(tiny_model, corpus, model_b, tmp_path_factory):
    cfg = _cfg(tiny_model, corpus, model_b)
    return cfg, run(cfg, tmp_path_factory.mktemp("diff"))


def _held_out(cfg):
    _, tokenizer = load_lm(cfg.model, torch.device("cpu"))
    n = max(math.ceil(cfg.eval.n_tokens / cfg.data.context_size), cfg.eval.ce_contexts)
    batches = TokenSource(cfg.data, tokenizer, cfg.seed).held_out(n, cfg.eval.batch_contexts)
    return batches, first_contexts(batches, cfg.eval.ce_contexts)


def _fvu(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    y, y_hat = y.double(), y_hat.double()
    return float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def test_two_model_crosscoder_reads_both_models_and_reports_each(diff_run):
    cfg, result = diff_run
    m = result.metrics
    for key in ("fvu", f"fvu.{SITE}", f"fvu.{SITE}@b", "ce_spliced", "ce_spliced@b",
                f"decoder_share.{SITE}", f"decoder_share.{SITE}@b"):  # fmt: skip
        assert key in m, key
    assert m[f"decoder_share.{SITE}"] + m[f"decoder_share.{SITE}@b"] == pytest.approx(1.0)
    cc = load_dictionary(result.dictionary_dir)
    assert cc.kind == "crosscoder" and cc.source_widths == (32, 32)
    import json

    meta = json.loads((result.dictionary_dir / "cfg.json").read_text())["metadata"]
    assert meta["saetrain_sites"] == [SITE, f"{SITE}@b"]
    assert (result.dictionary_dir / "decoder_norm_shares.png").stat().st_size > 1000


def test_two_model_metrics_equal_an_independent_computation(diff_run, tiny_model, model_b):
    cfg, result = diff_run
    cc = load_dictionary(result.dictionary_dir)
    a, b = tiny_lm(tiny_model), tiny_lm(model_b)
    batches, ce_batches = _held_out(cfg)
    ys, y_hats = [], []
    for batch in batches:
        acts = [capture(model, batch.input_ids)[SITE][batch.mask] for model in (a, b)]
        x = torch.cat(acts, dim=-1)
        ys.append(x)
        with torch.no_grad():
            y_hats.append(cc(x))
    y, y_hat = torch.cat(ys), torch.cat(y_hats)
    assert result.metrics[f"fvu.{SITE}"] == pytest.approx(_fvu(y[:, :32], y_hat[:, :32]), rel=1e-4)
    assert result.metrics[f"fvu.{SITE}@b"] == pytest.approx(
        _fvu(y[:, 32:], y_hat[:, 32:]), rel=1e-4
    )
    # CE in each model with its own source replaced by the crosscoder's reconstruction from both
    # models' clean activations (special positions keep theirs)
    sums = {"a": [0.0, 0.0], "b": [0.0, 0.0]}  # clean, spliced
    count = 0
    for batch in ce_batches:
        ids, keep = batch.input_ids, batch.mask[..., None]
        valid = (batch.mask[:, :-1] & batch.mask[:, 1:]).reshape(-1)
        clean = torch.cat([capture(model, ids)[SITE] for model in (a, b)], dim=-1)
        with torch.no_grad():
            rec = cc(clean)
        for j, (name, model) in enumerate((("a", a), ("b", b))):
            block = rec[..., j * 32 : (j + 1) * 32]

            def hooks(model=model, block=block, keep=keep):
                return [model.model.layers[1].register_forward_hook(
                    lambda _m, _a, out: _with_layer_output(
                        out, torch.where(keep, block, _layer_output(out))))]  # fmt: skip

            sums[name][0] += _nll_sum(model, ids, valid, lambda: [])[0]
            sums[name][1] += _nll_sum(model, ids, valid, hooks)[0]
        count += int(valid.sum())
    m = result.metrics
    assert m["ce_clean"] == pytest.approx(sums["a"][0] / count, rel=1e-5)
    assert m["ce_spliced"] == pytest.approx(sums["a"][1] / count, rel=1e-5)
    assert m["ce_clean@b"] == pytest.approx(sums["b"][0] / count, rel=1e-5)
    assert m["ce_spliced@b"] == pytest.approx(sums["b"][1] / count, rel=1e-5)
    assert m["ce_clean"] != pytest.approx(m["ce_clean@b"])  # the two models do differ


def test_evaluate_cli_reproduces_a_two_model_crosscoder(diff_run):
    _, result = diff_run
    report = evaluate_path(result.dictionary_dir, ["eval.compute_ce=false"])
    for key in ("fvu", f"fvu.{SITE}", f"fvu.{SITE}@b", f"decoder_share.{SITE}@b"):
        assert report.metrics[key] == pytest.approx(result.metrics[key], rel=1e-6), key


def test_model_b_needs_a_crosscoder(tiny_model, corpus, model_b):
    with pytest.raises(ConfigError, match="model_b is read by crosscoders only"):
        saetrain.config_from_overrides(
            _tiny_overrides(tiny_model, corpus) + [f"model_b.name={model_b}"]
        )


def test_model_b_with_another_tokenizer_is_refused(tiny_model, corpus, tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2} | {f"v{i}": i + 3 for i in range(120)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(other)
    cfg = _cfg(tiny_model, corpus, other)
    with pytest.raises(ConfigError, match="another tokenizer"):
        run(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "finished.json").exists()
