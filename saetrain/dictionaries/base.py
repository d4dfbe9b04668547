"""What every sparse dictionary shares: parameters, init, decoder constraint, scale folding, export.

Shapes follow SAELens so that export is a rename at most: W_enc [d_in, n], b_enc [n],
W_dec [n, d_out], b_dec [d_out], W_skip [d_out, d_in]. An SAE reads and predicts the same site and
subtracts b_dec from its input; a transcoder predicts another site (d_out may differ) and does not.
An architecture subclass supplies its encoder activation and its loss terms; everything else lives
here once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol

import torch
from torch import nn

from saetrain.config import DictionaryConfig
from saetrain.kernels.ops import sparse_decode
from saetrain.planning.site_patterns import KIND_SITES


class SparseCodes(NamedTuple):
    """Codes of a TopK-family dictionary: the active latents per row and their values.

    TopK has exactly k per row. BatchTopK and Matryoshka, whose per-row count varies, pad every
    row to the batch's largest count with value 0 (a padded slot may repeat an index of its row):
    zeros are harmless in the decode and in every count below, which all look at values != 0.
    """

    indices: torch.Tensor  # [N, k] int64
    values: torch.Tensor  # [N, k]

    def to_dense(self, n_latents: int) -> torch.Tensor:
        """[N, n] codes; repeated indices add (a padded slot adds its 0)."""
        dense = self.values.new_zeros(self.values.shape[0], n_latents)
        return dense.scatter_add_(1, self.indices, self.values)

    def detach(self) -> SparseCodes:
        return SparseCodes(self.indices, self.values.detach())


# Codes travel sparse (TopK: indices and values) or dense ([N, n], zeros where inactive).
Codes = SparseCodes | torch.Tensor


class LatentSplit(Protocol):
    """What a dictionary whose latents are split over ranks needs (saetrain/training/
    latent_shard.py): sums over latents made whole, its encoder input's gradient summed, and the
    exchanges a selection over latents makes (the dictionary's own training_forward selects with
    them, so one step serves one process and a shard)."""

    @property
    def n_latents(self) -> int:
        """The whole dictionary's width."""
        ...

    @property
    def start(self) -> int:
        """This shard's latents are start .. start + n_local - 1."""
        ...

    @property
    def n_local(self) -> int: ...

    def sum_parts(self, part: torch.Tensor) -> torch.Tensor: ...

    def sum_gradients(self, x: torch.Tensor) -> torch.Tensor: ...

    def total(self, count: torch.Tensor | float) -> float:
        """A number summed over every shard (dead latents, active codes)."""
        ...

    def merge_top(
        self, values: torch.Tensor, index: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) [N, k] of the k largest of every shard's candidates `values` [N, c]
        at global `index` [N, c]."""
        ...

    def keep_mine(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(local indices, mask of this shard's slots) of global latent indices; another shard's
        slot gets a local index spread over the shard, and its value must be masked."""
        ...


def fired_latents(codes: Codes, n_latents: int) -> torch.Tensor:
    """Bool [n_latents]: which latents were active on at least one row."""
    if isinstance(codes, SparseCodes):
        return firing_counts(codes, n_latents) > 0
    return (codes != 0).any(dim=0)


def active_count(codes: Codes) -> torch.Tensor:
    """The number of non-zero codes over all rows (L0 × rows)."""
    values = codes.values if isinstance(codes, SparseCodes) else codes
    return (values != 0).sum()


def firing_counts(codes: Codes, n_latents: int) -> torch.Tensor:
    """Int64 [n_latents]: on how many rows each latent was active."""
    if isinstance(codes, SparseCodes):
        # Every slot is added, the inactive ones as 0: no boolean indexing, whose data-dependent
        # size would make the host wait for the GPU once per training step.
        active = (codes.values != 0).reshape(-1).to(torch.int64)
        counts = torch.zeros(n_latents, dtype=torch.int64, device=codes.indices.device)
        return counts.index_add_(0, codes.indices.reshape(-1), active)
    return (codes != 0).sum(dim=0)


@dataclass
class TrainOutput:
    """One training forward: the loss to minimise and what the trainer logs or tracks."""

    loss: torch.Tensor
    x_hat: torch.Tensor
    codes: Codes
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # detached loss components


def total_variance(target: torch.Tensor) -> torch.Tensor:
    """Σ‖y − mean(y)‖² over the batch: the TopK family's loss normaliser."""
    return (target - target.mean(0)).pow(2).sum().clamp_min(1e-12)


