"""Feature absorption on the first-letter task, computed as SAEBench 0.6.0 does
(sae_bench/evals/absorption), with scikit-learn's logistic regression for every probe.

1. A ground-truth probe per letter: one-vs-rest logistic regression (balanced classes) on the
   LM's activations at the dictionary's input site; its test F1 (score > 0) says whether the LM
   represents the letter there at all.
2. Each letter's main latents: an L1 logistic probe on the codes ranks latents (largest positive
   weight first); k-sparse probes on the top k codes for k = 1..max_k; the main latents are the top
   k while each k raises test F1 by more than f1_jump_threshold over the best so far.
3. On every test word of the letter the ground-truth probe gets right: a latent's probe projection
   is its activation × the cosine of its direction (decoder row) with the probe direction, the
   activation in units of the direction's length (SAEBench folds decoder norms into the codes;
   saetrain's exports keep the normalisation scale in W_dec, so the codes are multiplied by the
   decoder-row norms throughout, the k-sparse probes included).
   - absorption fraction (0.6.0, SAEBench PR #62): 0 when the main latents' projection reaches the
     activation's own projection x·p̂, or when the top 3 other latents aligned with the probe
     (cosine ≥ 0.1, positive projection) carry less than 40 % of it; 1 when the main latents'
     projection is ≤ 0; else a / (a + main), with a = min(absorbers, x·p̂ − main). Before 0.6.0
     the score was a different ratio, about 10× smaller on published SAEs: numbers from SAEBench's
     paper tables are not comparable.
   - full absorption: no main latent active (|a| < 1e-8), the top projecting latent's cosine
     ≥ 0.025, x·p̂ ≥ 0, and that latent carries ≥ 40 % of x·p̂.
   Per letter: the sums over its probe-true-positive words divided by their count; the means
   (and standard deviations) over the letters whose probe F1 exceeds min_probe_f1.

Codes are held sparse (a CSR matrix with L0 entries a row), never [words, latents] dense.
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from saetrain.config import AbsorptionConfig
from saetrain.dictionaries.base import Dictionary, SparseCodes
from saetrain.evaluation.usefulness import SuiteContext, SuiteResult
from saetrain.evaluation.usefulness.deps import (
    l1_logistic_regression,
    one_blas_thread,
    sklearn_modules,
)
from saetrain.evaluation.usefulness.first_letter import (
    LETTERS,
    FirstLetterData,
    first_letter_data,
)
from saetrain.progress import phase

log = logging.getLogger(__name__)

EVAL_TYPE_ID = "absorption_first_letter"
# SAEBench 0.6.0's thresholds (sae_bench/evals/absorption/feature_absorption.py).
FULL_ABSORPTION_PROBE_COS_THRESHOLD = 0.025
ABSORPTION_FRACTION_PROBE_COS_THRESHOLD = 0.1
PROBE_PROJECTION_PROPORTION_THRESHOLD = 0.4
MAX_ABSORBING_LATENTS = 3
TOP_PROJECTION_LATENTS = 10
INACTIVE = 1e-8


@dataclass
class LetterResult:
    letter: str
    probe_f1: float
    # The letter's main latents (the k-sparse probe's top k) and F1 for k = 1..max_k.
    split_features: list[int]
    k_sparse_f1: list[float]
    num_probe_true_positives: int = 0
    absorption_fraction_sum: float = 0.0
    num_full_absorption: int = 0

    @property
    def mean_absorption_fraction(self) -> float:
        return self.absorption_fraction_sum / max(self.num_probe_true_positives, 1)

    @property
    def full_absorption_rate(self) -> float:
        return self.num_full_absorption / max(self.num_probe_true_positives, 1)


@dataclass
class AbsorptionOutcome:
    letters: list[LetterResult]
    # The letters whose probe F1 exceeds min_probe_f1 (the ones averaged).
    counted: list[LetterResult] = field(default_factory=list)
    refused: str | None = None


def encode_sparse(
    dictionary: Dictionary, x: torch.Tensor, batch_rows: int, scale: torch.Tensor | None = None
) -> Any:
    """The codes of rows x, each latent's multiplied by `scale` (its direction's norm: SAEBench
    folds decoder norms into the codes), as a scipy CSR matrix (only active latents are kept)."""
    _, sparse = sklearn_modules()
    param = dictionary.W_enc
    scale = torch.ones(dictionary.n_latents) if scale is None else scale.detach().float().cpu()
    parts = []
    with torch.no_grad():
        for start in range(0, len(x), batch_rows):
            rows = x[start : start + batch_rows].to(param.device, param.dtype)
            codes = dictionary.encode(rows)
            if isinstance(codes, SparseCodes):
                idx, val = codes.indices.cpu(), codes.values.float().cpu()
                keep = val != 0
                val = val * scale[idx]
                row_of = torch.arange(len(rows)).unsqueeze(1).expand_as(idx)[keep]
                parts.append(
                    sparse.csr_matrix(
                        (val[keep].numpy(), (row_of.numpy(), idx[keep].numpy())),
                        shape=(len(rows), dictionary.n_latents),
                    )
                )
            else:
                parts.append(sparse.csr_matrix((codes.float().cpu() * scale).numpy()))
    return sparse.vstack(parts).tocsr()


def _f1(y: np.ndarray, predicted: np.ndarray) -> float:
    tp = float(np.sum(y & predicted))
    denominator = float(np.sum(y) + np.sum(predicted))
    return 2 * tp / denominator if denominator else 0.0


def ground_truth_probes(data: FirstLetterData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per letter: the probe direction [26, d], its test scores [n_test, 26], its test F1 [26].

    The activations are centred and divided by one scalar (their RMS) before the fit, which
    keeps directions as they are and lets the solver converge; scores are on the raw test rows.
    """
    linear_model, _ = sklearn_modules()
    x = data.train_x.double().numpy()
    mean = x.mean(0)
    scale = float(np.sqrt(((x - mean) ** 2).mean())) or 1.0
    xs, xt = (x - mean) / scale, (data.test_x.double().numpy() - mean) / scale
    y, yt = data.train_y.numpy(), data.test_y.numpy()
    directions = np.zeros((len(LETTERS), x.shape[1]))
    scores = np.full((len(xt), len(LETTERS)), -1.0)
    f1 = np.zeros(len(LETTERS))
    for i in range(len(LETTERS)):
        if not (y == i).any() or (y == i).all():
            continue  # no word (or only words) of this letter: no probe, F1 0
        probe = linear_model.LogisticRegression(max_iter=1000, class_weight="balanced")
        probe.fit(xs, y == i)
        directions[i] = probe.coef_[0]
        scores[:, i] = probe.decision_function(xt)
        f1[i] = _f1(yt == i, scores[:, i] > 0)
    return directions, scores, f1


