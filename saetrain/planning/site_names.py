"""Site names: the grammar of `resid_post.12` and its TransformerLens spelling
(`blocks.12.hook_resid_post`), canonical names, and the order a block computes its sites.

Part of the config language, so it sits below the components: planning checks and expands site
names before any model loads, and saetrain/activations/sites.py resolves them to modules and hooks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from saetrain.errors import SiteError

# In the order a block computes them (see forward_position).
SITE_KINDS: tuple[str, ...] = (
    "resid_pre",
    "attn_z",
    "attn_out",
    "resid_mid",
    "mlp_in",
    "mlp_out",
    "resid_post",
)

# "residual": the module's output added to the residual stream that entered the block.
Point = Literal["input", "output", "residual"]

_SITE_RE = re.compile(r"^([a-z_]+)\.(\d+)$")
_TL_RE = re.compile(r"^blocks\.(\d+)\.([a-z0-9_.]+)$")

# TransformerLens / SAELens hook names (the part after `blocks.L.`) of the same tensors: exported
# cfg.json carries them as `hook_name`, and configs may use them instead of ours. Only names that
# mean the same tensor in every supported family are here, with one difference made good at the
# edges: `ln2.hook_normalized` fires before the MLP norm's affine, our `mlp_in` after it, so a
# dictionary on it is saved for the former and loaded back for the latter (export/norm_space.py).
# TransformerLens's `hook_mlp_in` /
# `hook_attn_in` (copies of the residual that feed one branch only) and the TransformerBridge's
# `mlp.hook_out` / `attn.hook_out` (before Gemma's post-norms) are not.
_TL_HOOKS: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "attn_z": "attn.hook_z",
    "attn_out": "hook_attn_out",
    "resid_mid": "hook_resid_mid",
    "mlp_in": "ln2.hook_normalized",
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
}
_TL_HOOK_NAMES: dict[str, str] = {kind: f"blocks.{{L}}.{hook}" for kind, hook in _TL_HOOKS.items()}
_KIND_OF_TL_HOOK: dict[str, str] = {hook: kind for kind, hook in _TL_HOOKS.items()}


def _site_format_help() -> str:
    tl = ", ".join(_TL_HOOK_NAMES[kind].format(L="L") for kind in SITE_KINDS)
    return (
        f"expected the form '<kind>.<layer>' with kind one of {', '.join(SITE_KINDS)}, "
        f"or the TransformerLens hook name of one of them: {tl}"
    )


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

    @property
    def tl_hook_name(self) -> str:
        """The TransformerLens / SAELens hook name, e.g. ``"blocks.12.hook_resid_post"``."""
        return _TL_HOOK_NAMES[self.kind].format(L=self.layer)

    @classmethod
    def parse(cls, name: str) -> Site:
        """Parse ``"<kind>.<layer>"`` or a TransformerLens hook name (``"blocks.L.hook_..."``);
        raise SiteError naming both spellings of every kind."""
        text = name.strip() if isinstance(name, str) else None
        match = _SITE_RE.match(text) if text is not None else None
        if match is not None:
            kind, layer = match.group(1), int(match.group(2))
            if kind not in SITE_KINDS:
                raise SiteError(
                    f"invalid site {name!r}: unknown kind {kind!r}; {_site_format_help()}"
                )
            return cls(kind, layer)
        tl = _TL_RE.match(text) if text is not None else None
        if tl is not None:
            kind = _KIND_OF_TL_HOOK.get(tl.group(2))
            if kind is None:
                raise SiteError(
                    f"invalid site {name!r}: 'blocks.{tl.group(1)}.{tl.group(2)}' is not a "
                    f"TransformerLens hook saetrain reads; {_site_format_help()}"
                )
            return cls(kind, int(tl.group(1)))
        raise SiteError(f"invalid site {name!r}: {_site_format_help()}")

    def __str__(self) -> str:
        return self.name


def canonical_site_name(name: str) -> str:
    """``"blocks.6.hook_resid_post"`` → ``"resid_post.6"`` (our names unchanged), so configs,
    folder names and cache keys use one spelling; SiteError for a name that is neither."""
    return Site.parse(name).name


def forward_position(site: Site | str) -> tuple[int, int]:
    """(layer, order within the block) of a site: a transcoder's target must come after its
    input. The order is resid_pre, attn_z, attn_out, resid_mid, mlp_in, mlp_out, resid_post."""
    site = site if isinstance(site, Site) else Site.parse(site)
    return site.layer, SITE_KINDS.index(site.kind)


# Model diffing: model b's sites are named `<site>@b` beside model a's (activations/paired.py).
SECOND = "@b"


def in_second_model(site: str) -> bool:
    """Whether a site name reads model b (`resid_post.6@b`)."""
    return site.endswith(SECOND)


def base_site(site: str) -> str:
    """`resid_post.6@b` → `resid_post.6` (a name of model a unchanged)."""
    return site[: -len(SECOND)] if in_second_model(site) else site


def split_sites(sites: list[str]) -> tuple[list[str], list[str]]:
    """(model a's sites, model b's sites without the suffix), each in the given order."""
    return (
        [s for s in sites if not in_second_model(s)],
        [base_site(s) for s in sites if in_second_model(s)],
    )
