"""`mlp_in` dictionaries in TransformerLens's space: the MLP norm's affine folded in at export.

saetrain's `mlp_in.L` is what the MLP reads: the norm's output after its weight (and a
LayerNorm's bias), h = g(x)·a + c, with g the parameter-free RMS or layer normalisation. SAELens
names that site `blocks.L.ln2.hook_normalized`, but TransformerLens fires that hook on g(x),
*before* the affine (and folds a into W_in when it processes a model). A dictionary trained on h
and attached there would read the wrong tensor without any error.

So the SAELens folder of a dictionary whose input or target is `mlp_in` holds it rewritten for
z = g(x): W_enc·diag(a), the decoder divided by a, the biases shifted so that every
pre-activation, code and reconstruction is the same (`to_norm_space`). The affine (a, c) of each
side is kept beside it in `saetrain_norm_affine.safetensors`, and `load_dictionary` undoes the
fold (`from_norm_space`), so saetrain itself always works on the model's own tensors.

A zero in a (Gemma's 1 + weight with weight −1) keeps the input-side fold exact: the model's
channel is the constant c there, the rewritten encoder reads z's channel times zero, and undoing
it (zero for 1/0) gives a dictionary equal to the trained one on every tensor the model makes.
Only a target side needs 1/a (a decoder written for z would have to predict a channel the model
never passes on): that side, and both sides of an SAE (one tensor), stay on the model's tensors,
and cfg.json names the site by saetrain's name, not by the TransformerLens hook that would be
another tensor (`NormFold.honest_metadata`).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from saetrain.activations.sites import ResolvedSite
from saetrain.dictionaries import Dictionary
from saetrain.errors import NormFoldError
from saetrain.export.formats import folder_format

log = logging.getLogger(__name__)

NORM_FILE = "saetrain_norm_affine.safetensors"
# The site kinds whose TransformerLens hook sits before a norm's affine.
PRE_AFFINE_KINDS = ("mlp_in",)


# A scale this small against the largest is a zero: the channel carries nothing past the norm.
ZERO_SCALE = 1e-6


@dataclass(frozen=True)
class Affine:
    """h = z·scale + shift, per column: the model's tensor h from TransformerLens's z."""

    scale: torch.Tensor  # [d]
    shift: torch.Tensor  # [d]

    def zero_channels(self) -> list[int]:
        """The channels whose scale is zero: h is the constant shift there, whatever z."""
        size = self.scale.abs().max()
        return torch.nonzero(self.scale.abs() <= ZERO_SCALE * size).flatten().tolist()

    def inverse(self) -> Affine:
        """z from h; at a zero scale's channel (h constant, z lost) 0, so a dictionary rewritten
        with it reads that channel as the constant the model always has there."""
        zero = torch.zeros_like(self.scale, dtype=torch.bool)
        zero[self.zero_channels()] = True
        safe = torch.where(zero, torch.ones_like(self.scale), self.scale)
        scale = torch.where(zero, torch.zeros_like(self.scale), 1.0 / safe)
        return Affine(scale, torch.where(zero, torch.zeros_like(self.shift), -self.shift / safe))


def _channels(channels: list[int]) -> str:
    shown = ", ".join(str(c) for c in channels[:8])
    return f"channel{'s' if len(channels) > 1 else ''} {shown}{', …' if len(channels) > 8 else ''}"


def _probe_direction(d: int) -> torch.Tensor:
    """A float64 [d] vector with zero mean, unit RMS and no zero entry: both normalisations
    (RMS and layer norm) map a large multiple of it to itself. For an even d it is ±1, and with
    s = 2¹⁰ every step of the norm is exact in float32: the affine is read off bit for bit."""
    if d < 4:
        raise NormFoldError(f"cannot probe a norm of width {d} (at least 4)")
    u = torch.ones(d, dtype=torch.float64)
    even = d if d % 2 == 0 else d - 3
    u[1:even:2] = -1.0
    if even < d:
        u[even:] = torch.tensor([1.0, 1.0, -2.0], dtype=torch.float64)
    return u / u.pow(2).mean().sqrt()


def norm_affine(norm: nn.Module, d: int) -> Affine:
    """(a, c) of a norm module computing g(x)·a + c, read off the module by probing it.

    Probing, rather than reading `weight` / `bias`, covers every family's convention (Gemma's
    1 + weight, a LayerNorm's bias, none at all). g(s·u) = u for a large s and a zero-mean,
    unit-RMS u, so f(s·u) − f(−s·u) = 2u·a and f(s·u) + f(−s·u) = 2c. The result is then checked
    on random inputs against both normalisations; a norm that fits neither is refused.
    """
    probe = copy.deepcopy(norm).to(device="cpu", dtype=torch.float64).eval()
    u = _probe_direction(d)
    s = 1024.0  # eps (≤ 1e-5 in practice) then vanishes in the mean square (2²⁰)
    with torch.no_grad():
        plus, minus = probe(s * u[None])[0].double(), probe(-s * u[None])[0].double()
        scale, shift = (plus - minus) / (2 * u), (plus + minus) / 2
        x = torch.randn(8, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        x = 10.0 * x + 3.0  # an offset: tells RMS from layer normalisation
        got = probe(x).double()
    centred = x - x.mean(-1, keepdim=True)
    candidates = {
        "rms": x / x.pow(2).mean(-1, keepdim=True).sqrt(),
        "layer": centred / centred.pow(2).mean(-1, keepdim=True).sqrt(),
    }
    size = got.abs().max().item()
    for g in candidates.values():
        if (g * scale + shift - got).abs().max().item() <= 1e-4 * max(size, 1.0):
            return Affine(scale.float(), shift.float())
    raise NormFoldError(
        f"{type(norm).__name__} is not a normalisation followed by a per-column affine "
        "(neither RMS nor layer normalisation fits its output)"
    )


@torch.no_grad()
def to_norm_space(dictionary: Dictionary, inp: Affine | None, out: Affine | None) -> Dictionary:
    """A copy of `dictionary` that, fed z with x = z·a_in + c_in, gives the original's codes of x
    and predicts z_t with y = z_t·a_out + c_out: for TransformerLens's pre-affine tensors at the
    sides given (None: that side as is). A zero input scale is fine (that channel is read
    times zero); a zero target scale is refused: predicting z_t there would divide by it."""
    if getattr(dictionary, "kind", "single") != "single":
        raise NormFoldError(f"a {dictionary.kind} dictionary is not rewritten (single only)")
    if out is not None and (zero := out.zero_channels()):
        raise NormFoldError(
            f"the target norm has a zero scale at {_channels(zero)}: a decoder for the tensor "
            "before the scale would have to divide by it"
        )
    d = copy.deepcopy(dictionary)
    like = d.W_enc
    c_in = inp.shift.to(like) if inp is not None else torch.zeros(d.d_in).to(like)
    c_out = out.shift.to(like) if out is not None else torch.zeros(d.d_out).to(like)
    # 1. Shifts: x' = x − c_in in, y' = y − c_out out.
    b_dec_before = d.b_dec.detach().clone()
    d.b_dec -= c_out
    if d.W_skip is not None:  # y += x·W_skipᵀ = x'·W_skipᵀ + c_in·W_skipᵀ
        d.b_dec += c_in @ d.W_skip.T
    encoder_shift = c_in.clone()
    if d.apply_b_dec_to_input:  # the encoder reads x − b_dec: the new b_dec moved it too
        encoder_shift += d.b_dec - b_dec_before
    if bool(encoder_shift.any()):
        d.absorb_input_shift(encoder_shift)
    # 2. Scales: x' = z·a_in, y' = z_t·a_out is the normalisation fold_input_scale undoes.
    ones_in, ones_out = torch.ones(d.d_in), torch.ones(d.d_out)
    scale_in = inp.scale if inp is not None else ones_in
    scale_out = out.scale if out is not None else ones_out
    d.fold_input_scale(scale_in.to(like), scale_out.to(like))
    return d


def from_norm_space(dictionary: Dictionary, inp: Affine | None, out: Affine | None) -> Dictionary:
    """The inverse of `to_norm_space` with the same affines: back to the model's tensors (a
    zero input scale's channel is then read as the model's constant there: exact on every
    tensor the model makes)."""
    return to_norm_space(
        dictionary, inp.inverse() if inp is not None else None, out.inverse() if out else None
    )


def affine_tensors(inp: Affine | None, out: Affine | None) -> dict[str, torch.Tensor]:
    """The sidecar file's tensors: `input.scale`, `input.shift`, `target.*` for the sides given."""
    tensors = {}
    for side, affine in (("input", inp), ("target", out)):
        if affine is not None:
            # Copies: an SAE's two sides are one affine, and safetensors refuses shared storage.
            tensors[f"{side}.scale"] = affine.scale.detach().float().cpu().clone()
            tensors[f"{side}.shift"] = affine.shift.detach().float().cpu().clone()
    return tensors