def latent_ranking(codes: Any, y: np.ndarray, n: int, l1_c: float) -> np.ndarray:
    """[26, n]: per letter, the latents an L1 logistic probe on the codes weighs most (positive
    weight first; ties, e.g. all the zero weights, broken by the mean code difference)."""
    linear_model, _ = sklearn_modules()
    rms = float(np.sqrt((codes.data.astype(np.float64) ** 2).mean())) if codes.nnz else 1.0
    scaled = codes / (rms or 1.0)
    ranking = np.zeros((len(LETTERS), n), dtype=np.int64)
    for i in range(len(LETTERS)):
        positive = y == i
        if not positive.any() or positive.all():
            continue
        probe = l1_logistic_regression(linear_model, l1_c)
        probe.fit(scaled, positive)
        difference = np.asarray(scaled[positive].mean(0) - scaled[~positive].mean(0)).ravel()
        ranking[i] = np.lexsort((-difference, -probe.coef_[0]))[:n]
    return ranking


def k_sparse_f1(
    train: Any, y: np.ndarray, test: Any, yt: np.ndarray, latents: np.ndarray
) -> list[float]:
    """Test F1 of a logistic probe on the codes of latents[:k], for k = 1..len(latents)."""
    linear_model, _ = sklearn_modules()
    if not y.any() or y.all():
        return [0.0] * len(latents)  # one class only in training: no probe, F1 0 (as the dense)
    out = []
    for k in range(1, len(latents) + 1):
        columns = latents[:k]
        probe = linear_model.LogisticRegression(max_iter=500, class_weight="balanced")
        probe.fit(train[:, columns].toarray(), y)
        out.append(_f1(yt, probe.decision_function(test[:, columns].toarray()) > 0))
    return out


def split_features(latents: np.ndarray, f1: list[float], jump: float) -> list[int]:
    """The top k latents while F1 rises by more than `jump` over the best so far (k = 1 always)."""
    best, k_main = -100.0, 0
    for k, score in enumerate(f1, start=1):
        if score <= best + jump:
            break
        best, k_main = score, k
    return [int(i) for i in latents[:k_main]]


