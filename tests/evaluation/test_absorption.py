"""Feature absorption (evaluation/usefulness/absorption.py): known answers on synthetic activations.

Each word w of letter l has activation e_l + t_w: a letter direction and a direction of its own
(orthonormal basis vectors), so the dense probe direction is e_l. The dictionaries are ReLU SAEs
whose weights are set by hand, so what they absorb is known exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from saetrain.config import AbsorptionConfig  # noqa: E402
from saetrain.dictionaries.relu import ReLUSAE  # noqa: E402
from saetrain.evaluation.usefulness.absorption import (  # noqa: E402
    absorption,
    split_features,
    word_absorption,
)
from saetrain.evaluation.usefulness.first_letter import FirstLetterData  # noqa: E402

WORDS_PER_LETTER = 10
N_WORDS = 26 * WORDS_PER_LETTER
D = 26 + N_WORDS
CFG = AbsorptionConfig(max_k=4)


def _letter(w: int) -> int:
    return w % 26


def _test_word(w: int) -> bool:
    return w // 26 >= 7  # 7 of each letter's 10 words train, 3 test


def _absorbed(w: int) -> bool:
    return (w // 26) % 2 == 1  # every other word of each letter


def _data(shuffle: bool = False) -> FirstLetterData:
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(N_WORDS, D, dtype=torch.float64)
    for w in range(N_WORDS):
        x[w, _letter(w)] = 1.0
        x[w, 26 + w] = 1.0
    x += 1e-3 * torch.randn(N_WORDS, D, generator=gen, dtype=torch.float64)
    y = torch.tensor([_letter(w) for w in range(N_WORDS)])
    test = torch.tensor([_test_word(w) for w in range(N_WORDS)])
    train_y = y[~test]
    if shuffle:
        train_y = train_y[torch.randperm(len(train_y), generator=gen)]
    return FirstLetterData(
        train_x=x[~test].float(), train_y=train_y, test_x=x[test].float(), test_y=y[test],
        test_words=[f"w{w}" for w in range(N_WORDS) if _test_word(w)], position=-6,
    )  # fmt: skip


def _sae(absorbing: bool) -> ReLUSAE:
    """26 letter latents (e_l, firing 0.5 on the letter's words); with `absorbing`, one latent
    per absorbed word too (reads t_w, writes (e_l + t_w)/√2), and letter l's latent reads
    e_l − Σ t_w over its absorbed words, so it is silent exactly there."""
    absorbed = [w for w in range(N_WORDS) if absorbing and _absorbed(w)]
    sae = ReLUSAE(D, 26 + len(absorbed))
    with torch.no_grad():
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            p.zero_()
        for letter in range(26):
            sae.W_enc[letter, letter] = 1.0
            sae.W_dec[letter, letter] = 1.0
            sae.b_enc[letter] = -0.5
        for j, w in enumerate(absorbed):
            latent = 26 + j
            sae.W_enc[_letter(w), _letter(w)] = 1.0
            sae.W_enc[26 + w, _letter(w)] = -1.0
            sae.W_enc[26 + w, latent] = 1.0
            sae.b_enc[latent] = -0.05
            sae.W_dec[latent, _letter(w)] = 2**-0.5
            sae.W_dec[latent, 26 + w] = 2**-0.5
    return sae.eval()


def test_one_latent_per_letter_has_no_absorption_and_k1_matches_the_dense_probe():
    outcome = absorption(_data(), _sae(absorbing=False), CFG)
    assert outcome.refused is None
    assert len(outcome.counted) == 26
    for i, r in enumerate(outcome.letters):
        assert r.probe_f1 == 1.0
        assert r.split_features == [i]  # the letter's own latent, alone
        assert r.k_sparse_f1[0] == r.probe_f1  # k = 1 matches the dense probe
        assert r.num_probe_true_positives == 3
        assert r.absorption_fraction_sum == 0.0
        assert r.num_full_absorption == 0


def test_token_specific_latents_show_the_absorption_the_construction_implies():
    outcome = absorption(_data(), _sae(absorbing=True), CFG)
    assert outcome.refused is None
    for i, r in enumerate(outcome.letters):
        test_words = [w for w in range(N_WORDS) if _test_word(w) and _letter(w) == i]
        expected = sum(_absorbed(w) for w in test_words) / len(test_words)
        assert r.split_features == [i]
        assert r.num_probe_true_positives == len(test_words)
        assert r.mean_absorption_fraction == pytest.approx(expected, abs=1e-12)
        assert r.full_absorption_rate == pytest.approx(expected, abs=1e-12)
    # Test words are the 8th-10th of each letter: 2 of 3 (the 8th and 10th) absorbed.
    fractions = [r.mean_absorption_fraction for r in outcome.counted]
    assert np.mean(fractions) == pytest.approx(2 / 3, abs=1e-12)


def test_shuffled_labels_give_chance_accuracy_and_no_absorption_number():
    outcome = absorption(_data(shuffle=True), _sae(absorbing=False), CFG)
    f1 = [r.probe_f1 for r in outcome.letters]
    # Chance for a balanced probe on a 1-in-26 class: F1 ≈ 2·(1/26)·0.5 / (1/26 + 0.5) ≈ 0.07.
    assert np.mean(f1) < 0.2
    assert outcome.refused is not None and "too weak" in outcome.refused
    assert outcome.counted == []


def test_word_absorption_thresholds_as_saebench_0_6_0():
    cos = np.array([1.0, 0.5, 0.05, 0.5])
    active = np.array([0, 1, 2])
    # Main latent 0 carries all of x·p̂ = 1: nothing absorbed.
    assert word_absorption(active, np.array([1.0, 0.0, 0.0]), cos, 1.0, [0]) == (0.0, False)
    # Main silent, latent 1 carries 0.5 of 1.0 (≥ 40 %): fully absorbed.
    assert word_absorption(np.array([1]), np.array([1.0]), cos, 1.0, [0]) == (1.0, True)
    # Main carries 0.3, latent 1 0.5 (a = min(0.5, 0.7) = 0.5): 0.5 / 0.8; main active: not full.
    f, full = word_absorption(np.array([0, 1]), np.array([0.3, 1.0]), cos, 1.0, [0])
    assert f == pytest.approx(0.5 / 0.8) and not full
    # Latent 2's cosine 0.05 < 0.1 does not count towards the fraction.
    assert word_absorption(np.array([2]), np.array([10.0]), cos, 1.0, [0])[0] == 0.0
    # Absorbers below 40 % of x·p̂: 0.
    assert word_absorption(np.array([1]), np.array([0.7]), cos, 1.0, [0]) == (0.0, False)


def test_split_features_grow_while_f1_jumps_by_the_threshold():
    latents = np.array([5, 7, 9, 11])
    assert split_features(latents, [0.5, 0.6, 0.62, 0.9], 0.03) == [5, 7]
    assert split_features(latents, [0.5, 0.52, 0.9, 0.9], 0.03) == [5]
    assert split_features(latents, [0.1, 0.2, 0.3, 0.4], 0.03) == [5, 7, 9, 11]


def test_latent_directions_are_what_the_latent_reads_for_a_transcoder():
    sae = ReLUSAE(6, 4)
    assert torch.equal(sae.input_directions(), sae.W_dec)
    transcoder = ReLUSAE(6, 4, d_out=5)
    assert transcoder.input_directions().shape == (4, 6)
    assert torch.equal(transcoder.input_directions(), transcoder.W_enc.T)


def test_a_clts_latent_directions_give_its_pre_activations():
    from saetrain.dictionaries.clt import CLT_CLASSES

    clt = CLT_CLASSES["relu"](6, 8, 6, n_layers=2)
    with torch.no_grad():
        clt.b_enc.normal_()
    x = torch.randn(5, clt.d_in)
    directions = clt.input_directions()
    assert directions.shape == (clt.n_latents, clt.d_in)
    with torch.no_grad():
        assert torch.allclose(clt.pre_activations(x), x @ directions.T + clt.b_enc, atol=1e-6)


def test_decoder_norms_are_folded_into_the_codes_as_saebench_does():
    """The absorbing latents' codes ÷ 4 with their decoder rows × 4 is the same dictionary (same
    reconstruction): the same absorption, as SAEBench gets after fold_W_dec_norm (unfolded, their
    projections would fall under the 40 % threshold and the absorption would vanish)."""
    data, sae = _data(), _sae(absorbing=True)
    rescaled = _sae(absorbing=True)
    with torch.no_grad():
        rescaled.W_enc[:, 26:] /= 4
        rescaled.b_enc[26:] /= 4
        rescaled.W_dec[26:] *= 4
    x = data.test_x[:5]
    assert torch.allclose(sae(x), rescaled(x), atol=1e-5)
    a, b = absorption(data, sae, CFG), absorption(data, rescaled, CFG)
    assert np.mean([r.mean_absorption_fraction for r in b.counted]) == pytest.approx(2 / 3)
    for ra, rb in zip(a.counted, b.counted, strict=True):
        assert ra.split_features == rb.split_features
        assert ra.mean_absorption_fraction == pytest.approx(rb.mean_absorption_fraction)
        assert ra.full_absorption_rate == pytest.approx(rb.full_absorption_rate)


def test_a_letter_without_training_words_gets_f1_0_not_an_error():
    data = _data()
    keep = data.train_y != 0  # no training word starts with a
    data.train_x, data.train_y = data.train_x[keep], data.train_y[keep]
    outcome = absorption(data, _sae(absorbing=False), AbsorptionConfig(max_k=2, min_probe_f1=-1))
    assert outcome.letters[0].probe_f1 == 0.0
    assert outcome.letters[0].k_sparse_f1 == [0.0, 0.0]
    assert outcome.letters[1].k_sparse_f1[0] == 1.0
