"""Synthetic activations with known ground-truth features, to check that an SAE recipe works.

Each sample is a sparse, non-negative combination of `n_features` fixed unit directions in R^d:

    x = Σ_i c_i · f_i (+ isotropic Gaussian noise),   c_i > 0 only when feature i fires.

It models what SAEs are meant to undo in real LM activations, in a setting where the answer is
known:

- superposition: more features than dimensions (n_features > d), so the directions cannot be
  orthogonal and a linear read-out of one feature picks up the others;
- heavy-tailed frequencies: firing probabilities spread log-uniformly over `freq_decades` orders
  of magnitude (common and rare features, as in real data, where rare ones are the hard part);
- correlations: in each of `correlated_pairs` pairs (i, j), j fires whenever i fires, besides its
  own independent firing, which tempts a dictionary to merge i and j into one latent.

Features fire independently otherwise. The independent rates decrease with the feature index
(feature 0 is the most common), geometrically from the first to the last, by a factor
10**freq_decades; they are scaled (each clipped at 1) so that the marginal probabilities,
pairs included, sum to `mean_active`: the expected number of active features per sample, the
true L0. `feature_recovery` scores a learned decoder against the true directions.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch

from saetrain.config import DictionaryConfig, TrainerConfig
from saetrain.evaluation.metrics import ReconstructionStats
from saetrain.training.fit import fit_dictionary

MAGNITUDES = ("exponential", "uniform")


@dataclass
class SyntheticConfig:
    d: int = 64  # activation dimension
    n_features: int = 256  # true features (> d: superposition)
    mean_active: float = 4.0  # expected number of active features per sample (the true L0)
    # Independent firing probabilities spread log-uniformly over this many orders of magnitude,
    # then scaled so that the marginal probabilities sum to mean_active (each clipped at 1).
    freq_decades: float = 2.0
    correlated_pairs: int = 16  # pairs (i, j): j fires whenever i fires (plus on its own)
    magnitude: str = "exponential"  # "exponential" (mean 1) | "uniform" (0.5..1.5)
    noise_std: float = 0.0  # isotropic Gaussian noise added to each sample
    seed: int = 0


class SyntheticFeatures:
    """Holds the true features and draws samples.

    Attributes:
        features: [n_features, d] float32, unit rows, random directions drawn from `cfg.seed`.
        probabilities: [n_features] float32, marginal firing probability of each feature
            (accounting for the correlated pairs); sums to `cfg.mean_active`.
        independent_probabilities: [n_features] float32, each feature's own firing probability,
            before a pair's trigger is added.
        pairs: [P, 2] int64, rows (i, j): j fires whenever i fires. The 2P features are distinct,
            so there are no chains.
    """

    def __init__(self, cfg: SyntheticConfig):
        _validate(cfg)
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        features = torch.randn(cfg.n_features, cfg.d, generator=g, dtype=torch.float64)
        self.features = (features / features.norm(dim=1, keepdim=True)).float()
        P = cfg.correlated_pairs
        self.pairs = torch.randperm(cfg.n_features, generator=g)[: 2 * P].reshape(P, 2)

        n = cfg.n_features
        ranks = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
        shape = 10.0 ** (-cfg.freq_decades * ranks)  # 1 .. 10**-freq_decades
        own, marginal = _fit_rates(shape, self.pairs, cfg.mean_active)
        self.independent_probabilities = own.float()
        self.probabilities = marginal.float()
        # Used when sample() gets no generator: a fresh instance replays the same stream.
        self._generator = torch.Generator().manual_seed(cfg.seed + 0x5EED)

    @property
    def d(self) -> int:
        return self.cfg.d

    @property
    def n_features(self) -> int:
        return self.cfg.n_features

    def sample_with_codes(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [n, d], coefficients [n, n_features]), float32; x = coefficients @ features + noise.

        A feature fires exactly where its coefficient is > 0. Without a generator, the instance's
        own generator (seeded from cfg.seed) is used and advanced.
        """
        g = self._generator if generator is None else generator
        cfg = self.cfg
        fires = torch.rand(n, cfg.n_features, generator=g) < self.independent_probabilities
        if len(self.pairs):
            i, j = self.pairs[:, 0], self.pairs[:, 1]
            fires[:, j] |= fires[:, i]
        m = int(fires.sum())
        if cfg.magnitude == "exponential":
            # Clamped so that a firing feature never gets an exact zero (probability ~2^-24).
            mags = (
                torch.empty(m).exponential_(generator=g).clamp_min_(torch.finfo(torch.float32).tiny)
            )
        else:
            mags = 0.5 + torch.rand(m, generator=g)
        codes = torch.zeros(n, cfg.n_features)
        codes[fires] = mags
        x = codes @ self.features
        if cfg.noise_std > 0:
            x = x + cfg.noise_std * torch.randn(n, cfg.d, generator=g)
        return x, codes

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[n, d] float32 samples; the same as sample_with_codes(n, generator)[0]."""
        return self.sample_with_codes(n, generator)[0]

    def batches(self, batch_size: int, seed: int = 1) -> Iterator[torch.Tensor]:
        """An endless stream of fresh [batch_size, d] samples from its own generator."""
        g = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch_size, g)


def feature_recovery(
    true_features: torch.Tensor, decoder: torch.Tensor, threshold: float = 0.9
) -> dict[str, float]:
    """How well the rows of a decoder (W_dec, [n_latents, d]) match the true features [F, d].

    For each true feature, the best cosine similarity with any decoder row (both sides are
    normalised here, so W_dec need not have unit rows). Returns the mean of that over the true
    features ("mean_max_cosine"), the fraction of true features whose best cosine exceeds
    `threshold` ("fraction_recovered"), and the threshold.
    """
    if true_features.ndim != 2 or decoder.ndim != 2:
        raise ValueError("feature_recovery expects true_features [F, d] and decoder [n, d]")
    if decoder.shape[1] != true_features.shape[1]:
        raise ValueError(
            f"decoder is {tuple(decoder.shape)} but the true features have "
            f"d={true_features.shape[1]}: pass W_dec as [n_latents, d]"
        )
    with torch.no_grad():
        truth = _unit_rows(true_features.detach().to(torch.float64, copy=True))
        dec = _unit_rows(decoder.detach().to(truth.device, torch.float64, copy=True))
        best = torch.cat(
            [(chunk @ dec.T).max(dim=1).values for chunk in truth.split(1024)]
        )  # [F], chunked so that F × n stays small
    return {
        "mean_max_cosine": float(best.mean()),
        "fraction_recovered": float((best > threshold).double().mean()),
        "threshold": float(threshold),
    }


def _unit_rows(m: torch.Tensor) -> torch.Tensor:
    return m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _marginals(own: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    marginal = own.clone()
    if len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        marginal[j] = 1 - (1 - own[i]) * (1 - own[j])
    return marginal


def _fit_rates(
    shape: torch.Tensor, pairs: torch.Tensor, mean_active: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent rates min(c·shape, 1) with c chosen so the marginals sum to mean_active.

    The sum is continuous and increasing in c (from 0 to n_features), so bisection finds c.
    """
    lo, hi = 0.0, 1.0 / float(shape.min())  # at hi every rate is 1
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(_marginals((mid * shape).clamp_max(1.0), pairs).sum()) < mean_active:
            lo = mid
        else:
            hi = mid
    own = (hi * shape).clamp_max(1.0)
    return own, _marginals(own, pairs)


