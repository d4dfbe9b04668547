"""Latent-health metrics are named for what they count (issue 14): `never_fired_fraction` over
`never_fired_tokens` held-out tokens, and the training window's `dead_fraction` over
`dead_window_tokens` training tokens; no held-out number is called dead."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from saetrain.config import TrainerConfig
from saetrain.dictionaries import TopKSAE
from saetrain.dictionaries.base import SparseCodes, fired_latents
from saetrain.evaluate import training_window_metrics
from saetrain.evaluation.density import density_summary
from saetrain.evaluation.metrics import (
    ReconstructionStats,
    reconstruction_metrics,
    training_dead_metrics,
)
from saetrain.export.model_card import METRIC_DOCS, render_model_card
from saetrain.run import print_summary, run
from saetrain.training.trainer import Trainer
from tests.helpers.runs import _config

HELD_OUT = ("never_fired_fraction", "never_fired_tokens")
TRAINING_WINDOW = ("dead_fraction", "dead_window_tokens")


# --- the definitions, on numbers worked out by hand ---------------------------------------------


def test_three_of_ten_latents_firing_is_seven_tenths_never_fired():
    g = torch.Generator().manual_seed(0)
    rows = 12
    x = torch.randn(rows, 4, generator=g)
    # Every row uses two of latents {1, 4, 8}; the padded slot (value 0) on latent 9 is no firing.
    indices = torch.tensor([[1, 4, 9], [4, 8, 9], [8, 1, 9]]).repeat(rows // 3, 1)
    values = torch.tensor([[0.5, 1.0, 0.0], [2.0, 0.1, 0.0], [0.3, 0.7, 0.0]]).repeat(rows // 3, 1)
    stats = ReconstructionStats(10, 4)
    stats.update(x, x, SparseCodes(indices, values))
    m = stats.compute()
    assert m["never_fired_fraction"] == pytest.approx(0.7, abs=1e-15)
    assert m["never_fired_tokens"] == rows == m["tokens"]
    assert "dead_fraction" not in m

    # Dense codes give the same count; a second batch adds its rows to the token count.
    dense = torch.zeros(5, 10)
    dense[:, [0, 2, 5]] = 1.0
    stats.update(x[:5], x[:5], dense)
    m = stats.compute()
    assert m["never_fired_fraction"] == pytest.approx(0.4, abs=1e-15)  # 1,4,8,0,2,5 fired
    assert m["never_fired_tokens"] == rows + 5


def test_never_fired_count_matches_the_fraction():
    freqs = torch.tensor([0.0, 0.25, 0.0, 0.5, 0.0, 0.05, 0.01, 0.0, 0.2, 0.3])
    s = density_summary(freqs)
    assert s["never_fired_count"] == 4 and "dead_count" not in s


def test_a_batchs_metrics_never_say_dead():
    """What the trainer's log rows could pick up from one batch is named never_fired_*."""
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    codes = SparseCodes(torch.tensor([[0], [1], [0], [1], [0], [1]]), torch.ones(6, 1))
    m = reconstruction_metrics(x, x, codes, 8)
    assert m["never_fired_fraction"] == 6 / 8 and m["never_fired_tokens"] == 6
    assert not any(k.startswith("dead") for k in m)


def test_training_window_by_hand():
    since = torch.tensor([0, 100, 499, 500, 1000, 1000])
    # A run longer than the window: dead = no firing in the last 500 tokens (500 and both 1000s).
    assert training_dead_metrics(since, 500, 4000) == {
        "dead_fraction": 3 / 6,
        "dead_window_tokens": 500.0,
    }
    # A run of 1000 tokens with a window of 5000: the window is the run; only the latents that
    # never fired in training (1000 tokens since their last firing = all of them) count as dead.
    assert training_dead_metrics(since, 5000, 1000) == {
        "dead_fraction": 2 / 6,
        "dead_window_tokens": 1000.0,
    }
    with pytest.raises(ValueError, match="no tokens were trained"):
        training_dead_metrics(since, 500, 0)