def read_affines(folder: Path) -> tuple[Affine | None, Affine | None] | None:
    """(input, target) affines of a folder written with them, or None when it has no sidecar."""
    path = Path(folder) / NORM_FILE
    if not path.is_file():
        return None
    t = load_file(path, device="cpu")

    def side(name: str) -> Affine | None:
        if f"{name}.scale" not in t:
            return None
        return Affine(t[f"{name}.scale"], t[f"{name}.shift"])

    return side("input"), side("target")


def site_affine(module: nn.Module, kind: str, width: int) -> Affine | None:
    """The affine to fold for a site of this kind read at `module`'s output, or None."""
    return norm_affine(module, width) if kind in PRE_AFFINE_KINDS else None


@dataclass(frozen=True)
class NormFold:
    """What `save_dictionary` folds for a trained dictionary, and what it cannot.

    `inp` / `out`: the affines folded at the input and target sides (None: that side is saved on
    the model's tensor); `unfolded`: each side read before a norm's affine in TransformerLens but
    saved on the model's tensor, with why — its hook name would mean another tensor.
    """

    inp: Affine | None = None
    out: Affine | None = None
    unfolded: dict[str, str] = field(default_factory=dict)

    @property
    def affines(self) -> tuple[Affine | None, Affine | None] | None:
        return (self.inp, self.out) if self.inp is not None or self.out is not None else None

    def honest_metadata(
        self, metadata: dict[str, Any], inputs: list[ResolvedSite], targets: list[ResolvedSite]
    ) -> dict[str, Any]:
        """cfg.json's metadata with each unfolded side named by its saetrain site (`mlp_in.12`),
        not by the TransformerLens hook that fires on the tensor before the norm's scale, and the
        reason in `saetrain_hook_not_transformer_lens` (the model card prints it)."""
        if not self.unfolded:
            return metadata
        metadata = dict(metadata)
        for side, key, sites in (
            ("input", "hook_name", inputs),
            ("target", "hook_name_out", targets),
        ):
            if side in self.unfolded and key in metadata:
                metadata[key] = sites[0].site.name
        metadata["saetrain_hook_not_transformer_lens"] = dict(self.unfolded)
        return metadata


