"""Two LMs read on the same tokens, as one source: the model-diffing crosscoder's input.

A base model and its fine-tuned version (or any two models that share a tokenizer) run on each
token batch; model b's sites are named `<site>@b` (`resid_post.6@b`) beside model a's, so rows,
buffer, cache and dictionaries see one source with more sites. Each model's forward stops after
its own deepest site.
"""

from __future__ import annotations

from typing import Any

import torch

from saetrain.activations.sites import ResolvedSite
from saetrain.activations.source import ActivationSource
from saetrain.errors import ConfigError
from saetrain.planning.site_names import (  # noqa: F401 (re-exported)
    SECOND,
    base_site,
    in_second_model,
    split_sites,
)


class PairedSource(ActivationSource):
    """ActivationSource's interface over two models (see the module docstring)."""

    def __init__(self, a: ActivationSource, b: ActivationSource):
        self.a, self.b = a, b
        self.model = a.model
        self.device = a.device
        self.d_model = a.d_model
        self.sites: dict[str, ResolvedSite] = dict(a.sites) | {
            name + SECOND: resolved for name, resolved in b.sites.items()
        }
        self.widths = {name: resolved.width for name, resolved in self.sites.items()}

    @property
    def models(self) -> list[torch.nn.Module]:
        return [self.a.model, self.b.model]

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        acts = self.a(input_ids) if self.a.sites else {}
        if self.b.sites:
            acts |= {name + SECOND: t.to(self.device) for name, t in self.b(input_ids).items()}
        return acts


def check_same_tokenizer(a: Any, b: Any, name_a: str, name_b: str) -> None:
    """Refuse two models whose tokenizers differ: the same token ids must mean the same text."""

    if a.get_vocab() != b.get_vocab():
        raise ConfigError(
            f"model_b.name={name_b!r} has another tokenizer than model.name={name_a!r} "
            f"({len(b.get_vocab())} vs {len(a.get_vocab())} tokens, or other ids): model diffing "
            "reads both models on the same tokens, so they must share a tokenizer"
        )
