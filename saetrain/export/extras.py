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
from pathlib import Path
from typing import Any

from saetrain.dictionaries import Dictionary
from saetrain.errors import CircuitTracerExportError
from saetrain.evaluation.crosscoder import (
    decoder_norm_shares,
    plot_decoder_norm_shares,
    share_summary,
)
from saetrain.export.circuit_tracer import circuit_tracer_hooks, clt_from_dictionary, write_clt

log = logging.getLogger(__name__)

CIRCUIT_TRACER_DIR = "circuit_tracer"
SHARES_PLOT = "decoder_norm_shares.png"


def kind_metrics(dictionary: Dictionary, inputs: list[str]) -> dict[str, float]:
    """Metrics of the kind's own (a crosscoder's decoder-norm shares per source), from the
    weights alone."""
    if dictionary.kind == "crosscoder":
        return share_summary(decoder_norm_shares(_source_norms(dictionary)), inputs)
    return {}


def write_extras(
    dictionary: Dictionary,
    folder: Path,
    inputs: list[str],
    targets: list[str],
    n_model_layers: int,
    family: str | None = None,
) -> None:
    """Write the kind's own files into `folder` (the dictionary's saved folder)."""
    if dictionary.kind == "clt":
        write_clt_for_circuit_tracer(
            dictionary, folder / CIRCUIT_TRACER_DIR, inputs, targets, n_model_layers, family
        )
    elif dictionary.kind == "crosscoder":
        shares = decoder_norm_shares(_source_norms(dictionary))
        plot_decoder_norm_shares(shares, inputs, folder / SHARES_PLOT)


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
    from saetrain.activations.sites import Site

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
