"""The streaming collector against a brute-force pass over every activation of a small corpus."""

from __future__ import annotations

import pytest
import torch

from saetrain.activations.model import load_lm
from saetrain.activations.source import ActivationSource
from saetrain.activations.tokens import TokenSource
from saetrain.config import DataConfig, ModelConfig
from saetrain.dictionaries.topk import TopKSAE
from saetrain.inspect.collect import LOG_BINS, CollectSettings, LatentCollector, dense_codes
from saetrain.inspect.units import collect_all, unit_from_dictionary

SITE = "resid_post.1"
SETTINGS = CollectSettings(top_k=5, before=3, after=2, quantile_bands=2, per_band=3)


@pytest.fixture(scope="module")
def setup(tiny_model, corpus):
    lm, tokenizer = load_lm(ModelConfig(name=str(tiny_model), gguf_package=None, device="cpu"),
                            torch.device("cpu"))  # fmt: skip
    data = DataConfig(data_files=[str(corpus / "*.txt")], context_size=16, holdout_percent=30)
    batches = TokenSource(data, tokenizer, seed=0).held_out(24, batch_size=5)  # uneven last batch
    torch.manual_seed(1)
    sae = TopKSAE(32, 48, k=4).requires_grad_(False)
    sae.b_enc.normal_(0, 0.3)
    source = ActivationSource(lm, [SITE])
    return source, sae, batches


def _all_codes(source, sae, batches):
    """Brute force: every position's codes, [contexts · T, n], special positions zeroed."""
    rows = []
    for batch in batches:
        x = source(batch.input_ids)[SITE]
        b, t, d = x.shape
        codes = dense_codes(sae.encode(x.reshape(b * t, d)), sae.n_latents).reshape(b, t, -1)
        rows.append((codes * batch.mask[:, :, None]).reshape(b * t, -1))
    return torch.cat(rows), torch.cat([b.input_ids for b in batches]).reshape(-1)


def test_top_contexts_match_brute_force(setup, one_thread):
    source, sae, batches = setup
    unit = unit_from_dictionary("d", sae, SITE, SITE)
    stats = collect_all(source, [unit], batches, SETTINGS)["d"]
    codes, ids = _all_codes(source, sae, batches)
    t = batches[0].input_ids.shape[1]
    assert stats.tokens == int(sum(b.mask.sum() for b in batches))
    assert torch.equal(stats.counts, (codes != 0).sum(0))
    some_rare = False
    for j in range(sae.n_latents):
        col = codes[:, j]
        firing = (col > 0).nonzero().squeeze(1)
        # Largest first; ties by the lower row (a stable sort of rows in order).
        order = firing[torch.argsort(col[firing], descending=True, stable=True)][: SETTINGS.top_k]
        n = order.numel()
        some_rare |= n < SETTINGS.top_k
        assert stats.top_rows[j, :n].tolist() == order.tolist(), j
        assert torch.equal(stats.top_values[j, :n], col[order]), j
        assert (stats.top_rows[j, n:] == -1).all()
        for slot, row in enumerate(order.tolist()):
            ctx, pos = divmod(row, t)
            for w, off in enumerate(range(-SETTINGS.before, SETTINGS.after + 1)):
                p = pos + off
                inside = 0 <= p < t
                want_act = float(codes[ctx * t + p, j]) if inside else 0.0
                want_tok = int(ids[ctx * t + p]) if inside else -1
                assert float(stats.top_acts[j, slot, w]) == want_act
                assert int(stats.top_tokens[j, slot, w]) == want_tok
        # The quantile sample: distinct firing rows, values that are the codes there.
        rows = stats.sample_rows[j][stats.sample_rows[j] >= 0]
        assert rows.numel() == min(firing.numel(), SETTINGS.sample_size)
        assert len(set(rows.tolist())) == rows.numel()
        assert torch.equal(stats.sample_values[j, : rows.numel()], col[rows])
        assert bool((col[rows] > 0).all())
        assert int(stats.log_histogram[j].sum()) == firing.numel()
    assert some_rare  # the corpus is small enough that some latent fires fewer than K times


def test_one_batch_equals_many(setup):
    """Merging across batches loses nothing: one big batch gives the same top rows."""
    source, sae, batches = setup
    t = batches[0].input_ids.shape[1]
    one, many = LatentCollector(48, t, SETTINGS), LatentCollector(48, t, SETTINGS)
    all_codes, all_ids, all_masks = [], [], []
    for batch in batches:
        x = source(batch.input_ids)[SITE]
        b = x.shape[0]
        codes = dense_codes(sae.encode(x.reshape(b * t, -1)), 48).reshape(b, t, -1)
        many.update(codes, batch.input_ids, batch.mask)
        all_codes.append(codes)
        all_ids.append(batch.input_ids)
        all_masks.append(batch.mask)
    one.update(torch.cat(all_codes), torch.cat(all_ids), torch.cat(all_masks))
    a, b = one.result(), many.result()
    assert torch.equal(a.top_rows, b.top_rows)
    assert torch.equal(a.top_acts, b.top_acts)
    assert torch.equal(a.log_histogram, b.log_histogram)


def test_quantiles_and_histograms_from_the_log_grid():
    collector = LatentCollector(2, 4, CollectSettings(top_k=2, before=1, after=1))
    codes = torch.zeros(1, 4, 2)
    codes[0, :, 0] = torch.tensor([0.5, 1.0, 2.0, 4.0])
    collector.update(codes, torch.arange(4)[None], torch.ones(1, 4, dtype=torch.bool))
    stats = collector.result()
    assert stats.log_histogram.shape == (2, LOG_BINS)
    assert float(stats.act_min[0]) == 0.5 and float(stats.act_max[0]) == 4.0
    q = stats.quantile_values(torch.tensor([0.25, 0.5, 1.0]))
    assert q[0].tolist() == pytest.approx([0.5, 1.0, 4.0], rel=0.06)
    assert q[1].tolist() == [0.0, 0.0, 0.0]  # never fired
    hist, lo, hi = stats.linear_histogram(0, 7)
    assert sum(hist) == 4 and (lo, hi) == (0.5, 4.0)
    assert hist == [1, 1, 0, 1, 0, 0, 1]  # bins of width 0.5 from 0.5: 0.5, 1.0, 2.0, 4.0
    assert stats.mean_activation[0] == pytest.approx(7.5 / 4)
    assert stats.frequencies.tolist() == [1.0, 0.0]