def _side_affine(
    site: ResolvedSite, width: int, side: str, unfolded: dict[str, str]
) -> Affine | None:
    """The site's affine, or None (recorded in `unfolded`) for a module that is not a norm."""
    try:
        return site_affine(site.module, site.site.kind, width)
    except NormFoldError as e:
        unfolded[side] = str(e)
        return None


def export_fold(
    dictionary: Dictionary, inputs: list[ResolvedSite], targets: list[ResolvedSite]
) -> NormFold:
    """What `save_dictionary` folds for a trained dictionary (see NormFold); what it cannot
    fold is reported.

    Only single-site dictionaries, the ones SAELens loads; a crosscoder's or CLT's layout is
    saetrain's own and keeps the model's tensors. An input side is folded whenever its module is
    a norm (a zero scale included); a target side only where no scale is zero; an SAE (one tensor
    in and out) on both sides or neither.
    """
    fold = _plan(dictionary, inputs, targets)
    for side, sites in (("input", inputs), ("target", targets)):
        if side in fold.unfolded:
            site = sites[0]
            log.warning(
                "%s (%s side) is saved on the model's own tensors and named %s in cfg.json, not "
                "TransformerLens's %s (another tensor): %s",
                site.site.name, side, site.site.name, site.tl_hook_name, fold.unfolded[side],
            )  # fmt: skip
    return fold