def word_absorption(
    active: np.ndarray, values: np.ndarray, cos: np.ndarray, act_projection: float,
    main: list[int],
) -> tuple[float, bool]:  # fmt: skip
    """One word's absorption fraction and full absorption (SAEBench 0.6.0), from its active
    latents and their values, every latent's cosine with the probe and x·p̂."""
    projection = values * cos[active]
    is_main = np.isin(active, main)
    main_projection = float(projection[is_main].sum())
    candidates = ~is_main & (cos[active] >= ABSORPTION_FRACTION_PROBE_COS_THRESHOLD)
    candidates &= projection > 0
    absorbers = float(np.sort(projection[candidates])[::-1][:MAX_ABSORBING_LATENTS].sum())
    share = absorbers / act_projection if act_projection else 0.0
    if main_projection >= act_projection or share < PROBE_PROJECTION_PROPORTION_THRESHOLD:
        fraction = 0.0
    elif main_projection <= 0.0:
        fraction = 1.0
    else:
        absorbed = min(absorbers, act_projection - main_projection)
        fraction = float(np.clip(absorbed / (absorbed + main_projection), 0.0, 1.0))

    main_values = values[is_main]
    full = False
    if not (np.abs(main_values) >= INACTIVE).any() and act_projection >= 0 and len(active):
        # The top projecting latent over all latents (inactive ones project 0).
        top = int(np.argmax(projection))
        top_projection = float(projection[top])
        aligned = cos[active[top]] >= FULL_ABSORPTION_PROBE_COS_THRESHOLD
        if top_projection > 0 and aligned and act_projection > 0:
            full = top_projection / act_projection >= PROBE_PROJECTION_PROPORTION_THRESHOLD
    return fraction, full


def absorption(
    data: FirstLetterData, dictionary: Dictionary, cfg: AbsorptionConfig
) -> AbsorptionOutcome:
    """The whole computation on activations already read (tests feed synthetic ones)."""
    with one_blas_thread():
        return _absorption(data, dictionary, cfg)


def _absorption(
    data: FirstLetterData, dictionary: Dictionary, cfg: AbsorptionConfig
) -> AbsorptionOutcome:
    with phase("absorption: ground-truth probes (26 letters)"):
        directions, scores, probe_f1 = ground_truth_probes(data)
    ok = int((probe_f1 > cfg.min_probe_f1).sum())
    letters = [LetterResult(c, float(f), [], []) for c, f in zip(LETTERS, probe_f1, strict=True)]
    if ok < cfg.min_letters:
        reason = (
            f"the ground-truth first-letter probe is too weak here: test F1 > {cfg.min_probe_f1} "
            f"on {ok} of 26 letters (SAEBench needs {cfg.min_letters}); mean probe F1 "
            f"{probe_f1.mean():.3f}. No absorption number: it would not mean anything"
        )
        return AbsorptionOutcome(letters, [], reason)
    rows = max(cfg.batch_prompts, 1)
    with torch.no_grad():
        latent_dirs = dictionary.input_directions().detach().double().cpu()
        norms = latent_dirs.norm(dim=1, keepdim=True)
        latent_dirs = latent_dirs / norms.clamp_min(1e-12)
    with phase("absorption: encode the prompts' activations"):
        # Codes in units of their directions' length, as SAEBench's fold_W_dec_norm makes them:
        # a latent's projection on the probe is then code × cosine.
        train_codes = encode_sparse(dictionary, data.train_x, rows, norms[:, 0])
        test_codes = encode_sparse(dictionary, data.test_x, rows, norms[:, 0])
    y, yt = data.train_y.numpy(), data.test_y.numpy()
    n = min(cfg.max_k, dictionary.n_latents)
    with phase(f"absorption: L1 latent ranking and k-sparse probes (k = 1..{n})"):
        ranking = latent_ranking(train_codes, y, n, cfg.l1_C)
        for i, result in enumerate(letters):
            if result.probe_f1 > cfg.min_probe_f1:
                result.k_sparse_f1 = k_sparse_f1(train_codes, y == i, test_codes, yt == i,
                                                 ranking[i])  # fmt: skip
                result.split_features = split_features(
                    ranking[i], result.k_sparse_f1, cfg.f1_jump_threshold
                )
    unit = torch.from_numpy(directions)
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos_all = (unit @ latent_dirs.T).numpy()  # [26, n_latents]
    projections = (data.test_x.double() @ unit.T).numpy()  # [n_test, 26]
    counted = [r for r in letters if r.probe_f1 > cfg.min_probe_f1]
    for i, result in enumerate(letters):
        if result not in counted:
            continue
        words = np.flatnonzero((yt == i) & (scores[:, i] > 0))
        result.num_probe_true_positives = len(words)
        for w in words:
            lo, hi = test_codes.indptr[w], test_codes.indptr[w + 1]
            fraction, full = word_absorption(
                test_codes.indices[lo:hi], test_codes.data[lo:hi].astype(np.float64),
                cos_all[i], float(projections[w, i]), result.split_features,
            )  # fmt: skip
            result.absorption_fraction_sum += fraction
            result.num_full_absorption += int(full)
    return AbsorptionOutcome(letters, counted)