def _trainer_with_silent_latents(dead_after: int) -> tuple[Trainer, list[int], set[int]]:
    """A TopK SAE whose latents 3 and 11 can never fire, trained 6 steps of 32 tokens; the
    latents that fired at least once, recorded step by step."""
    g = torch.Generator().manual_seed(4)
    sae = TopKSAE(8, 16, k=2, generator=g)
    silent = [3, 11]
    with torch.no_grad():
        sae.W_enc[:, silent] = 0.0
        sae.b_enc[silent] = -1e4  # never among the top k
    cfg = TrainerConfig(batch_tokens=32, lr=1e-3, warmup_steps=1, dead_after_tokens=dead_after)
    trainer = Trainer(sae, cfg, 1.0, 6)
    fired: set[int] = set()
    for _ in range(6):
        _, out = trainer.step(torch.randn(32, 8, generator=g))
        fired |= set(fired_latents(out.codes, 16).nonzero().flatten().tolist())
    return trainer, silent, fired


def test_a_window_as_long_as_the_run_is_the_trainers_dead_mask():
    trainer, silent, _ = _trainer_with_silent_latents(dead_after=64)  # 192 tokens trained
    m = training_dead_metrics(trainer.tokens_since_fired, 64, trainer.state.tokens)
    assert m["dead_window_tokens"] == 64
    assert m["dead_fraction"] == float(trainer.dead_mask().double().mean()) >= 2 / 16
    assert trainer.dead_mask()[silent].all()


def test_a_run_shorter_than_the_window_counts_latents_that_never_fired_in_training():
    trainer, silent, fired = _trainer_with_silent_latents(dead_after=10**6)
    assert not trainer.dead_mask().any()  # by the window alone nothing can be dead yet
    m = training_dead_metrics(trainer.tokens_since_fired, 10**6, trainer.state.tokens)
    assert m["dead_window_tokens"] == trainer.state.tokens == 192
    assert not set(silent) & fired
    assert m["dead_fraction"] == (16 - len(fired)) / 16 >= 2 / 16


def test_the_evaluate_cli_carries_only_a_recorded_training_window(tmp_path: Path):
    new = tmp_path / "new"
    new.mkdir()
    final = {"never_fired_fraction": 0.1, "dead_fraction": 0.05, "dead_window_tokens": 50000}
    (new / "saetrain_run.json").write_text(json.dumps({"final_metrics": final}))
    assert training_window_metrics(new) == {"dead_fraction": 0.05, "dead_window_tokens": 50000.0}
    # A folder saved before the rename: its dead_fraction was the held-out share, not carried.
    old = tmp_path / "old"
    old.mkdir()
    (old / "saetrain_run.json").write_text(json.dumps({"final_metrics": {"dead_fraction": 0.1}}))
    assert training_window_metrics(old) == {}
    assert training_window_metrics(tmp_path) == {}  # no run record at all


def test_the_model_card_explains_every_latent_health_key():
    for key in (*HELD_OUT, *TRAINING_WINDOW, "never_fired_count"):
        assert METRIC_DOCS[key], key
    assert "training" in METRIC_DOCS["dead_fraction"]
    assert "held-out" in METRIC_DOCS["never_fired_tokens"]


# --- a real run: metrics.jsonl, the final metrics, saetrain_run.json, the model card -----------


@pytest.fixture(scope="module")
def short_window(tiny_model, corpus, tmp_path_factory):
    """2048 tokens trained with a 512-token dead window (shorter than the run)."""
    cfg = _config(tiny_model, corpus, "topk", None)
    cfg = replace(cfg, trainer=replace(cfg.trainer, dead_after_tokens=512))
    return run(cfg, tmp_path_factory.mktemp("short_window"))


