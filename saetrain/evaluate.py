"""`python -m saetrain.evaluate path=<dictionary folder> [overrides]`: evaluate a saved dictionary.

Works on any folder `saetrain.load` reads (docs/formats.md): the SAELens layout (saetrain's own,
or another tool's SAEs and transcoders), sparsify's and dictionary_learning's. What to evaluate
on comes from the folder unless overridden: a saetrain folder's saetrain_run.json gives the model,
data, sites, eval settings and seed of its run (so the held-out tokens, and the numbers, are the
run's); another tool's cfg.json gives the model (`model_name`), the site (TransformerLens
`hook_name`, and `hook_name_out` for a transcoder) and the context size, where it names them; a
folder that does not is refused, naming the fields to set (model.name, site.input). Writes
`metrics.json`, `feature_frequencies.safetensors` and `feature_density.png` to `<path>/eval` (or
`output_dir`).

A saved folder has no training window, so the evaluation measures `never_fired_fraction` (latents
with no firing on the `never_fired_tokens` held-out tokens), never `dead_fraction`. When the
folder's saetrain_run.json holds its run's training-window `dead_fraction` and
`dead_window_tokens`, those are carried into the report unchanged (and listed under
`carried_from_run`); otherwise there is none.

Overrides are Hydra's, typed by `EvaluateConfig` (ConfigStore name `saetrain_evaluate`):
`model.device=cpu`, `eval.n_tokens=65536`, `data.data_files=[/data/*.txt]`, `site.input=mlp_in.3`.
Only the fields named on the command line replace the folder's. `eval.suite=[absorption]` also
runs the usefulness suites (saetrain/evaluation/usefulness, docs/usefulness.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from saetrain.activations.model import load_lm, resolve_device
from saetrain.activations.paired import PairedSource, check_same_tokenizer, split_sites
from saetrain.activations.source import ActivationSource
from saetrain.activations.tokens import LOCAL_BUILDERS, TokenSource, expand_data_files
from saetrain.atomic import atomic_write_bytes, atomic_write_json
from saetrain.checks import validate
from saetrain.config import Config, DictionaryConfig, SiteConfig
from saetrain.dictionaries import KINDS
from saetrain.errors import ConfigError
from saetrain.evaluation.density import count_firing, density_summary, plot_density
from saetrain.evaluation.evaluate import evaluate_dictionary
from saetrain.evaluation.folder import (
    EvaluateConfig,
    ResolvedEvaluation,
    from_dict,
    resolve,
)
from saetrain.evaluation.usefulness import SuiteContext
from saetrain.evaluation.usefulness.suites import evaluate_usefulness
from saetrain.export.extras import kind_metrics
from saetrain.export.norm_space import foreign_to_model_space_
from saetrain.export.saelens import RUN_FILE, load_dictionary
from saetrain.folder_cli import compose_schema, folder_main

log = logging.getLogger(__name__)

CONFIG_NAME = "saetrain_evaluate"
METRICS_FILE = "metrics.json"
DENSITY_PNG = "feature_density.png"
FREQUENCIES_FILE = "feature_frequencies.safetensors"


@dataclass
class EvaluationReport:
    """What an evaluation found, and where it was written."""

    metrics: dict[str, float]
    frequencies: torch.Tensor
    metrics_path: Path
    plot_path: Path | None
    resolved: ResolvedEvaluation = field(repr=False)


def evaluate(cfg: EvaluateConfig, explicit: AbstractSet[str] = frozenset()) -> EvaluationReport:
    """Evaluate the dictionary at `cfg.path`; `explicit` holds the dotted keys (`model.device`,
    or a whole group `eval`) whose values in `cfg` replace the folder's settings."""
    r = resolve(cfg, explicit)
    # The shared validation, on a run config holding the evaluation's groups.
    if not KINDS[r.kind].multi_site:
        site = SiteConfig(r.input_site, r.target_site if r.target_site != r.input_site else None)
    else:  # the sites' pattern over their layers, as the run had it
        site = _saved_site(r.folder)
    run_like = Config(model=r.model, data=r.data, eval=r.eval, site=site,
                      dictionary=DictionaryConfig(kind=r.kind))  # fmt: skip
    if r.model_b is not None:
        run_like = dataclasses.replace(run_like, model_b=r.model_b)
    validate(run_like)
    torch.manual_seed(r.seed)
    device = resolve_device(r.model.device)
    if r.data.path in LOCAL_BUILDERS:
        expand_data_files(list(r.data.data_files))  # a missing file fails before the LM loads
    try:
        dictionary = load_dictionary(r.folder, device)
    except ValueError as e:
        raise ConfigError(f"path={str(r.folder)!r}: {e}") from None
    transcoder = r.targets != r.inputs
    if transcoder != dictionary.transcoder:
        raise ConfigError(
            f"path={str(r.folder)!r} holds {'a transcoder' if dictionary.transcoder else 'an SAE'}"
            f" but the sites are input={r.input_site!r}, target={r.target_site!r}; set site.target"
        )
    log.info(
        "evaluating %s (%s, %d latents) on %s at %s%s; settings from %s",
        r.folder,
        dictionary.architecture,
        dictionary.n_latents,
        r.model.name,
        r.input_site,
        f" → {r.target_site}" if transcoder else "",
        r.source,
    )
    model, tokenizer = load_lm(r.model, device)
    sites = r.inputs + r.targets if transcoder else r.inputs
    if r.model_b is not None:  # model diffing: both models on the same tokens
        model_b, tokenizer_b = load_lm(dataclasses.replace(r.model_b, device=r.model.device),
                                       device)  # fmt: skip
        check_same_tokenizer(tokenizer, tokenizer_b, r.model.name, r.model_b.name)
        sites_a, sites_b = split_sites(sites)
        source = PairedSource(ActivationSource(model, sites_a), ActivationSource(model_b, sites_b))
    else:
        source = ActivationSource(model, sites)
    for names, width, name in ((r.inputs, dictionary.d_in, "d_in"),
                               (r.targets, dictionary.d_out, "d_out")):  # fmt: skip
        if sum(source.width(site) for site in names) != width:
            raise ConfigError(
                f"model.name={r.model.name!r} has activations "
                f"{'+'.join(str(source.width(site)) for site in names)} wide at "
                f"{', '.join(names)} but the dictionary's {name} is {width}; is this the model "
                "(and the site) it was trained on?"
            )
    inputs, targets = [source.sites[s] for s in r.inputs], [source.sites[s] for s in r.targets]
    foreign_to_model_space_(dictionary, r.folder, inputs, targets)  # another tool's, before a norm

    # The held-out contexts exactly as run() draws them, so a run's folder gives the run's numbers.
    tokens = TokenSource(r.data, tokenizer, r.seed)
    n_contexts = max(math.ceil(r.eval.n_tokens / r.data.context_size), 1)
    held_out = tokens.held_out(
        max(n_contexts, r.eval.ce_contexts if r.eval.compute_ce else 0), r.eval.batch_contexts
    )
    metrics = evaluate_dictionary(
        source,
        dictionary,
        held_out,
        r.inputs,
        r.targets,
        r.eval.compute_ce and r.eval.splice_each,  # a dictionary's own splice, as in a run
        r.eval.ce_contexts,
    )
    # Densities in a pass of their own (the LM stops at the input site): codes of the same tokens.
    dtype = dictionary.W_enc.dtype
    with torch.no_grad():
        codes = (
            dictionary.encode(row[:, : dictionary.d_in].to(dictionary.W_enc.device))
            for row in source.rows(iter(held_out), r.inputs, dtype)
        )
        counter = count_firing(codes, dictionary.n_latents)
    frequencies = counter.frequencies()
    metrics |= density_summary(frequencies, r.dense_threshold)
    metrics |= kind_metrics(dictionary, r.inputs)  # a crosscoder's decoder-norm shares
    carried = training_window_metrics(r.folder)
    metrics |= carried

    r.output_dir.mkdir(parents=True, exist_ok=True)
    notes: dict[str, list[str]] = {}
    if r.eval.suite:  # usefulness suites (eval.suite): metrics, and SAEBench files beside ours
        ctx = SuiteContext(model, tokenizer, dictionary, source, r.inputs, r.model.name,
                           r.folder.name, device, r.seed, r.output_dir)  # fmt: skip
        found, notes = evaluate_usefulness(ctx, r.eval)
        metrics |= found
    report = {
        "path": str(r.folder),
        "architecture": dictionary.architecture,
        "d_in": dictionary.d_in,
        "d_sae": dictionary.n_latents,
        "model": r.model.name,
        "input_site": r.input_site,
        "target_site": r.target_site,
        "settings_from": r.source,
        "seed": r.seed,
        "dense_threshold": r.dense_threshold,
        "data": dataclasses.asdict(r.data),
        "eval": dataclasses.asdict(r.eval),
        "metrics": metrics,
        # Keys of `metrics` copied from the training run's final metrics, not measured here.
        "carried_from_run": sorted(carried),
    }
    if notes:
        report["suite_notes"] = notes
    metrics_path = r.output_dir / METRICS_FILE
    atomic_write_json(metrics_path, report)
    atomic_write_bytes(
        r.output_dir / FREQUENCIES_FILE, safetensors_bytes({"frequencies": frequencies.float()})
    )
    title = f"{r.folder.name}: {dictionary.architecture}, {dictionary.n_latents} latents, "
    title += f"{counter.rows} tokens"
    plot_path = plot_density(frequencies, r.output_dir / DENSITY_PNG, title, r.dense_threshold)
    print_metrics(metrics, metrics_path, plot_path)
    return EvaluationReport(metrics, frequencies, metrics_path, plot_path, r)


