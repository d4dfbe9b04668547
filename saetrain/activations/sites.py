"""Activation sites: names like ``resid_post.12`` resolved to a module and a hook point.

A *site* is a place in a transformer block where a dictionary reads (or writes) activations.
Names follow the convention in DESIGN.md: ``resid_pre.L``, ``resid_post.L``, ``mlp_in.L``,
``mlp_out.L``, ``attn_out.L``. Each HuggingFace model family stores its blocks and sub-modules
under different attribute names, so resolution goes through a small per-family table keyed by
``config.model_type``. Every site maps to either the first input of a module (forward pre-hook)
or the output of a module (forward hook), and :func:`register_site_hook` lets a callback read or
replace the activation there, which is all that capture (activation source) and splicing
(CE/KL evaluation) need.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

SITE_KINDS: tuple[str, ...] = ("resid_pre", "resid_post", "mlp_in", "mlp_out", "attn_out")

Point = Literal["input", "output"]

_SITE_RE = re.compile(r"^([a-z_]+)\.(\d+)$")

# TransformerLens / SAELens hook names, so exported cfg.json can carry `hook_name`.
_TL_HOOK_NAMES: dict[str, str] = {
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "resid_post": "blocks.{L}.hook_resid_post",
    "mlp_in": "blocks.{L}.ln2.hook_normalized",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "attn_out": "blocks.{L}.hook_attn_out",
}


class SiteError(ValueError):
    """A site name, layer or model family that cannot be resolved (message names valid choices)."""


def _site_format_help() -> str:
    return f"expected the form '<kind>.<layer>' with kind one of {', '.join(SITE_KINDS)}"


@dataclass(frozen=True)
class Site:
    """A named activation site: a kind (see ``SITE_KINDS``) at a block index ``layer``."""

    kind: str
    layer: int

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise SiteError(f"unknown site kind {self.kind!r}: {_site_format_help()}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise SiteError(f"site layer must be an int >= 0, got {self.layer!r}")

    @property
    def name(self) -> str:
        """The canonical string form, e.g. ``"resid_post.12"`` (used in configs and file names)."""
        return f"{self.kind}.{self.layer}"

    @classmethod
    def parse(cls, name: str) -> Site:
        """Parse ``"<kind>.<layer>"`` from a config string; raise SiteError naming valid kinds."""
        match = _SITE_RE.match(name.strip()) if isinstance(name, str) else None
        if match is None:
            raise SiteError(f"invalid site {name!r}: {_site_format_help()}")
        kind, layer = match.group(1), int(match.group(2))
        if kind not in SITE_KINDS:
            raise SiteError(f"invalid site {name!r}: unknown kind {kind!r}; {_site_format_help()}")
        return cls(kind, layer)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class FamilySpec:
    """Where one model family keeps its blocks and, per site kind, which sub-module to hook.

    ``layers`` is the attribute path from the ``*ForCausalLM`` model to the ``nn.ModuleList`` of
    blocks. ``sites`` maps a site kind to ``(path inside the block, point)``; an empty path means
    the block itself.
    """

    layers: str
    sites: dict[str, tuple[str, Point]]


_LLAMA = FamilySpec(
    layers="model.layers",
    sites={
        "resid_pre": ("", "input"),
        "resid_post": ("", "output"),
        "mlp_in": ("post_attention_layernorm", "output"),
        "mlp_out": ("mlp", "output"),
        "attn_out": ("self_attn", "output"),
    },
)
# Gemma 2/3 normalise the attention and MLP outputs before the residual add, and the MLP input
# comes from a separate pre-feedforward norm: the hooked outputs are what enters the residual.
_GEMMA = FamilySpec(
    layers="model.layers",
    sites={
        "resid_pre": ("", "input"),
        "resid_post": ("", "output"),
        "mlp_in": ("pre_feedforward_layernorm", "output"),
        "mlp_out": ("post_feedforward_layernorm", "output"),
        "attn_out": ("post_attention_layernorm", "output"),
    },
)
_GPT2 = FamilySpec(
    layers="transformer.h",
    sites={
        "resid_pre": ("", "input"),
        "resid_post": ("", "output"),
        "mlp_in": ("ln_2", "output"),
        "mlp_out": ("mlp", "output"),
        "attn_out": ("attn", "output"),
    },
)
_GPT_NEOX = FamilySpec(
    layers="gpt_neox.layers",
    sites={
        "resid_pre": ("", "input"),
        "resid_post": ("", "output"),
        "mlp_in": ("post_attention_layernorm", "output"),
        "mlp_out": ("mlp", "output"),
        "attn_out": ("attention", "output"),
    },
)

SUPPORTED_FAMILIES: dict[str, FamilySpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "gpt2": _GPT2,
    "gpt_neox": _GPT_NEOX,
}


def model_family(model: nn.Module) -> str:
    """Return ``model.config.model_type`` if sites are defined for it, else raise SiteError.

    The check happens once, up front, so an unsupported model fails before any data is loaded.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise SiteError(
            f"unsupported model family (config.model_type={model_type!r}); "
            f"supported model_types: {', '.join(sorted(SUPPORTED_FAMILIES))}"
        )
    return model_type


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split(".") if path else ():
        obj = getattr(obj, part)
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the ``nn.ModuleList`` of transformer blocks (to count layers and to hook them).

    Accepts the causal-LM model (e.g. ``LlamaForCausalLM``); the bare base model (``LlamaModel``,
    ``GPT2Model``) works too, since it holds the same list one attribute level up.
    """
    spec = SUPPORTED_FAMILIES[model_family(model)]
    prefix, _, last = spec.layers.rpartition(".")
    for path in (spec.layers, last):
        try:
            layers = _get_path(model, path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return layers
    raise SiteError(
        f"cannot find the transformer blocks of {type(model).__name__} at '{spec.layers}' "
        f"(model_type={model.config.model_type!r})"
    )


def num_layers(model: nn.Module) -> int:
    """Number of transformer blocks, i.e. valid site layers are ``0 .. num_layers(model) - 1``."""
    return len(decoder_layers(model))


@dataclass(frozen=True)
class ResolvedSite:
    """A site bound to a concrete module of a concrete model.

    ``point`` says whether the activation is the module's first input (``"input"``) or its output
    (``"output"``, the first element when the output is a tuple). ``layer_index`` is the block
    index, which lets the activation source stop the forward after the deepest site.
    ``tl_hook_name`` is the equivalent TransformerLens/SAELens hook name, for export.
    """

    site: Site
    module: nn.Module
    point: Point
    layer_index: int
    tl_hook_name: str


def resolve_site(model: nn.Module, name: str | Site) -> ResolvedSite:
    """Map a site name to the module and hook point that hold that activation in ``model``.

    Raises SiteError for a malformed name, an unsupported family, or a layer out of range.
    """
    site = name if isinstance(name, Site) else Site.parse(name)
    spec = SUPPORTED_FAMILIES[model_family(model)]
    layers = decoder_layers(model)
    n = len(layers)
    if site.layer >= n:
        raise SiteError(
            f"site {site.name!r}: layer {site.layer} is out of range; the model has {n} layers, "
            f"valid layers are 0..{n - 1}"
        )
    path, point = spec.sites[site.kind]
    block = layers[site.layer]
    try:
        module = _get_path(block, path)
    except AttributeError as err:
        raise SiteError(
            f"site {site.name!r}: block {site.layer} ({type(block).__name__}) has no sub-module "
            f"'{path}' (model_type={model.config.model_type!r})"
        ) from err
    return ResolvedSite(
        site=site,
        module=module,
        point=point,
        layer_index=site.layer,
        tl_hook_name=_TL_HOOK_NAMES[site.kind].format(L=site.layer),
    )


def _check_replacement(site: Site, old: Tensor, new: Any) -> Tensor:
    if not isinstance(new, Tensor):
        raise TypeError(
            f"site hook for {site.name!r} must return a Tensor or None, got {type(new).__name__}"
        )
    if new.shape != old.shape:
        raise ValueError(
            f"site hook for {site.name!r} returned shape {tuple(new.shape)}, "
            f"expected {tuple(old.shape)}"
        )
    return new.to(dtype=old.dtype, device=old.device)


def register_site_hook(
    resolved: ResolvedSite, fn: Callable[[Tensor], Tensor | None]
) -> RemovableHandle:
    """Call ``fn`` with the activation ``[batch, seq, d]`` at a site on every forward.

    This is the single hook primitive for both reading activations (``fn`` returns None) and
    splicing a dictionary into the LM (``fn`` returns a tensor of the same shape, which replaces
    the activation; it is cast to the activation's dtype/device). Only the activation is
    replaced: other positional arguments, keyword arguments and the remaining elements of a tuple
    output are passed through unchanged. Exceptions raised by ``fn`` propagate, so a callback
    may raise to stop the forward early. Returns the handle; call ``.remove()`` to detach.
    """
    site = resolved.site

    if resolved.point == "input":

        def pre_hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            if args and isinstance(args[0], Tensor):
                new = fn(args[0])
                if new is None:
                    return None
                return (_check_replacement(site, args[0], new), *args[1:]), kwargs
            x = kwargs.get("hidden_states")
            if not isinstance(x, Tensor):
                raise SiteError(
                    f"site {site.name!r}: {type(module).__name__} received no tensor as its first "
                    "positional argument nor as kwargs['hidden_states']"
                )
            new = fn(x)
            if new is None:
                return None
            return args, {**kwargs, "hidden_states": _check_replacement(site, x, new)}

        return resolved.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def fwd_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if isinstance(output, Tensor):
            new = fn(output)
            return None if new is None else _check_replacement(site, output, new)
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            new = fn(output[0])
            if new is None:
                return None
            replaced = (_check_replacement(site, output[0], new), *output[1:])
            return list(replaced) if isinstance(output, list) else replaced
        raise SiteError(
            f"site {site.name!r}: cannot find the activation in the output of "
            f"{type(module).__name__} (got {type(output).__name__})"
        )

    return resolved.module.register_forward_hook(fwd_hook)


__all__ = [
    "SITE_KINDS",
    "SUPPORTED_FAMILIES",
    "FamilySpec",
    "ResolvedSite",
    "Site",
    "SiteError",
    "decoder_layers",
    "model_family",
    "num_layers",
    "register_site_hook",
    "resolve_site",
]