def mean_metrics(counted: list[LetterResult]) -> dict[str, float]:
    """SAEBench's eval_result_metrics.mean over the counted letters."""
    fractions = [r.mean_absorption_fraction for r in counted]
    full = [r.full_absorption_rate for r in counted]
    splits = [float(len(r.split_features)) for r in counted]

    def stdev(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    return {
        "mean_absorption_fraction_score": statistics.mean(fractions),
        "mean_full_absorption_score": statistics.mean(full),
        "mean_num_split_features": statistics.mean(splits),
        "std_dev_absorption_fraction_score": stdev(fractions),
        "std_dev_full_absorption_score": stdev(full),
        "std_dev_num_split_features": stdev(splits),
    }


def saebench_output(
    outcome: AbsorptionOutcome, ctx: SuiteContext, cfg: AbsorptionConfig, position: int
) -> dict[str, Any]:
    """SAEBench's AbsorptionEvalOutput layout (eval_output.py), with its key names."""
    eval_config = {
        "model_name": ctx.model_name,
        "random_seed": ctx.seed,
        "f1_jump_threshold": cfg.f1_jump_threshold,
        "max_k_value": cfg.max_k,
        "prompt_template": cfg.prompt_template,
        "prompt_token_pos": position,
        "llm_batch_size": cfg.batch_prompts,
        "llm_dtype": str(next(ctx.model.parameters()).dtype).removeprefix("torch."),
        "min_GT_probe_f1": cfg.min_probe_f1,
        "min_feats_for_eval": cfg.min_letters,
        # saetrain's own settings (SAEBench has no such fields).
        "saetrain_max_words": cfg.max_words,
        "saetrain_icl_examples": cfg.icl_examples,
        "saetrain_l1_C": cfg.l1_C,
    }
    return {
        "eval_type_id": EVAL_TYPE_ID,
        "eval_config": eval_config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": {"mean": mean_metrics(outcome.counted)},
        "eval_result_details": [
            {
                "first_letter": r.letter,
                "mean_absorption_fraction": r.mean_absorption_fraction,
                "full_absorption_rate": r.full_absorption_rate,
                "num_full_absorption": r.num_full_absorption,
                "num_probe_true_positives": r.num_probe_true_positives,
                "num_split_features": len(r.split_features),
            }
            for r in outcome.counted
        ],
        "eval_result_unstructured": {
            "probe_f1": {r.letter: r.probe_f1 for r in outcome.letters},
            "split_features": {r.letter: r.split_features for r in outcome.counted},
            "k_sparse_f1": {r.letter: r.k_sparse_f1 for r in outcome.counted},
        },
        "sae_bench_commit_hash": "saetrain",
        "sae_lens_id": ctx.sae_name,
        "sae_lens_release_id": "saetrain",
        "sae_lens_version": None,
        "sae_cfg_dict": {
            "architecture": ctx.dictionary.architecture,
            "d_in": ctx.dictionary.d_in,
            "d_sae": ctx.dictionary.n_latents,
            "hook_name": ",".join(ctx.input_sites),
        },
    }


def run_absorption(ctx: SuiteContext, cfg: AbsorptionConfig) -> SuiteResult:
    """The suite: the first-letter prompts through the LM, then `absorption`."""
    sklearn_modules()  # fail before the LM forwards when scikit-learn is missing
    data = first_letter_data(ctx.source, ctx.input_sites, ctx.tokenizer, cfg, ctx.seed)
    outcome = absorption(data, ctx.dictionary, cfg)
    f1 = [r.probe_f1 for r in outcome.letters]
    metrics = {
        "absorption/probe_mean_f1": float(np.mean(f1)),
        "absorption/probe_letters_above_min_f1": float(sum(v > cfg.min_probe_f1 for v in f1)),
    }
    notes = []
    if ctx.dictionary.transcoder:
        notes.append(
            "a transcoder: probes and codes read its input site "
            f"({', '.join(ctx.input_sites)}); latent directions are its encoder columns"
        )
    if outcome.refused:
        notes.append(outcome.refused)
        return SuiteResult(metrics, {}, notes)
    metrics |= {
        f"absorption/{k}": v
        for k, v in mean_metrics(outcome.counted).items()
        if not k.startswith("std_dev")
    }
    return SuiteResult(metrics, saebench_output(outcome, ctx, cfg, data.position), notes)
