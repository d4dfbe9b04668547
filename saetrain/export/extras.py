"""A dictionary kind's own outputs beside its SAELens-layout folder (formats at the edge).

- a CLT: its circuit-tracer folder, `<dictionary folder>/circuit_tracer/` (saetrain/export/
  circuit_tracer.py), when circuit-tracer can hold it (ReLU, JumpReLU or BatchTopK; padded to
  the model's layer count when it covers fewer layers);
- a crosscoder: the histogram of its latents' decoder-norm shares per source
  (`decoder_norm_shares.png`, the model-diffing plot) and their summary in the metrics.
Other kinds have none. What cannot be written is logged with the reason, never fatal: the
dictionary itself is already saved.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saetrain.activations.sites import Site
from saetrain.dictionaries import Dictionary
from saetrain.errors import CircuitTracerExportError
from saetrain.export.circuit_tracer import circuit_tracer_hooks, clt_from_dictionary, write_clt
from saetrain.export.decoder_norm_shares import (
    decoder_norm_shares,
    plot_decoder_norm_shares,
    share_summary,
)

log = logging.getLogger(__name__)

CIRCUIT_TRACER_DIR = "circuit_tracer"
SHARES_PLOT = "decoder_norm_shares.png"


def kind_metrics(dictionary: Dictionary, inputs: list[str]) -> dict[str, float]:
    """Metrics of the kind's own (`Dictionary.extra_metrics`: a crosscoder's decoder-norm shares
    per source), from the weights alone."""
    metrics: dict[str, float] = {}
    for name in dictionary.extra_metrics:
        metrics |= _METRICS[name](dictionary, inputs)
    return metrics


def write_extras(
    dictionary: Dictionary,
    folder: Path,
    inputs: list[str],
    targets: list[str],
    n_model_layers: int,
    family: str | None = None,
) -> None:
    """Write the kind's own files (`Dictionary.export_extras`) into `folder` (the dictionary's
    saved folder)."""
    for name in dictionary.export_extras:
        _WRITERS[name](dictionary, folder, inputs, targets, n_model_layers, family)


def _share_metrics(dictionary: Dictionary, inputs: list[str]) -> dict[str, float]:
    return share_summary(decoder_norm_shares(_source_norms(dictionary)), inputs)


def _write_circuit_tracer(
    dictionary: Dictionary,
    folder: Path,
    inputs: list[str],
    targets: list[str],
    n_model_layers: int,
    family: str | None,
) -> None:
    write_clt_for_circuit_tracer(
        dictionary, folder / CIRCUIT_TRACER_DIR, inputs, targets, n_model_layers, family
    )


def _write_shares_plot(dictionary: Dictionary, folder: Path, inputs: list[str], *_: Any) -> None:
    shares = decoder_norm_shares(_source_norms(dictionary))
    plot_decoder_norm_shares(shares, inputs, folder / SHARES_PLOT)


# The extras a kind names (Dictionary.extra_metrics, Dictionary.export_extras) → what makes them.
_METRICS: dict[str, Callable[[Dictionary, list[str]], dict[str, float]]] = {
    "decoder_norm_shares": _share_metrics,
}
_WRITERS: dict[str, Callable[..., None]] = {
    "circuit_tracer": _write_circuit_tracer,
    "decoder_norm_shares": _write_shares_plot,
}


def _source_norms(dictionary: Any) -> Any:
    return dictionary.source_decoder_norms().detach()


def write_clt_for_circuit_tracer(
    dictionary: Dictionary,
    folder: Path,
    inputs: list[str],
    targets: list[str],
    n_model_layers: int,
    family: str | None = None,
) -> Path | None:
    """The CLT's circuit-tracer folder, or None (and the reason in the log)."""
    layers = [Site.parse(site).layer for site in inputs]
    try:
        in_hook, out_hook = circuit_tracer_hooks(inputs[0], targets[0], family=family)
        result = write_clt(
            folder,
            clt_from_dictionary(dictionary),
            feature_input_hook=in_hook,
            feature_output_hook=out_hook,
            layers=layers,
            n_model_layers=n_model_layers,
        )
    except CircuitTracerExportError as e:
        log.info("circuit-tracer folder not written: %s", e)
        return None
    for warning in result.warnings:
        log.warning("circuit-tracer folder %s: %s", folder, warning)
    log.info("circuit-tracer folder written to %s", folder)
    return folder