def fvu_loss(target: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch FVU, the batch's total variance): the TopK family's reconstruction loss."""
    variance = total_variance(target)
    return (target - x_hat).pow(2).sum() / variance, variance


def squared_error(target: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Σ‖y − ŷ‖² / N: the penalty family's reconstruction loss (activations scaled to E‖x‖²=d)."""
    return (target - x_hat).pow(2).sum(-1).mean()


@dataclass(frozen=True)
class LatentGroup:
    """Latents that one encoder computes from one site (and more beside it) and that write one
    site: what a tool looking at latents shows together (saetrain/inspect/units.py). An SAE or a
    transcoder is one group, a crosscoder one reading all its sources, a CLT one per layer."""

    suffix: str  # added to the dictionary's name: "" for the whole, ".L<layer>" for a CLT layer
    input_site: str  # where `encode` reads, e.g. mlp_in.3
    target_site: str  # where W_dec writes (the input site for an SAE)
    encode: Callable[[torch.Tensor], Codes]  # raw activations [N, ≥ its width] → codes
    n_latents: int
    W_dec: torch.Tensor  # [n_latents, d_out]: each latent's direction in the site it writes
    # More sites `encode` reads, side by side after input_site (a crosscoder's other sources).
    more_sites: tuple[str, ...] = ()


# A normalisation scale: one factor for all columns, or one per column (several sites side by
# side, each scaled so that E‖s·x_site‖² = its width).
Scale = float | torch.Tensor


def column_scales(scale: Scale, width: int, like: torch.Tensor) -> torch.Tensor:
    """[width] per-column factors of `scale`, on `like`'s device and dtype."""
    if isinstance(scale, torch.Tensor):
        return scale.to(device=like.device, dtype=like.dtype).expand(width)
    return torch.full((width,), float(scale), device=like.device, dtype=like.dtype)


class Dictionary(nn.Module):
    """Base class: a linear encoder with a sparse activation, and a linear decoder."""

    architecture: ClassVar[str]
    # -- what the architecture means (ARCHITECTURES maps its name to its class) ---------------
    # The TopK family: `dictionary.k` active latents, chosen per row (TopK) or per batch
    # (BatchTopK, Matryoshka); k cannot exceed the latents (preflight), and the loss is a batch FVU.
    selects_k: ClassVar[bool] = False
    # ... chosen over the whole batch (BatchTopK, Matryoshka), not row by row.
    selects_per_batch: ClassVar[bool] = False
    # The penalty family (ReLU, Gated, JumpReLU): L0 set by a sparsity penalty weighted by
    # λ = dictionary.sparsity_coefficient, which dictionary.target_l0 can steer (shift_sparsity).
    penalised: ClassVar[bool] = False
    # Its latents come in nested prefixes (dictionary.matryoshka_prefixes; the last must be all).
    nested_prefixes: ClassVar[bool] = False
    # How distributed.shard_latents splits the latents over ranks (saetrain/training/
    # latent_shard.py): "selection" (the TopK selection is made over the shards there), "sums"
    # (an elementwise activation: only its sums over latents are made whole, through
    # `latent_split`), or None (not split: Matryoshka's nested prefixes).
    latent_sharding: ClassVar[str | None] = None

    # -- what the kind means (dictionary.kind; KINDS maps its name to its class) --------------
    # What the latents read and write: single (an SAE or transcoder: one input site, one target
    # site), crosscoder or clt; the kind's class (this one, CrosscoderMixin, CLTStructure) holds
    # the knowledge below, which the config, the run, evaluation, export and inspect ask.
    kind: ClassVar[str] = "single"
    # The architectures this kind trains (None: every one).
    kind_architectures: ClassVar[tuple[str, ...] | None] = None
    # The sites this kind reads and writes (multi_site: one dictionary over a pattern's layers;
    # reconstructs_sources: a crosscoder; writes_later_layers: a CLT), from planning's one table
    # (saetrain/planning/site_patterns.py), which checks site patterns before any class exists.
    multi_site: ClassVar[bool] = KIND_SITES["single"].multi_site
    reconstructs_sources: ClassVar[bool] = KIND_SITES["single"].reconstructs_sources
    writes_later_layers: ClassVar[bool] = KIND_SITES["single"].writes_later_layers
    # `dictionary.n_latents` / expansion_factor count the latents of one input site (a CLT's
    # layer): the dictionary holds that many per input site (`latent_count`).
    latents_per_input: ClassVar[bool] = False
    # Spliced into the LM as its inputs arrive; a crosscoder needs later layers' inputs, so it
    # reads them from the clean forward (saetrain/evaluation/splice.py's Member.causal).
    causal_splice: ClassVar[bool] = True
    # A run can start from a saved one (dictionary.init_from) ...
    fine_tunable: ClassVar[bool] = True
    # ... and split its latents over ranks (distributed.shard_latents).
    shardable_kind: ClassVar[bool] = True
    # SAELens loads its folder as it is (crosscoders and CLTs have saetrain's own layout).
    saelens_loadable: ClassVar[bool] = True
    # How a model card or a page names it; None: "transcoder" or "sparse autoencoder".
    kind_title: ClassVar[str | None] = None
    # The kind's own outputs beside its folder, by name (saetrain/export/extras.py writes them):
    # "circuit_tracer" (a CLT's circuit-tracer folder), "decoder_norm_shares" (a crosscoder's
    # plot of its latents' decoder-norm shares per source).
    export_extras: ClassVar[tuple[str, ...]] = ()
    # The kind's own metrics, from the weights alone, by name (saetrain/export/extras.py).
    extra_metrics: ClassVar[tuple[str, ...]] = ()

    # Keep decoder rows at unit norm (the penalty then cannot shrink codes by growing rows).
    unit_norm_decoder: ClassVar[bool] = True
    # The norm of each encoder column at init (dictionary.encoder_init_norm overrides both).
    # An SAE's encoder is tied to its decoder (Gao et al.): column i = this norm × decoder row i.
    # Below 1, a latent's first pre-activations are smaller than its direction's share of x, so
    # the early top-k picks by direction and the decoder need not undo an oversized encoder.
    encoder_init_norm: ClassVar[float] = 1.0
    # A transcoder's random encoder columns start at this norm (the natural scale 1/sqrt(d_in)
    # per entry at 1). Small makes the first predictions ≈ b_dec (the target's centre) instead
    # of b_dec plus many random unit directions — safe only where some latents always fire (the
    # TopK family); threshold and penalty architectures need pre-activations at full scale.
    transcoder_encoder_scale: ClassVar[float] = 1.0
    # The penalty family's target L0 (dictionary.target_l0): when set, the trainer adapts λ
    # towards it (saetrain/training/l0_controller.py). None: λ as configured.
    target_l0: float | None = None
    # Set while a rank trains its shard of the latents (saetrain/training/latent_shard.py);
    # None: the dictionary is whole, and every hook below is the identity.
    latent_split: LatentSplit | None = None

    @classmethod
    def latent_count(cls, per_input: int, n_inputs: int) -> int:
        """The dictionary's latents, for `dictionary.n_latents` (or expansion_factor × one input
        site's width) = `per_input` and `n_inputs` input sites."""
        return per_input * n_inputs if cls.latents_per_input else per_input

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        d_out: int | None = None,
        *,
        transcoder: bool = False,
        skip: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        encoder_init_norm: float | None = None,
    ):
        super().__init__()
        self.d_in = d_in
        self.n_latents = n_latents
        self.d_out = d_in if d_out is None else d_out
        self.transcoder = transcoder or self.d_out != d_in
        if skip and not self.transcoder:
            raise ValueError("dictionary.skip=true needs a transcoder (a site.target)")
        if encoder_init_norm is not None and not encoder_init_norm > 0:
            raise ValueError(f"dictionary.encoder_init_norm={encoder_init_norm} must be > 0")
        self.init_parameters(skip, {"dtype": dtype, "device": device}, generator, encoder_init_norm)

    def init_parameters(
        self,
        skip: bool,
        opts: dict[str, Any],
        generator: torch.Generator | None,
        encoder_init_norm: float | None,
    ) -> None:
        """Create W_enc, b_enc, W_dec, b_dec (and W_skip): the one place a layout is chosen.

        A dictionary whose latents are structured differently (a cross-layer transcoder's
        per-layer encoders and decoders) overrides this alone, so that no full [d_in, n] matrix
        is ever made for it.
        """
        d_in, n_latents = self.d_in, self.n_latents
        W_dec = torch.randn(n_latents, self.d_out, generator=generator, dtype=torch.float32)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        if not self.transcoder:
            # tied init (Gao et al.): every latent starts as a direction
            norm = self.encoder_init_norm if encoder_init_norm is None else encoder_init_norm
            W_enc = norm * W_dec.T
        else:  # input and output spaces differ: tying them means nothing
            norm = self.transcoder_encoder_scale if encoder_init_norm is None else encoder_init_norm
            W_enc = norm / d_in**0.5 * torch.randn(d_in, n_latents, generator=generator)
        self.W_enc = nn.Parameter(W_enc.to(**opts))
        self.b_enc = nn.Parameter(torch.zeros(n_latents, **opts))
        self.W_dec = nn.Parameter(W_dec.to(**opts))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, **opts))
        self.W_skip = nn.Parameter(torch.zeros(self.d_out, d_in, **opts)) if skip else None

    @property
    def apply_b_dec_to_input(self) -> bool:
        """SAEs centre their input on b_dec; transcoders' b_dec lives in the output space."""
        return not self.transcoder

    # -- the architecture's part -------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> Codes:
        """Inference codes for rows x [N, d_in]."""
        raise NotImplementedError

    def training_forward(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        dead_mask: torch.Tensor | None,
        sparsity_multiplier: float = 1.0,
    ) -> TrainOutput:
        """Loss for a batch; `sparsity_multiplier` (0 → 1) warms up a sparsity penalty."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, out: TrainOutput) -> None:
        """Update state that is not learnt by gradient (e.g. BatchTopK's threshold)."""

    def shift_sparsity(self, amount: float) -> None:
        """Raise what decides which latents fire by `amount` (lower it when negative), outside
        the optimiser: the fast actuator of dictionary.target_l0's controller
        (saetrain/training/l0_controller.py). Units: about one unit lowers L0 by a factor e.
        Only the architectures that take target_l0 have one."""
        raise NotImplementedError(f"{self.architecture} does not take dictionary.target_l0")

    def encoder_norms(self) -> torch.Tensor:
        """[n_latents]: each latent's encoder column norm, the scale of its pre-activation on
        normalised activations (per-dimension RMS 1)."""
        return self.W_enc.detach().norm(dim=-2).reshape(-1)

    def saelens_architecture(self) -> str:
        """The `architecture` that cfg.json names (SAELens's name where SAELens has one)."""
        return self.architecture

    def saelens_fields(self) -> dict[str, Any]:
        """Architecture-specific cfg.json fields under SAELens's names."""
        return {}

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to save, under SAELens's names, for raw (folded) activations."""
        return {name: t.detach() for name, t in self.state_dict().items()}

    def load_saelens_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(tensors)

    @classmethod
    def from_saelens(cls, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Dictionary:
        """Build from a cfg.json and its tensors (the inverse of the three methods above)."""
        d_in, n = tensors["W_enc"].shape
        d_out = tensors["W_dec"].shape[1]
        dictionary = cls(
            d_in,
            n,
            d_out,
            transcoder=not cfg.get("apply_b_dec_to_input", True) or d_out != d_in,
            skip="W_skip" in tensors,
            dtype=tensors["W_enc"].dtype,
            **cls.init_kwargs_from_saelens(cfg),
        )
        dictionary.load_saelens_tensors(tensors)
        return dictionary

    @classmethod
    def init_kwargs_from_saelens(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {}

    @classmethod
    def init_kwargs_from_config(cls, cfg: DictionaryConfig) -> dict[str, Any]:
        """The constructor arguments this architecture takes from `dictionary.*`."""
        return {}

    def config_fields(self) -> dict[str, Any]:
        """The `dictionary.*` settings this dictionary's shape fixes (a run fine-tuning it takes
        them from its folder; dictionary.init_from); its training settings are not among them."""
        return {
            "architecture": self.architecture,
            "n_latents": self.n_latents,
            "skip": self.W_skip is not None,
        }

    def latent_groups(self, inputs: list[str], targets: list[str]) -> list[LatentGroup]:
        """The groups a latent viewer shows (LatentGroup), given the dictionary's input and
        target sites: the whole dictionary, reading its first d_in columns."""
        weight, d_in = self.W_enc, self.d_in

        def encode(x: torch.Tensor) -> Codes:
            return self.encode(x[:, :d_in].to(weight.device, weight.dtype))

        return [LatentGroup("", inputs[0], targets[0], encode, self.n_latents, self.W_dec.detach())]

    def memory_note(self) -> str | None:
        """A line for the run's log on what this dictionary's structure costs beyond W_enc and
        W_dec's usual [d, n] (a CLT's triangular decoders), or None."""
        return None

    def about_rows(self, inputs: list[str], sites: tuple[str, ...]) -> dict[str, str]:
        """What a latent page says of this kind beyond the architecture and the widths (`sites`:
        the ones a group's encoder reads); rows named as the page names them."""
        return {}

    # -- shared --------------------------------------------------------------------------------

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder multiplies: x − b_dec for an SAE, x for a transcoder. Under latent
        sharding each rank's latents send b_dec only their part of its gradient: summed here."""
        if not self.apply_b_dec_to_input:
            return x
        x_in = x - self.b_dec
        return x_in if self.latent_split is None else self.latent_split.sum_gradients(x_in)

    def sum_over_latents(self, partial: torch.Tensor) -> torch.Tensor:
        """A sum over the latents (the decoder's output, a penalty's per-row sum), given this
        dictionary's part: the whole sum, over every rank's latents under latent sharding."""
        return partial if self.latent_split is None else self.latent_split.sum_parts(partial)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder_input(x) @ self.W_enc + self.b_enc

    def decode(self, codes: Codes) -> torch.Tensor:
        """The decoder alone: codes · W_dec + b_dec (sparse codes never become dense; they go
        through saetrain.kernels.ops, Triton where the device allows)."""
        if isinstance(codes, SparseCodes):
            partial = sparse_decode(codes.indices, codes.values, self.W_dec)
        else:
            partial = codes @ self.W_dec
        return self.sum_over_latents(partial) + self.b_dec

    def reconstruct(self, x: torch.Tensor, codes: Codes) -> torch.Tensor:
        """Decoder output plus the skip connection (skip transcoders) for input rows x."""
        out = self.decode(codes)
        if self.W_skip is not None:
            out = out + x @ self.W_skip.T
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction (or, for a transcoder, prediction) from x; any leading shape."""
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.d_in).to(self.W_enc.dtype)
        out = self.reconstruct(rows, self.encode(rows))
        return out.reshape(*lead, self.d_out).to(x.dtype)

    def decoder_norms(self) -> torch.Tensor:
        return self.W_dec.norm(dim=1)

    def input_directions(self) -> torch.Tensor:
        """[n_latents, d_in]: each latent's direction in the space it reads. An SAE's decoder row
        (what the latent writes where it reads); a transcoder writes to another site, so its
        encoder column (what the latent reads). Usefulness suites compare probes with these."""
        return self.W_enc.T if self.transcoder else self.W_dec

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
    def fold_input_scale(self, scale_in: Scale, scale_out: Scale) -> None:
        """Make a dictionary trained on (s_in·x → s_out·y) work on raw (x → y).

        Decoding with W_dec/s_out, b_dec/s_out (and W_skip·s_in/s_out) gives y's raw scale. An
        SAE's encoder then sees (x − b_dec/s_out)·(s_in·W_enc); for it to equal the normalised
        model's (s_in·x − b_dec)·W_enc, the encoder biases absorb (s_in/s_out − 1)·b_dec·W_enc, so
        the pre-activations — and the codes — are unchanged. A scale is one number, or one per
        input (output) column when the dictionary reads several sites, each scaled on its own.
        """
        if not isinstance(scale_in, torch.Tensor) and not isinstance(scale_out, torch.Tensor):
            ratio = scale_in / scale_out  # one number each: exact in double precision
            if self.apply_b_dec_to_input and scale_in != scale_out:
                self.absorb_input_shift((ratio - 1.0) * self.b_dec)
            self.W_enc *= scale_in
            skip_factor: Scale = ratio
        else:
            s_in = column_scales(scale_in, self.d_in, self.W_enc)
            scale_out = column_scales(scale_out, self.d_out, self.W_enc)
            if self.apply_b_dec_to_input and not torch.equal(s_in, scale_out):
                self.absorb_input_shift((s_in / scale_out - 1.0) * self.b_dec)
            self.W_enc *= s_in[:, None]
            skip_factor = s_in[None, :] / scale_out[:, None]
        self.W_dec /= scale_out
        self.b_dec /= scale_out
        if self.W_skip is not None:
            self.W_skip *= skip_factor

    @torch.no_grad()
    def scale_latents_(self, factors: torch.Tensor) -> bool:
        """Multiply latent i's code by factors[i] and divide its decoder row by it: the same
        output, other decoder norms. False (nothing changed) where the architecture cannot."""
        self.W_enc *= factors
        self.b_enc *= factors
        self.W_dec /= factors[:, None]
        return True

    @torch.no_grad()
    def absorb_input_shift(self, delta: torch.Tensor) -> None:
        """Change the encoder biases so that input x − delta gives today's pre-activations of x."""
        self.b_enc += delta @ self.W_enc
