"""Inspect saved dictionaries: resolve the folders, one LM pass, then the site and feature files.

A path is a dictionary folder (cfg.json + sae_weights.safetensors) or a run folder whose
sub-folders are dictionaries (a `dictionaries` run): all of them are inspected on the same
held-out tokens in one LM pass. What to run on comes from each folder exactly as
`python -m saetrain.evaluate` takes it (saetrain_run.json, else cfg.json), with the overrides on
top; the dictionaries of one pass must agree on the model and the data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saetrain.activations.model import load_lm, resolve_device
from saetrain.activations.sites import resolve_site
from saetrain.activations.source import ActivationSource
from saetrain.activations.tokens import LOCAL_BUILDERS, TokenSource, expand_data_files
from saetrain.config import DataConfig, ModelConfig
from saetrain.errors import ConfigError
from saetrain.evaluation.folder import EvaluateConfig, resolve
from saetrain.export.norm_space import foreign_to_model_space_
from saetrain.export.saelens import CFG_FILE, RUN_FILE, WEIGHTS_FILE, load_dictionary
from saetrain.inspect.collect import CollectSettings
from saetrain.inspect.features import LayerWriter, write_index
from saetrain.inspect.logits import model_logit_effects
from saetrain.inspect.report import QUANTILES, LogitTables, TokenStrings, latent_record
from saetrain.inspect.site import SiteWriter, run_index
from saetrain.inspect.units import collect_all, units_of
from saetrain.progress import Progress

log = logging.getLogger(__name__)

FEATURES_CHOICES = ("auto", "always", "never")
OUTPUT_DIR = "inspect"


@dataclass
class InspectConfig:
    """What to inspect, on which tokens, and how much to keep per latent."""

    # A dictionary folder, or a run folder whose sub-folders are dictionaries. Required.
    path: str | None = None
    # The LM and the text; each field set on the command line replaces the folder's (as in
    # `python -m saetrain.evaluate`).
    model: ModelConfig = field(default_factory=lambda: ModelConfig(gguf_package=None))
    data: DataConfig = field(default_factory=DataConfig)
    # Seed of the data order (which held-out contexts come first) and of the quantile samples;
    # null: the run's.
    seed: int | None = None
    # Held-out tokens to run over (rounded up to whole contexts).
    n_tokens: int = 65536
    # Contexts per LM forward.
    batch_contexts: int = 16
    # Top-activating contexts kept per latent.
    top_k: int = 20
    # Tokens shown before / after the token where the latent fired.
    window_before: int = 12
    window_after: int = 4
    # Activation-quantile bands, and random firing examples shown per band.
    quantile_bands: int = 4
    per_band: int = 5
    # Promoted / suppressed tokens listed per latent.
    logits_k: int = 10
    # circuit-tracer feature files (features/index.json.gz + .bin): auto (when every dictionary is
    # a transcoder, one per layer) | always | never.
    features: str = "auto"
    # A latent firing on more than this fraction of tokens counts as dense (reported only).
    dense_threshold: float = 0.1
    # Where the site goes; null: <path>/inspect.
    output_dir: str | None = None


def check(cfg: InspectConfig) -> None:
    """Bad values, named with the field, the value and what is allowed (before anything loads)."""
    if not cfg.path:
        raise ConfigError("path is required: python -m saetrain.inspect path=<dictionary folder>")
    positive = ("n_tokens", "batch_contexts", "top_k", "quantile_bands", "per_band", "logits_k")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be at least 1")
    for name in ("window_before", "window_after"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be 0 or more")
    if cfg.features not in FEATURES_CHOICES:
        choices = ", ".join(FEATURES_CHOICES)
        raise ConfigError(f"features={cfg.features!r}; choose one of: {choices}")
    if not 0.0 < cfg.dense_threshold <= 1.0:
        raise ConfigError(f"dense_threshold={cfg.dense_threshold} must be in (0, 1]")


def dictionary_folders(path: str) -> list[Path]:
    """`path` itself when it is a dictionary folder, else its dictionary sub-folders."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"path={path!r}: no such folder")
    if (folder / CFG_FILE).is_file():
        if not (folder / WEIGHTS_FILE).is_file():
            raise ConfigError(f"path={path!r} holds {CFG_FILE} but no {WEIGHTS_FILE}")
        return [folder]
    found = sorted(p for p in folder.iterdir()
                   if (p / CFG_FILE).is_file() and (p / WEIGHTS_FILE).is_file())  # fmt: skip
    if not found:
        raise ConfigError(
            f"path={path!r} is neither a dictionary folder ({CFG_FILE} + {WEIGHTS_FILE}) nor a "
            "run folder with dictionary sub-folders"
        )
    return found


