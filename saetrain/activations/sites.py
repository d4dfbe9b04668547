"""Activation sites: names like ``resid_post.12`` resolved to a module and a hook point.

A *site* is a place in a transformer block where a dictionary reads (or writes) activations.
Names follow the convention in DESIGN.md: ``resid_pre.L``, ``attn_z.L``, ``attn_out.L``,
``resid_mid.L``, ``mlp_in.L``, ``mlp_out.L``, ``resid_post.L``; the TransformerLens / SAELens
spellings of the same tensors (``blocks.L.hook_resid_post``, ``blocks.L.attn.hook_z``, ...) are
accepted as aliases. Each HuggingFace model family stores its blocks and sub-modules under
different attribute names, so resolution goes through a small per-family table keyed by
``config.model_type``. Every site maps to the first input of a module (forward pre-hook), the
output of a module (forward hook), or, for ``resid_mid``, the residual stream right after the
attention's contribution is added (no module holds that sum, so it is formed from the block's
residual input and the attention output). :func:`register_site_hook` lets a callback read or
replace the activation there, which is all that capture (activation source) and splicing (CE/KL
evaluation) need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor, nn

from saetrain.errors import SiteError
from saetrain.planning.site_names import (  # noqa: F401 (re-exported: the activations' names)
    SITE_KINDS,
    Point,
    Site,
    canonical_site_name,
    forward_position,
)


@dataclass(frozen=True)
class FamilySpec:
    """Where one model family keeps its blocks and, per site kind, which sub-module to hook.

    ``layers`` is the attribute path from the ``*ForCausalLM`` model to the ``nn.ModuleList`` of
    blocks. ``sites`` maps a site kind to ``(path inside the block, point)``; an empty path means
    the block itself. ``residual_in`` is the sub-module whose first input is the residual stream
    that entered the block (the attention's norm), from which ``resid_mid`` is formed.
    ``parallel_residual`` names a config flag that, when true, makes attention and MLP read the
    same residual in parallel, so there is no ``resid_mid``.
    """

    layers: str
    sites: dict[str, tuple[str, Point]]
    residual_in: str
    parallel_residual: str | None = None


# resid_mid is the attention's contribution (the module that attn_out hooks) added to the block's
# input; attn_z is the input of the attention's output projection, [.., n_heads * head_dim].
_LLAMA = FamilySpec(
    layers="model.layers",
    sites={
        "resid_pre": ("", "input"),
        "attn_z": ("self_attn.o_proj", "input"),
        "attn_out": ("self_attn", "output"),
        "resid_mid": ("self_attn", "residual"),
        "mlp_in": ("post_attention_layernorm", "output"),
        "mlp_out": ("mlp", "output"),
        "resid_post": ("", "output"),
    },
    residual_in="input_layernorm",
)
# Gemma 2/3 normalise the attention and MLP outputs before the residual add, and the MLP input
# comes from a separate pre-feedforward norm: the hooked outputs are what enters the residual.
_GEMMA = FamilySpec(
    layers="model.layers",
    sites={
        "resid_pre": ("", "input"),
        "attn_z": ("self_attn.o_proj", "input"),
        "attn_out": ("post_attention_layernorm", "output"),
        "resid_mid": ("post_attention_layernorm", "residual"),
        "mlp_in": ("pre_feedforward_layernorm", "output"),
        "mlp_out": ("post_feedforward_layernorm", "output"),
        "resid_post": ("", "output"),
    },
    residual_in="input_layernorm",
)
_GPT2 = FamilySpec(
    layers="transformer.h",
    sites={
        "resid_pre": ("", "input"),
        "attn_z": ("attn.c_proj", "input"),
        "attn_out": ("attn", "output"),
        "resid_mid": ("attn", "residual"),
        "mlp_in": ("ln_2", "output"),
        "mlp_out": ("mlp", "output"),
        "resid_post": ("", "output"),
    },
    residual_in="ln_1",
)
_GPT_NEOX = FamilySpec(
    layers="gpt_neox.layers",
    sites={
        "resid_pre": ("", "input"),
        "attn_z": ("attention.dense", "input"),
        "attn_out": ("attention", "output"),
        "resid_mid": ("attention", "residual"),
        "mlp_in": ("post_attention_layernorm", "output"),
        "mlp_out": ("mlp", "output"),
        "resid_post": ("", "output"),
    },
    residual_in="input_layernorm",
    parallel_residual="use_parallel_residual",
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

    ``point`` says whether the activation is the module's first input (``"input"``), its output
    (``"output"``, the first element when the output is a tuple), or its output added to the
    first input of ``residual_in`` (``"residual"``: the residual stream after that module's
    contribution). ``layer_index`` is the block index, which lets the activation source stop the
    forward after the deepest site. ``tl_hook_name`` is the equivalent TransformerLens/SAELens
    hook name, for export. ``width`` is the activation's last dimension: ``hidden_size``, except
    ``attn_z`` (n_heads × head_dim, which differs on e.g. Gemma 2 and Qwen 3).
    """

    site: Site
    module: nn.Module
    point: Point
    layer_index: int
    tl_hook_name: str
    width: int = 0
    residual_in: nn.Module | None = None


def _input_width(module: nn.Module) -> int | None:
    """Input features of a projection: nn.Linear's, or GPT-2's transposed Conv1D's (`nx`)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    nx = getattr(module, "nx", None)
    return int(nx) if isinstance(nx, int) else None


def check_site_exists(family: str, config: Any, site: Site) -> None:
    """Raise SiteError for a site this model's architecture does not have (``resid_mid`` of a
    parallel-residual GPT-NeoX); needs only the model's config, so it runs before weights load."""
    spec = SUPPORTED_FAMILIES[family]
    if (
        site.kind == "resid_mid"
        and spec.parallel_residual
        and getattr(config, spec.parallel_residual, False)
    ):
        raise SiteError(
            f"site {site.name!r}: this {family} model has {spec.parallel_residual}=true (Pythia's "
            "default): attention and MLP both read resid_pre and are added to it together, so no "
            "residual stream exists between them; use resid_pre, attn_out, mlp_in, mlp_out or "
            "resid_post"
        )


