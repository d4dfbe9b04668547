"""The LM as a source of activations: a forward with hooks at sites that stops early."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from saetrain.activations.sites import ResolvedSite, register_site_hook, resolve_site
from saetrain.activations.tokens import TokenBatch


class _StopForward(Exception):
    """Raised by the last capture hook so the LM does no work past the deepest site."""


class ActivationSource:
    """Reads activations at one or more sites of a frozen LM."""

    def __init__(self, model: torch.nn.Module, site_names: list[str]):
        self.model = model
        self.sites: dict[str, ResolvedSite] = {n: resolve_site(model, n) for n in site_names}
        self.device = next(model.parameters()).device
        self.d_model = int(model.config.hidden_size)
        # Per site: attn_z is n_heads × head_dim wide, which need not be d_model.
        self.widths: dict[str, int] = {n: r.width for n, r in self.sites.items()}

    @property
    def models(self) -> list[torch.nn.Module]:
        """The LMs this source reads (two for a model-diffing pair, activations/paired.py)."""
        return [self.model]

    def width(self, site: str) -> int:
        """The last dimension of the activations at `site` (one of the names given)."""
        return self.widths[site]

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Activations [batch, context, width] per site, from a forward cut after the deepest."""
        captured: dict[str, torch.Tensor] = {}
        n_sites = len(self.sites)

        def capture(name: str):
            def hook(x: torch.Tensor) -> None:
                captured[name] = x.detach()
                if len(captured) == n_sites:
                    raise _StopForward

            return hook

        handles = [register_site_hook(r, capture(n)) for n, r in self.sites.items()]
        try:
            self.model(input_ids=input_ids.to(self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return captured

    def rows(
        self, batches: Iterator[TokenBatch], sites: list[str], dtype: torch.dtype
    ) -> Iterator[torch.Tensor]:
        """Activations at the unmasked positions of each batch, in order: [n, Σ width] with the
        sites side by side (a transcoder's input and target travel as one row)."""
        for (row,) in self.row_groups(batches, [(sites, dtype)]):
            yield row

    def row_groups(
        self, batches: Iterator[TokenBatch], groups: Sequence[tuple[Sequence[str], torch.dtype]]
    ) -> Iterator[list[torch.Tensor]]:
        """`rows` for several readers at once from one forward per batch: per batch, one
        [n, Σ width] block per (sites, dtype) group, so that several dictionaries are evaluated
        on the same activations without running the LM once each."""
        for batch in batches:
            acts = self(batch.input_ids)
            mask = batch.mask.to(self.device)
            yield [
                torch.cat([acts[s][mask].to(dtype) for s in sites], dim=-1)
                for sites, dtype in groups
            ]