@pytest.fixture(scope="module")
def long_window(tiny_model, corpus, tmp_path_factory):
    """2048 tokens trained with the default 50,000-token dead window (longer than the run)."""
    cfg = _config(tiny_model, corpus, "topk", None)
    assert cfg.trainer.dead_after_tokens > 2048
    return run(cfg, tmp_path_factory.mktemp("long_window"))


def _jsonl(folder: Path) -> tuple[list[dict], dict]:
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return lines[:-1], lines[-1]["final"]


def _check_final(m: dict, folder: Path) -> None:
    for key in (*HELD_OUT, *TRAINING_WINDOW, "never_fired_count"):
        assert key in m, key
    assert "train_dead_fraction" not in m and "dead_count" not in m
    assert 0.0 <= m["never_fired_fraction"] <= 1.0 and 0.0 <= m["dead_fraction"] <= 1.0
    # Held-out: 16 contexts of 16 tokens (eval.n_tokens=256), BOS and other special tokens
    # excluded from every metric; the count is whole rows, the same as the reconstruction metrics'.
    assert m["never_fired_tokens"] == m["tokens"] == int(m["tokens"])
    assert 200 < m["never_fired_tokens"] <= 16 * 15
    assert m["never_fired_count"] == round(64 * m["never_fired_fraction"])
    _, final = _jsonl(folder)
    assert final == pytest.approx(m)  # the jsonl's final line holds the same keys and values
    run_info = json.loads((folder / "saetrain_run.json").read_text())
    assert run_info["final_metrics"] == m


def test_a_run_longer_than_its_window(short_window):
    m, folder = short_window.metrics, short_window.dictionary_dir
    _check_final(m, folder)
    assert m["dead_window_tokens"] == 512
    rows, _ = _jsonl(folder)
    assert [r["step"] for r in rows] == [4, 8]
    for row in rows:  # per step: the training window, never a batch's never-fired share
        assert "dead_fraction" in row and not set(HELD_OUT) & set(row)
    # The last step's row and the final metrics are the same training-window measurement.
    assert rows[-1]["dead_fraction"] == m["dead_fraction"]


def test_a_run_shorter_than_its_window(long_window):
    m, folder = long_window.metrics, long_window.dictionary_dir
    _check_final(m, folder)
    run_info = json.loads((folder / "saetrain_run.json").read_text())
    assert m["dead_window_tokens"] == run_info["tokens_seen"] == 2048  # the whole run
    rows, _ = _jsonl(folder)
    # Before dead_after_tokens have passed no latent is dead to the trainer (AuxK's view).
    assert [r["dead_fraction"] for r in rows] == [0.0, 0.0]


def test_the_model_card_of_a_run(short_window):
    m, folder = short_window.metrics, short_window.dictionary_dir
    card = render_model_card(folder, m)
    for key in (*HELD_OUT, *TRAINING_WINDOW):
        assert f"| {key} | " in card and METRIC_DOCS[key] in card, key
    assert "| dead_window_tokens | 512 |" in card
    assert f"| never_fired_tokens | {m['never_fired_tokens']:.0f} |" in card  # < 1,000 here
    big = render_model_card(folder, m | {"never_fired_tokens": 16384.0, "dead_window_tokens": 5e4})
    assert "| never_fired_tokens | 16,384 |" in big and "| dead_window_tokens | 50,000 |" in big
    assert "train_dead_fraction" not in card and "dead_count" not in card


def test_the_summary_names_the_held_out_and_the_training_numbers(short_window, tmp_path, capsys):
    print_summary(short_window.metrics, tmp_path)
    out = capsys.readouterr().out
    held_out, training = out.split("training: ")
    tokens = short_window.metrics["never_fired_tokens"]
    assert "never_fired_fraction" in held_out and f"never_fired_tokens   {tokens:.0f}\n" in held_out
    assert "dead_fraction" not in held_out
    assert training.startswith(
        f"dead_fraction {short_window.metrics['dead_fraction']:.4f} (no firing in the last 512 "
        "training tokens)"
    )