@dataclass
class InspectResult:
    """Where the sites went (per dictionary name), the run index, and the feature index."""

    sites: dict[str, Path]
    index: Path
    features: Path | None
    stats: dict[str, Any] = field(repr=False)
    # Per dictionary: every latent's record (what the pages and feature files were made from).
    records: dict[str, list[dict[str, Any]]] = field(repr=False, default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0


def inspect(
    cfg: InspectConfig,
    explicit: AbstractSet[str] = frozenset(),
    lm: tuple[Any, Any] | None = None,
    keep_records: bool = False,
) -> InspectResult:
    """Inspect every dictionary under `cfg.path`; `explicit` names the keys set by the user;
    `lm`: the (model, tokenizer) already loaded (a run that has just trained), else loaded;
    `keep_records`: return every latent's record too (InspectResult.records)."""
    check(cfg)
    folders = dictionary_folders(cfg.path)  # type: ignore[arg-type]
    ev = EvaluateConfig(path=None, model=cfg.model, data=cfg.data, seed=cfg.seed)
    resolved = [resolve(dataclasses.replace(ev, path=str(f)), explicit) for f in folders]
    first = resolved[0]
    if any(r.model_b is not None for r in resolved):
        raise ConfigError(
            f"path={cfg.path!r}: a model-diffing crosscoder reads two models; inspect reads one "
            "(inspect its sources' SAEs, or train a crosscoder on one model)"
        )
    for r in resolved[1:]:
        if (r.model, r.data) != (first.model, first.data):
            raise ConfigError(
                f"path={cfg.path!r}: {r.folder.name} and {first.folder.name} were trained on "
                "different models or data; inspect them one at a time"
            )
    # A `dictionaries` entry may record its own init seed; the held-out split does not depend on
    # it (documents are split by hash), only the order of its contexts: the first folder's.
    if first.data.path in LOCAL_BUILDERS:
        expand_data_files(list(first.data.data_files))  # a missing file fails before the LM loads
    features = cfg.features == "always" or (
        cfg.features == "auto" and all(r.inputs != r.targets for r in resolved)
    )
    layers = [_layer(site) for r in resolved for site in r.inputs]
    if features and len(set(layers)) != len(layers):
        if cfg.features == "always":
            raise ConfigError(
                f"features=always: the dictionaries read layers {layers}; circuit-tracer's "
                "feature files hold one set of features per layer"
            )
        log.info("no circuit-tracer feature files: several dictionaries read the same layer")
        features = False

    device = resolve_device(first.model.device)
    dictionaries = {}
    for r in resolved:
        try:
            dictionaries[r.folder.name] = load_dictionary(r.folder, device).requires_grad_(False)
        except ValueError as e:
            raise ConfigError(f"path={str(r.folder)!r}: {e}") from None
    units, owner = [], {}
    for r in resolved:
        try:
            mine = units_of(r.folder.name, dictionaries[r.folder.name], r.inputs, r.targets)
        except ValueError as e:
            raise ConfigError(f"path={str(r.folder)!r}: {e}") from None
        units += mine
        owner |= {unit.name: r for unit in mine}
    model, tokenizer = lm if lm is not None else load_lm(first.model, device)
    source = ActivationSource(model, sorted({site for unit in units for site in unit.sites}))
    for r in resolved:  # in place: the units hold these dictionaries
        sites = [resolve_site(model, s) for s in (*r.inputs, *r.targets)]
        foreign_to_model_space_(
            dictionaries[r.folder.name], r.folder, sites[: len(r.inputs)], sites[len(r.inputs) :]
        )
    for unit in units:
        d = dictionaries[owner[unit.name].folder.name]
        width = sum(source.width(site) for site in unit.sites)
        d_in = getattr(d, "layer_d_in", d.d_in)  # a CLT's unit reads one layer
        if width != d_in:
            raise ConfigError(
                f"model.name={first.model.name!r} has activations {width} wide at "
                f"{', '.join(unit.sites)} but {unit.name}'s d_in is {d_in}; is this the model "
                "(and the site) it was trained on?"
            )
    n_contexts = max(math.ceil(cfg.n_tokens / first.data.context_size), 1)
    batches = TokenSource(first.data, tokenizer, first.seed).held_out(
        n_contexts, cfg.batch_contexts
    )
    settings = CollectSettings(cfg.top_k, cfg.window_before, cfg.window_after,
                               cfg.quantile_bands, cfg.per_band, first.seed)  # fmt: skip
    total = sum(b.input_ids.numel() for b in batches)
    started = time.monotonic()
    stats = collect_all(source, units, batches, settings, total)
    seconds = time.monotonic() - started

    out = Path(cfg.output_dir) if cfg.output_dir else Path(cfg.path).expanduser() / OUTPUT_DIR
    single = len(units) == 1 and (Path(cfg.path).expanduser() / CFG_FILE).is_file()
    about = {unit.name: _about(owner[unit.name], dictionaries[owner[unit.name].folder.name],
                               stats[unit.name].tokens, unit) for unit in units}  # fmt: skip
    metrics = {unit.name: _saved_metrics(owner[unit.name].folder) for unit in units}
    result = write_outputs(out, units, stats, model, tokenizer, features, cfg.logits_k,
                           cfg.dense_threshold, about, metrics, single, keep_records)  # fmt: skip
    result.tokens, result.seconds = total, seconds
    return result


def write_outputs(
    out: Path,
    units: list,
    stats: dict[str, Any],
    model,
    tokenizer,
    features: bool,
    logits_k: int = 10,
    dense_threshold: float = 0.1,
    about: dict[str, dict[str, Any]] | None = None,
    metrics: dict[str, dict[str, Any]] | None = None,
    single: bool = False,
    keep_records: bool = False,
) -> InspectResult:
    """After `collect_all`: every unit's records (logit effects through `model`), its site
    (`out` itself when `single`, else `out/<name>` and an index linking them) and, if
    `features`, circuit-tracer's feature files with one layer per unit (`unit.layer`).

    This is the whole writing side: anything that can be cast as units (a cross-layer
    transcoder: one per layer) gets the same site and feature files. Records are made, written
    and dropped one latent at a time (`keep_records`: also returned, for tests and notebooks).
    """
    about, metrics = about or {}, metrics or {}
    layers = [unit.layer for unit in units] if features else []
    if len(set(layers)) != len(layers):
        raise ValueError(f"units read layers {layers}; circuit-tracer's feature files hold one "
                         "set of features per layer")  # fmt: skip
    entries: dict[int, dict[str, Any]] = {}
    sites: dict[str, Path] = {}
    kept: dict[str, list[dict[str, Any]]] = {}
    for unit in units:
        s = stats[unit.name]
        folder = out if single else out / unit.name
        site = SiteWriter(folder, unit.name, unit.n_latents, s.tokens)
        layer = LayerWriter(out, unit.layer) if features else None
        records = kept.setdefault(unit.name, []) if keep_records else None
        progress = Progress(f"pages of {unit.name} → {folder}", unit.n_latents, "latents")
        with progress:
            for record in _records(unit, s, model, tokenizer, logits_k):
                site.add(record)
                if layer is not None:
                    layer.add(record)
                if records is not None:
                    records.append(record)
                progress.update()
        info = about.get(unit.name) or {"input site": unit.input_site,
                                        "target site": unit.target_site,
                                        "latents": unit.n_latents}  # fmt: skip
        sites[unit.name] = site.finish(info, metrics.get(unit.name, {}), dense_threshold)
        if layer is not None:
            entries[unit.layer] = layer.finish()
    index = sites[units[0].name] if single else run_index(out, sites)
    feature_index = write_index(out, entries) if features else None
    if feature_index is not None:
        log.info("circuit-tracer feature files: %s", feature_index)
    print(f"inspect: site written to {index}", flush=True)
    return InspectResult(sites, index, feature_index, stats, kept)


def _layer(site: str) -> int:
    return int(site.rsplit(".", 1)[1])


def _records(unit, stats, model, tokenizer, logits_k: int) -> Iterator[dict[str, Any]]:
    """Every latent's record in index order, made as they are asked for."""
    effects = model_logit_effects(model, unit.W_dec, logits_k)
    tables = LogitTables(*effects) if effects is not None else None
    strings = TokenStrings(tokenizer)
    quantiles = stats.quantile_values(QUANTILES)
    for j in range(unit.n_latents):
        yield latent_record(stats, j, unit.name, strings, tables, quantiles)


def _about(r, dictionary, tokens: int, unit) -> dict[str, Any]:
    about = {
        "folder": str(r.folder),
        "architecture": dictionary.architecture,
        "model": r.model.name,
        "input site": unit.input_site,
        "target site": unit.target_site,
        "d_in → d_out": f"{dictionary.d_in} → {dictionary.d_out}",
        "latents": unit.n_latents,
        "held-out tokens inspected": tokens,
    }
    about |= dictionary.about_rows(r.inputs, unit.sites)  # a crosscoder's, a CLT layer's
    if getattr(dictionary, "k", None):
        about["k"] = dictionary.k
    return about


def _saved_metrics(dictionary_folder: Path) -> dict[str, Any]:
    """The run's held-out metrics (saetrain_run.json), else saetrain.evaluate's, else none."""
    if (dictionary_folder / RUN_FILE).is_file():
        return json.loads((dictionary_folder / RUN_FILE).read_text()).get("final_metrics") or {}
    if (dictionary_folder / "eval" / "metrics.json").is_file():
        saved = json.loads((dictionary_folder / "eval" / "metrics.json").read_text())
        return saved.get("metrics") or {}
    return {}


def inspect_run_folder(run_folder: Path, overrides: dict[str, Any]) -> InspectResult:
    """For run(): inspect the dictionaries just saved in `run_folder` (the run's own settings;
    `overrides` sets InspectConfig fields such as n_tokens, top_k)."""
    cfg = InspectConfig(path=str(run_folder), **overrides)
    return inspect(cfg)