def _saved_site(folder: Path) -> SiteConfig:
    """The site group a saetrain run saved for a dictionary on several sites."""
    run_cfg = json.loads((folder / RUN_FILE).read_text())["config"]
    return from_dict(SiteConfig, run_cfg["site"])


TRAINING_WINDOW_KEYS = ("dead_fraction", "dead_window_tokens")


def training_window_metrics(folder: Path) -> dict[str, float]:
    """The run's training-window `dead_fraction` and `dead_window_tokens` from the folder's
    saetrain_run.json, or {} (another tool's folder, or one saved before the window was
    recorded: there `dead_fraction` meant the held-out never-fired share, so it is not carried)."""
    path = folder / RUN_FILE
    if not path.is_file():
        return {}
    try:
        final = json.loads(path.read_text()).get("final_metrics") or {}
    except json.JSONDecodeError:
        return {}
    if not all(isinstance(final.get(k), int | float) for k in TRAINING_WINDOW_KEYS):
        return {}
    return {k: float(final[k]) for k in TRAINING_WINDOW_KEYS}


def print_metrics(metrics: dict[str, float], metrics_path: Path, plot_path: Path | None) -> None:
    lines = ["", "evaluation:"]
    lines += [f"  {k:<22} {v:.4f}" for k, v in metrics.items() if isinstance(v, float | int)]
    lines.append(f"metrics saved to {metrics_path}")
    if plot_path is not None:
        lines.append(f"feature density plot saved to {plot_path}")
    print("\n".join(lines), flush=True)