def _validate(cfg: SyntheticConfig) -> None:
    if cfg.d < 1 or cfg.n_features < 1:
        raise ValueError(f"synthetic d={cfg.d} and n_features={cfg.n_features} must be >= 1")
    if not 0 < cfg.mean_active <= cfg.n_features:
        raise ValueError(
            f"synthetic mean_active={cfg.mean_active} must be in (0, n_features={cfg.n_features}]"
        )
    if not 0 <= cfg.freq_decades <= 30:
        raise ValueError(f"synthetic freq_decades={cfg.freq_decades} must be in [0, 30]")
    if not 0 <= 2 * cfg.correlated_pairs <= cfg.n_features:
        raise ValueError(
            f"synthetic correlated_pairs={cfg.correlated_pairs} must be in "
            f"[0, n_features // 2 = {cfg.n_features // 2}] (each pair uses two distinct features)"
        )
    if cfg.magnitude not in MAGNITUDES:
        raise ValueError(
            f"synthetic magnitude={cfg.magnitude!r}; choose one of: {', '.join(MAGNITUDES)}"
        )
    if cfg.noise_std < 0:
        raise ValueError(f"synthetic noise_std={cfg.noise_std} must be >= 0")


def score_recipe(
    data: SyntheticFeatures,
    dict_cfg: Any,
    trainer_cfg: Any,
    seed: int = 0,
    eval_rows: int = 8192,
) -> dict[str, float]:
    """Train one dictionary on `data` the way runs do (fit_dictionary) and score it.

    Returns held-out FVU and L0 of the exported (folded) dictionary on fresh raw samples, the dead
    fraction at the end of training, the feature recovery of its decoder, and the final λ factor
    of the target-L0 controller (1 without one). `seed` sets the init and the data stream.
    """
    stream = data.batches(trainer_cfg.batch_tokens, seed=1000 + seed)
    fitted = fit_dictionary(
        dict_cfg,
        trainer_cfg,
        lambda n: next(stream),
        data.sample(2048, torch.Generator().manual_seed(2000 + seed)),
        data.d,
        data.d,
        False,
        torch.device("cpu"),
        torch.Generator().manual_seed(seed),
        log_every=10**9,
    )
    d = fitted.exported
    x = data.sample(eval_rows, torch.Generator().manual_seed(3000 + seed))
    stats = ReconstructionStats(d.n_latents, data.d)
    with torch.no_grad():
        codes = d.encode(x)
        stats.update(x, d.reconstruct(x, codes), codes)
    metrics = stats.compute()
    recovery = feature_recovery(data.features, d.W_dec)
    controller = fitted.trainer.l0_controller
    return {
        "fvu": float(metrics["fvu"]),
        "l0": float(metrics["l0"]),
        "dead": float(fitted.trainer.dead_mask().double().mean()),
        "mean_max_cosine": recovery["mean_max_cosine"],
        "recovered": recovery["fraction_recovered"],
        "lambda_factor": controller.factor if controller is not None else 1.0,
    }


