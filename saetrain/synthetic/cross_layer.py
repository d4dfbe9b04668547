"""Synthetic cross-layer activations: features written by one layer and read by every later one.

A model of what a cross-layer transcoder (CLT) is for, where the answer is known. There are L
layers, each with an input x^ℓ ∈ R^d (an MLP's input) and an output y^ℓ ∈ R^d (its output).
Every true feature f has a home layer h(f) and, per token, one non-negative coefficient c_f
(zero when it does not fire). Like a residual stream carrying what earlier layers wrote, f is
present in the input of its home layer and of every later layer, through a direction of its own
at each layer; and it is written into the output of every layer from its home on, again through a
feature- and layer-specific direction:

    x^ℓ  = Σ_{f: h(f) ≤ ℓ} c_f · e_f^ℓ  + ε         (e_f^ℓ: unit, random)
    y^ℓ' = Σ_{f: h(f) ≤ ℓ'} c_f · w_f^ℓ' + ε        (w_f^ℓ': unit, random)

So a CLT needs one latent per feature (at its home layer, decoding to every later output), while
per-layer transcoders must represent, at layer ℓ, every feature homed at ℓ or before — several
latents for one feature, and more active latents per token at later layers.

The true CLT decoder row of f is [w_f^h, w_f^{h+1}, …, w_f^{L−1}] (layer h's slots); the true
direction into output ℓ' is w_f^ℓ'. `CrossLayerSynthetic.rows(n)` returns rows laid out as a
saetrain CLT reads them, [x^0 … x^{L−1}, y^0 … y^{L−1}], with the coefficients [n, F].

Features fire independently; per-feature firing probabilities spread log-uniformly over
`freq_decades` orders of magnitude within each home layer and are scaled so that, on average,
`active_per_layer` features homed at each layer fire per token (so x^ℓ holds about
(ℓ+1)·active_per_layer active features). Magnitudes are exponential with mean 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CrossLayerConfig:
    n_layers: int = 4
    d: int = 64  # width of each layer's input and output
    features_per_layer: int = 64  # features homed at each layer (F = n_layers · this)
    active_per_layer: float = 2.0  # expected active features homed at each layer, per token
    freq_decades: float = 1.0
    noise_std: float = 0.02
    seed: int = 0


class CrossLayerSynthetic:
    """The true features (home layers, input and output directions) and a sampler.

    Attributes:
        home: [F] int64, each feature's home layer (features sorted by home layer).
        enc_dirs: [L, F, d] float32, e_f^ℓ (only used where ℓ ≥ h(f)).
        dec_dirs: [L, F, d] float32, w_f^ℓ' (only used where ℓ' ≥ h(f)).
        probabilities: [F] float32 firing probabilities.
    """

    def __init__(self, cfg: CrossLayerConfig):
        if cfg.n_layers < 1 or cfg.d < 1 or cfg.features_per_layer < 1:
            raise ValueError(f"n_layers, d and features_per_layer must be ≥ 1: {cfg}")
        if not 0 < cfg.active_per_layer <= cfg.features_per_layer:
            raise ValueError(
                f"active_per_layer={cfg.active_per_layer} must be in (0, features_per_layer]"
            )
        self.cfg = cfg
        L, d, m = cfg.n_layers, cfg.d, cfg.features_per_layer
        g = torch.Generator().manual_seed(cfg.seed)
        self.home = torch.arange(L).repeat_interleave(m)
        self.enc_dirs = _unit(torch.randn(L, L * m, d, generator=g))
        self.dec_dirs = _unit(torch.randn(L, L * m, d, generator=g))
        ranks = torch.arange(m, dtype=torch.float64) / max(m - 1, 1)
        shape = 10.0 ** (-cfg.freq_decades * ranks)
        p = (shape * cfg.active_per_layer / shape.sum()).clamp(max=1.0)
        self.probabilities = p.repeat(L).float()
        self._generator = torch.Generator().manual_seed(cfg.seed + 0x5EED)

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def d(self) -> int:
        return self.cfg.d

    @property
    def n_features(self) -> int:
        return len(self.home)

    def present(self, layer: int) -> torch.Tensor:
        """[F] bool: the features present in layer `layer`'s input and output (h(f) ≤ layer)."""
        return self.home <= layer

    def rows(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [n, 2·L·d] = [x^0 … x^{L−1}, y^0 … y^{L−1}], coefficients [n, F]), float32."""
        g = self._generator if generator is None else generator
        cfg = self.cfg
        fires = torch.rand(n, self.n_features, generator=g) < self.probabilities
        mags = torch.empty(int(fires.sum())).exponential_(generator=g)
        codes = torch.zeros(n, self.n_features)
        codes[fires] = mags.clamp_min_(torch.finfo(torch.float32).tiny)
        xs, ys = [], []
        for layer in range(cfg.n_layers):
            c = codes * self.present(layer)
            xs.append(c @ self.enc_dirs[layer])
            ys.append(c @ self.dec_dirs[layer])
        out = torch.cat(xs + ys, dim=1)
        if cfg.noise_std > 0:
            out = out + cfg.noise_std * torch.randn(out.shape, generator=g)
        return out, codes

    def clt_rows(self, layer: int) -> torch.Tensor:
        """[F_ℓ, (L−ℓ)·d]: the true CLT decoder rows of the features homed at `layer`."""
        ids = (self.home == layer).nonzero().squeeze(1)
        return torch.cat([self.dec_dirs[j][ids] for j in range(layer, self.n_layers)], dim=1)


def _unit(m: torch.Tensor) -> torch.Tensor:
    return m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