def _plan(
    dictionary: Dictionary, inputs: list[ResolvedSite], targets: list[ResolvedSite]
) -> NormFold:
    if dictionary.multi_site or len(inputs) != 1 or len(targets) != 1:
        return NormFold()
    src, dst = inputs[0], targets[0]
    unfolded: dict[str, str] = {}
    inp = _side_affine(src, dictionary.d_in, "input", unfolded)
    sae = dst.module is src.module and dst.site == src.site
    if sae:
        out = inp
        if "input" in unfolded:
            unfolded["target"] = unfolded["input"]
    else:
        out = _side_affine(dst, dictionary.d_out, "target", unfolded)
    if out is not None and (zero := out.zero_channels()):
        reason = (
            f"{dst.site.name}'s norm has a zero scale at {_channels(zero)}: the tensor before the "
            "scale carries what the model drops there, which no dictionary trained on the "
            "model's tensor can predict"
        )
        unfolded["target"] = reason
        out = None
        if sae:  # one tensor: folding the input alone would make it a transcoder of two tensors
            unfolded["input"], inp = reason, None
    return NormFold(inp, out, unfolded)


def export_affines(
    dictionary: Dictionary, inputs: list[ResolvedSite], targets: list[ResolvedSite]
) -> tuple[Affine | None, Affine | None] | None:
    """The (input, target) affines that rewrite between the model's tensors and
    TransformerLens's exactly both ways (no zero scale on either side: another tool's
    dictionary reads the channel the norm drops), or None; a norm that does not allow it is
    reported."""
    fold = _plan(dictionary, inputs, targets)
    why = next(iter(fold.unfolded.values()), None)
    if why is None and fold.inp is not None and (zero := fold.inp.zero_channels()):
        why = (
            f"{inputs[0].site.name}'s norm has a zero scale at {_channels(zero)}: the tensor "
            "before it cannot be recovered from the model's"
        )
    if why is not None:
        log.warning(
            "%s is read on the model's own tensors, not TransformerLens's %s: %s",
            inputs[0].site.name, inputs[0].tl_hook_name, why,
        )  # fmt: skip
        return None
    return fold.affines


def foreign_to_model_space_(
    dictionary: Dictionary, folder: Path, inputs: list[ResolvedSite], targets: list[ResolvedSite]
) -> bool:
    """Rewrite, in place, another tool's dictionary saved at a TransformerLens hook before a
    norm's affine (`ln2.hook_normalized`: it reads g(x)) for the norm's output that saetrain
    feeds it, with this model's norm. saetrain's own folders are left alone: a folded one carries
    its affine (undone by `load_dictionary`), an older one was saved on the model's tensors.
    Returns whether it was rewritten. sparsify's and dictionary_learning's folders hook the model's
    own modules (the MLP's input is the norm's output): left alone too."""
    if folder_format(folder) != "saelens":
        return False
    cfg = json.loads((Path(folder) / "cfg.json").read_text())
    meta = cfg.get("metadata") or {}
    if "saetrain_site" in meta or read_affines(folder) is not None:
        return False
    affines = export_affines(dictionary, inputs, targets)
    if affines is None:
        return False
    dictionary.load_state_dict(from_norm_space(dictionary, *affines).state_dict())
    log.info(
        "%s: read at TransformerLens's %s (before the norm's weight); rewritten for %s",
        folder, inputs[0].tl_hook_name, inputs[0].site.name,
    )  # fmt: skip
    return True
