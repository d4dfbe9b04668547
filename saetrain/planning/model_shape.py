"""The numbers of a model that configs are checked against (layers, widths, context), read from
its transformers config alone: preflight fills it, the checks of latent sharding read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from saetrain.planning.site_names import Site


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a model that configs are checked against, read from its config alone."""

    model_type: str
    n_layers: int
    d_model: int
    # Width of the concatenated per-head attention outputs (attn_z): heads × head_dim.
    attn_z_width: int
    max_positions: int | None
    # The transformers config itself, for architecture flags (e.g. a parallel residual).
    config: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, config: Any) -> ModelShape:
        heads = getattr(config, "num_attention_heads", None)
        d_model = int(config.hidden_size)
        head_dim = getattr(config, "head_dim", None) or (d_model // heads if heads else d_model)
        return cls(
            model_type=str(getattr(config, "model_type", None)),
            n_layers=int(config.num_hidden_layers),
            d_model=d_model,
            attn_z_width=int(heads * head_dim) if heads else d_model,
            max_positions=getattr(config, "max_position_embeddings", None),
            config=config,
        )

    def width(self, site: Site) -> int:
        """The width of the activation at `site` (d_model but for attn_z)."""
        return self.attn_z_width if site.kind == "attn_z" else self.d_model
