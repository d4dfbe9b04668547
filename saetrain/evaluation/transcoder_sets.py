"""A run's per-layer transcoders as one replacement: evaluated together and written for
circuit-tracer.

The single transcoders of a run that read the same kind of site and write the same kind (e.g.
`mlp_in.L → mlp_out.L`, from `site.input=mlp_in.* site.target=mlp_out.*`) at two or more layers
form a set. After every dictionary is saved, the set is spliced into the LM at once (each MLP's
output replaced by its transcoder's prediction from the replaced forward's own MLP input) and
written to `<run>/transcoder_set.<input kind>-<target kind>/`:
- `replacement_metrics.json`: CE clean / replaced / every target zero-ablated, CE recovered, KL,
  and each layer's FVU and L0 (from its own held-out evaluation);
- circuit-tracer's transcoder-set files (config.yaml, layer_{i}.safetensors) when circuit-tracer
  can hold the set (ReLU / JumpReLU / BatchTopK / Matryoshka as JumpReLU, TopK for
  circuit-tracer's main branch), padded to the model's layer count with latents that never fire
  where the set covers fewer layers; otherwise the reason is logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saetrain.activations.sites import Site
from saetrain.activations.source import ActivationSource
from saetrain.activations.tokens import TokenBatch
from saetrain.atomic import atomic_write_json
from saetrain.dictionaries import KINDS
from saetrain.errors import CircuitTracerExportError
from saetrain.evaluation.splice import Member, replacement_lm_metrics
from saetrain.export.circuit_tracer import (
    circuit_tracer_hooks,
    layer_from_dictionary,
    write_transcoder_set,
)
from saetrain.export.saelens import RUN_FILE, load_dictionary
from saetrain.progress import ReportedList, emit

log = logging.getLogger(__name__)

METRICS_FILE = "replacement_metrics.json"


@dataclass
class TranscoderSet:
    """Transcoders from one kind of site to another, one per layer, in layer order."""

    input_kind: str
    target_kind: str
    layers: list[int]
    folders: list[Path]  # each layer's saved dictionary folder

    @property
    def name(self) -> str:
        return f"transcoder_set.{self.input_kind}-{self.target_kind}"

    def sites(self, layer: int) -> tuple[str, str]:
        return f"{self.input_kind}.{layer}", f"{self.target_kind}.{layer}"


def find_sets(dictionaries: Sequence[tuple[str, str, str, Path]]) -> list[TranscoderSet]:
    """The sets among (kind, input site, target site, folder) of a run's dictionaries: single
    transcoders grouped by (input kind, target kind), at two or more distinct layers."""
    groups: dict[tuple[str, str], dict[int, Path]] = {}
    for kind, input_site, target_site, folder in dictionaries:
        if KINDS[kind].multi_site or input_site == target_site:
            continue
        source, target = Site.parse(input_site), Site.parse(target_site)
        if source.layer != target.layer:
            continue
        groups.setdefault((source.kind, target.kind), {})[source.layer] = folder
    sets = []
    for (input_kind, target_kind), by_layer in groups.items():
        if len(by_layer) >= 2:
            layers = sorted(by_layer)
            sets.append(
                TranscoderSet(input_kind, target_kind, layers, [by_layer[i] for i in layers])
            )
    return sets


def evaluate_and_export_set(
    transcoder_set: TranscoderSet,
    source: ActivationSource,
    ce_batches: list[TokenBatch] | None,
    output_dir: Path,
    n_model_layers: int,
    family: str | None = None,
) -> dict[str, Any]:
    """Splice the set into the LM (when `ce_batches`), write its folder; returns the metrics."""
    device = next(source.model.parameters()).device
    members = [load_dictionary(folder, device) for folder in transcoder_set.folders]
    per_layer = {}
    for layer, folder in zip(transcoder_set.layers, transcoder_set.folders, strict=True):
        final = json.loads((folder / RUN_FILE).read_text()).get("final_metrics", {})
        per_layer[str(layer)] = {k: final[k] for k in ("fvu", "l0") if k in final}
    metrics: dict[str, Any] = {"layers": transcoder_set.layers, "per_layer": per_layer}
    if ce_batches:
        replacement = [
            Member(
                dictionary,
                [source.sites[transcoder_set.sites(layer)[0]]],
                [source.sites[transcoder_set.sites(layer)[1]]],
            )
            for layer, dictionary in zip(transcoder_set.layers, members, strict=True)
        ]
        batches = ReportedList(ce_batches, f"[{transcoder_set.name}] replacement", "contexts", len)
        with torch.no_grad():
            metrics |= replacement_lm_metrics(source.model, replacement, batches)
    folder = output_dir / transcoder_set.name
    folder.mkdir(parents=True, exist_ok=True)
    metrics["circuit_tracer"] = _write_circuit_tracer(
        transcoder_set, members, folder, n_model_layers, family
    )
    atomic_write_json(folder / METRICS_FILE, metrics)
    _print(transcoder_set, metrics, folder)
    return metrics


def _write_circuit_tracer(
    transcoder_set: TranscoderSet,
    members: list[Any],
    folder: Path,
    n_model_layers: int,
    family: str | None,
) -> str:
    """Write the set's circuit-tracer files into `folder`; returns what happened, for the
    metrics file (the reason when nothing was written)."""
    try:
        if len({type(m).architecture for m in members}) != 1:
            raise CircuitTracerExportError("the set's layers differ in architecture")
        in_hook, out_hook = circuit_tracer_hooks(*transcoder_set.sites(0), family=family)
        converted = [layer_from_dictionary(m) for m in members]
        result = write_transcoder_set(
            folder,
            dict(zip(transcoder_set.layers, [layer for layer, _, _ in converted], strict=True)),
            feature_input_hook=in_hook,
            feature_output_hook=out_hook,
            activation=converted[0][1],
            k=converted[0][2],
            n_model_layers=n_model_layers,
        )
    except CircuitTracerExportError as e:
        log.info("%s: circuit-tracer files not written: %s", transcoder_set.name, e)
        return f"not written: {e}"
    for warning in result.warnings:
        log.warning("%s: %s", transcoder_set.name, warning)
    return "written" + (f" ({'; '.join(result.warnings)})" if result.warnings else "")


def _print(transcoder_set: TranscoderSet, metrics: dict[str, Any], folder: Path) -> None:
    lines = [
        "",
        f"{transcoder_set.name}: layers {transcoder_set.layers} spliced together:",
    ]
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablated", "ce_recovered", "kl_div"):
        if key in metrics:
            lines.append(f"  {key:<20} {metrics[key]:.4f}")
    for layer, values in metrics["per_layer"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items())
        lines.append(f"  layer {layer:<14} {shown}")
    lines.append(f"circuit-tracer: {metrics['circuit_tracer']}")
    lines.append(f"transcoder set saved to {folder}")
    emit("\n".join(lines), log)
