"""What every sparse dictionary shares: parameters, init, decoder constraint, scale folding.

Shapes follow SAELens so that export is a rename at most: W_enc [d_in, n], b_enc [n],
W_dec [n, d_out], b_dec [d_out]. An architecture subclass supplies the encoder's activation and its
own loss terms; everything else lives here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn


class SparseCodes(NamedTuple):
    """Codes of a TopK-family dictionary: the k active latents per row and their values."""

    indices: torch.Tensor  # [N, k] int64
    values: torch.Tensor  # [N, k]

    def to_dense(self, n_latents: int) -> torch.Tensor:
        dense = self.values.new_zeros(self.values.shape[0], n_latents)
        return dense.scatter_(1, self.indices, self.values)


@dataclass
class TrainOutput:
    """One training forward: the loss to minimise and what the trainer logs or tracks."""

    loss: torch.Tensor
    x_hat: torch.Tensor
    codes: SparseCodes
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # detached loss components


class Dictionary(nn.Module):
    """Base class: a linear encoder with a sparse activation, and a linear decoder."""

    architecture: ClassVar[str]

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        d_out: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.d_in = d_in
        self.n_latents = n_latents
        self.d_out = d_in if d_out is None else d_out
        W_dec = torch.randn(n_latents, self.d_out, generator=generator, dtype=torch.float32)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        if self.d_out == d_in:
            W_enc = W_dec.T.clone()  # tied init (Gao et al.): every latent starts as a direction
        else:
            W_enc = torch.randn(d_in, n_latents, generator=generator) / d_in**0.5
        opts = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(W_enc.to(**opts))
        self.b_enc = nn.Parameter(torch.zeros(n_latents, **opts))
        self.W_dec = nn.Parameter(W_dec.to(**opts))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, **opts))

    # -- the architecture's part -------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> SparseCodes:
        raise NotImplementedError

    def training_forward(
        self, x: torch.Tensor, target: torch.Tensor, dead_mask: torch.Tensor | None
    ) -> TrainOutput:
        raise NotImplementedError

    def saelens_fields(self) -> dict[str, Any]:
        """Architecture-specific cfg.json fields under SAELens's names."""
        return {}

    @classmethod
    def from_saelens_fields(cls, d_in: int, n_latents: int, d_out: int, cfg: dict[str, Any]):
        return cls(d_in, n_latents, d_out)

    # -- shared --------------------------------------------------------------------------------

    def decode(self, codes: SparseCodes) -> torch.Tensor:
        from saetrain.kernels.reference import sparse_decode

        return sparse_decode(codes.indices, codes.values, self.W_dec) + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction (or, for a transcoder, prediction) of x; any leading shape."""
        lead = x.shape[:-1]
        x_hat = self.decode(self.encode(x.reshape(-1, self.d_in).to(self.W_enc.dtype)))
        return x_hat.reshape(*lead, self.d_out).to(x.dtype)

    @torch.no_grad()
    def set_decoder_unit_norm(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder(self) -> None:
        """Project out the part of W_dec's gradient that would only change row norms."""
        if self.W_dec.grad is None:
            return
        W = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        parallel = (self.W_dec.grad * W).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel * W

    @torch.no_grad()
    def fold_input_scale(self, scale_in: float, scale_out: float) -> None:
        """Make a dictionary trained on (s_in·x → s_out·y) work on raw (x → y).

        Decoding with W_dec/s_out and b_dec/s_out gives y's raw scale. The encoder sees
        (x − b_dec')·(s_in·W_enc) + b_enc' with b_dec' = b_dec/s_out; choosing
        b_enc' = b_enc + (s_in/s_out − 1)·b_dec·W_enc makes that equal the normalised model's
        (s_in·x − b_dec)·W_enc + b_enc, so the codes are unchanged.
        """
        if scale_in != scale_out:
            self.b_enc += (scale_in / scale_out - 1.0) * (self.b_dec @ self.W_enc)
        self.W_enc *= scale_in
        self.W_dec /= scale_out
        self.b_dec /= scale_out
