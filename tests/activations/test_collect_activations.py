"""saetrain.collect_activations / gather_activations: a dataset's activations in bounded batches,
the run's own rows (its training stream, its held-out split: a run's numbers come back on them),
the activation cache reused, progress lines, an LM that stops when the caller does, and bad
requests refused before any model loads."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest
import torch

import saetrain
from saetrain.activations.source import ActivationSource
from saetrain.activations.tokens import TokenSource
from saetrain.config import (
    BufferConfig,
    Config,
    DataConfig,
    DictionaryConfig,
    EvalConfig,
    LoggerConfig,
    ModelConfig,
    SiteConfig,
    TrainerConfig,
)
from saetrain.errors import ConfigError

SITES = ["resid_post.1", "mlp_out.1"]


@pytest.fixture(scope="module")
def cfg(tiny_model: Path, corpus: Path) -> Config:
    """A seconds-long run on the tiny Llama (contexts of 16 tokens, 15 rows each after BOS)."""
    return Config(
        model=ModelConfig(name=str(tiny_model), gguf_package=None, device="cpu"),
        data=DataConfig(data_files=[str(corpus / "*.txt")], context_size=16, holdout_percent=10),
        site=SiteConfig(input="resid_post.1"),
        buffer=BufferConfig(size_tokens=1024, lm_batch_contexts=8),
        dictionary=DictionaryConfig(architecture="topk", n_latents=64, k=4),
        trainer=TrainerConfig(
            total_tokens=2048, batch_tokens=256, lr=1e-3, warmup_steps=2, init_batches=2
        ),
        eval=EvalConfig(n_tokens=256, batch_contexts=8, ce_contexts=8, compute_ce=False),
        logger=LoggerConfig(log_every=4),
    )


@pytest.fixture
def forwards(monkeypatch) -> list[int]:
    """How many LM forwards ran (one entry per batch of contexts)."""
    calls: list[int] = []
    original = ActivationSource.__call__

    def counted(self, input_ids):
        calls.append(int(input_ids.shape[0]))
        return original(self, input_ids)

    monkeypatch.setattr(ActivationSource, "__call__", counted)
    return calls


def _components(cfg: Config) -> tuple[ActivationSource, TokenSource]:
    from saetrain.activations.model import load_lm

    lm, tokenizer = load_lm(cfg.model, torch.device("cpu"))
    return ActivationSource(lm, SITES), TokenSource(cfg.data, tokenizer, cfg.seed)


def test_training_rows_come_in_bounded_batches_in_the_stream_s_order(cfg, caplog):
    with caplog.at_level(logging.INFO, logger="saetrain"):
        batches = list(saetrain.collect_activations(SITES, 300, cfg, batch_rows=64))
    assert [b["resid_post.1"].shape for b in batches] == [(64, 32)] * 4 + [(44, 32)]
    assert all(set(b) == set(SITES) and b["mlp_out.1"].shape[1] == 32 for b in batches)
    # The training stream's rows in order: the LM on the training contexts, BOS left out.
    source, tokens = _components(cfg)
    rows = source.rows(itertools.islice(tokens.training(8), 3), SITES, torch.float32)
    want = torch.cat(list(rows))[:300]  # 3 LM batches of 8 contexts × 15 rows
    for i, site in enumerate(SITES):
        got = torch.cat([b[site] for b in batches])
        torch.testing.assert_close(got, want[:, 32 * i : 32 * (i + 1)], rtol=0, atol=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "saetrain.progress"]
    assert any(line.startswith("activations (train): done, 300 rows in") for line in lines)


def test_held_out_rows_give_the_run_s_numbers(cfg, tmp_path):
    """The run's FVU, recomputed on gather_activations(split="held_out") with its dictionary."""
    result = saetrain.train(cfg, tmp_path / "run", verbose=False)
    n = int(result.metrics["tokens"])
    rows = saetrain.gather_activations("resid_post.1", n, cfg, split="held_out", batch_rows=100)
    x = rows["resid_post.1"]
    assert x.shape == (n, 32)
    with torch.no_grad():
        err = (result.dictionary(x).double() - x.double()).pow(2).sum()
    fvu = float(err / (x.double() - x.double().mean(0)).pow(2).sum())
    assert fvu == pytest.approx(result.metrics["fvu"], rel=1e-4)
    # Not the training rows: those differ.
    train = saetrain.gather_activations("resid_post.1", n, cfg, batch_rows=100)["resid_post.1"]
    assert not torch.equal(train, x)


def test_stopping_early_stops_the_lm(cfg, forwards):
    """A billion rows asked for, one batch taken: one LM batch ran (8 contexts, 120 rows)."""
    batches = saetrain.collect_activations(SITES, 10**9, cfg, batch_rows=100)
    assert forwards == []  # nothing runs before the first batch is asked for
    first = next(batches)
    assert first["resid_post.1"].shape == (100, 32)
    batches.close()
    assert forwards == [8]


def test_the_activation_cache_is_written_then_read_instead_of_the_lm(cfg, tmp_path, forwards):
    first = saetrain.gather_activations(SITES, 300, cfg, batch_rows=128, cache_dir=tmp_path)
    assert len(forwards) == 3  # 3 LM batches of 120 rows
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (folder / "manifest.json").is_file()
    again = saetrain.gather_activations(SITES, 300, cfg, batch_rows=128, cache_dir=tmp_path)
    assert len(forwards) == 3  # no LM this time
    for site in SITES:
        assert torch.equal(again[site], first[site])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"split": "test"}, "split='test'; choose one of: train, held_out"),
        ({"n_tokens": 0}, "n_tokens=0 must be a positive integer"),
        ({"batch_rows": -1}, "batch_rows=-1 must be a positive integer"),
        ({"sites": []}, "sites: name at least one site"),
        ({"sites": ["resid_post"]}, "resid_post"),
    ],
)
def test_bad_requests_are_refused_before_the_model_loads(kwargs, fragment):
    args = {"sites": ["resid_post.1"], "n_tokens": 10, **kwargs}
    no_model = ModelConfig(name="/no/such/model", gguf_package=None, device="cpu")
    with pytest.raises((ConfigError, ValueError), match=fragment.replace("(", r"\(")) as err:
        saetrain.collect_activations(
            args.pop("sites"), args.pop("n_tokens"), model=no_model, **args
        )
    assert "no/such/model" not in str(err.value)


def test_the_real_model_s_held_out_rows_are_the_evaluator_s():
    """SmolLM2-135M on the default job's data (half of it held out): 256 held-out rows at two
    sites, in two batches, equal to the rows the run's evaluation reads."""
    sites = ["resid_post.3", "mlp_out.3"]
    overrides = ["model.device=cpu", "buffer.lm_batch_contexts=2", "data.holdout_percent=50"]
    cfg = saetrain.config_from_overrides(overrides)  # half the documents: found sooner
    batches = list(saetrain.collect_activations(sites, 256, cfg, split="held_out", batch_rows=128))
    assert [b["resid_post.3"].shape for b in batches] == [(128, 576)] * 2
    from saetrain.api import _lm

    lm, tokenizer = _lm(cfg.model)
    source = ActivationSource(lm, sites)
    held_out = TokenSource(cfg.data, tokenizer, cfg.seed).held_out(3, 2)
    want = torch.cat(list(source.rows(iter(held_out), sites, torch.float32)))[:256]
    got = torch.cat([torch.cat([b[s] for s in sites], dim=-1) for b in batches])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert bool(got.isfinite().all()) and float(got.abs().max()) > 0