def resolve_site(model: nn.Module, name: str | Site) -> ResolvedSite:
    """Map a site name to the module and hook point that hold that activation in ``model``.

    Raises SiteError for a malformed name, an unsupported family, a layer out of range, or a site
    the model's architecture does not have (``resid_mid`` of a parallel-residual GPT-NeoX).
    """
    site = name if isinstance(name, Site) else Site.parse(name)
    family = model_family(model)
    spec = SUPPORTED_FAMILIES[family]
    layers = decoder_layers(model)
    n = len(layers)
    if site.layer >= n:
        raise SiteError(
            f"site {site.name!r}: layer {site.layer} is out of range; the model has {n} layers, "
            f"valid layers are 0..{n - 1}"
        )
    config = model.config
    check_site_exists(family, config, site)
    path, point = spec.sites[site.kind]
    block = layers[site.layer]
    residual_in = None
    try:
        module = _get_path(block, path)
        if point == "residual":
            path = spec.residual_in
            residual_in = _get_path(block, path)
    except AttributeError as err:
        raise SiteError(
            f"site {site.name!r}: block {site.layer} ({type(block).__name__}) has no sub-module "
            f"'{path}' (model_type={config.model_type!r})"
        ) from err
    width = _input_width(module) if site.kind == "attn_z" else None
    if width is None:
        width = int(config.hidden_size)
    return ResolvedSite(
        site=site,
        module=module,
        point=point,
        layer_index=site.layer,
        tl_hook_name=site.tl_hook_name,
        width=width,
        residual_in=residual_in,
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


class SiteHandle(Protocol):
    """What :func:`register_site_hook` returns: ``.remove()`` detaches every hook it added."""

    def remove(self) -> None: ...


class _Handles:
    """Several hook handles removed as one (a residual site needs two hooks)."""

    def __init__(self, *handles: SiteHandle):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _first_input(site: Site, module: nn.Module, args: tuple[Any, ...], kwargs: dict) -> Tensor:
    """A module's activation input: its first positional tensor, or kwargs['hidden_states']."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    x = kwargs.get("hidden_states")
    if not isinstance(x, Tensor):
        raise SiteError(
            f"site {site.name!r}: {type(module).__name__} received no tensor as its first "
            "positional argument nor as kwargs['hidden_states']"
        )
    return x


def _output_activation(site: Site, module: nn.Module, output: Any) -> Tensor:
    """A module's activation output: the tensor, or the first element of a tuple / list."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise SiteError(
        f"site {site.name!r}: cannot find the activation in the output of "
        f"{type(module).__name__} (got {type(output).__name__})"
    )


def _replace_output(output: Any, new: Tensor) -> Any:
    """`output` with its activation replaced; the rest of a tuple / list passes through."""
    if isinstance(output, Tensor):
        return new
    replaced = (new, *output[1:])
    return list(replaced) if isinstance(output, list) else replaced


def register_site_hook(resolved: ResolvedSite, fn: Callable[[Tensor], Tensor | None]) -> SiteHandle:
    """Call ``fn`` with the activation ``[batch, seq, width]`` at a site on every forward.

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
            x = _first_input(site, module, args, kwargs)
            new = fn(x)
            if new is None:
                return None
            new = _check_replacement(site, x, new)
            if args and args[0] is x:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return resolved.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    if resolved.point == "output":

        def fwd_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            x = _output_activation(site, module, output)
            new = fn(x)
            return (
                None if new is None else _replace_output(output, _check_replacement(site, x, new))
            )

        return resolved.module.register_forward_hook(fwd_hook)

    return _register_residual_hook(resolved, fn)


def _register_residual_hook(
    resolved: ResolvedSite, fn: Callable[[Tensor], Tensor | None]
) -> SiteHandle:
    """The residual stream after a module's contribution: the block's residual input (read where
    the attention's norm receives it) plus the module's output, the same sum the block forms
    next. A replacement r' is written back as the contribution c + (r' − r), so the block's own
    add yields r' (exactly r when r' is r)."""
    site, residual_in = resolved.site, resolved.residual_in
    assert residual_in is not None, f"site {site.name!r}: a residual site needs residual_in"
    before: list[Tensor] = []

    def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        before[:] = [_first_input(site, module, args, kwargs)]

    def add_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not before:
            raise SiteError(
                f"site {site.name!r}: {type(module).__name__} ran before the block's residual "
                f"reached {type(residual_in).__name__}"
            )
        contribution = _output_activation(site, module, output)
        residual = before.pop() + contribution
        new = fn(residual)
        if new is None:
            return None
        new = _check_replacement(site, residual, new)
        return _replace_output(output, contribution + (new - residual))

    first = residual_in.register_forward_pre_hook(grab, with_kwargs=True)
    return _Handles(first, resolved.module.register_forward_hook(add_hook))


__all__ = [
    "SITE_KINDS",
    "SUPPORTED_FAMILIES",
    "check_site_exists",
    "FamilySpec",
    "ResolvedSite",
    "Site",
    "SiteError",
    "SiteHandle",
    "canonical_site_name",
    "decoder_layers",
    "forward_position",
    "model_family",
    "num_layers",
    "register_site_hook",
    "resolve_site",
]