def compose_config(overrides: Sequence[str]) -> tuple[EvaluateConfig, set[str]]:
    """Hydra-compose the schema with command-line overrides; also return the keys they set."""
    return compose_schema(EvaluateConfig, CONFIG_NAME, overrides)


USAGE = """usage: python -m saetrain.evaluate path=<dictionary folder> [key=value ...]

Evaluates a saved dictionary (SAELens layout): FVU, MSE, L0, never-fired / dense latents, CE with
the dictionary spliced in, KL (a saetrain folder's training-window dead_fraction is carried over);
writes metrics.json, feature_frequencies.safetensors and
feature_density.png to <path>/eval. eval.suite=[absorption,sparse_probing] adds the usefulness
suites (docs/usefulness.md; pip install saetrain[eval]) and their <suite>_saebench.json files.
Keys: path, output_dir, seed, dense_threshold, model.*, data.*, site.*, eval.* (see
saetrain/evaluate.py's EvaluateConfig and saetrain/config.py).
"""


def evaluate_path(path: str | Path, overrides: Sequence[str] = ()) -> EvaluationReport:
    """In-process equivalent of `python -m saetrain.evaluate path=<path> <overrides>`."""
    cfg, explicit = compose_config([f"path={path}", *overrides])
    return evaluate(cfg, explicit)


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 on success, 2 on bad input (a message, no traceback)."""
    return folder_main("saetrain.evaluate", USAGE, argv, compose_config, evaluate)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    sys.exit(main())