def _main() -> None:
    """`python -m saetrain.synthetic arch key=value ...`: score recipes on known features."""
    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("overrides", nargs="*", help="dictionary.X=V / trainer.X=V / data.X=V")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    groups: dict[str, dict[str, Any]] = {"dictionary": {}, "trainer": {}, "data": {}}
    for item in args.overrides:
        key, value = item.split("=", 1)
        group, name = key.split(".", 1)
        groups[group][name] = value if value[:1].isalpha() else json.loads(value)
    data_cfg = SyntheticConfig(**({"d": 32, "n_features": 256, "mean_active": 4} | groups["data"]))
    data = SyntheticFeatures(data_cfg)
    trainer_defaults = {
        "total_tokens": 1000 * 256,
        "batch_tokens": 256,
        "lr": 5e-3,
        "warmup_steps": 20,
        "sparsity_warmup_steps": 150,
        "dead_after_tokens": 12_800,
    }
    trainer_cfg = TrainerConfig(**(trainer_defaults | groups["trainer"]))
    dict_cfg = DictionaryConfig(**({"n_latents": 512} | groups["dictionary"]))
    assert {f.name for f in fields(DictionaryConfig)} >= set(groups["dictionary"])
    rows = [score_recipe(data, dict_cfg, trainer_cfg, seed) for seed in range(args.seeds)]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    print(json.dumps({"overrides": args.overrides, "mean": mean, "seeds": rows}))


if __name__ == "__main__":
    _main()
