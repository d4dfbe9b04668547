"""The Python API, for notebooks: build a config, train, load a saved folder, read activations.

Everything here is a thin layer over what the CLI uses, so a notebook and `python -m saetrain`
give the same config, the same checks, the same folders and the same numbers:

- `config_from_overrides([...])` composes the package's Hydra configs with command-line style
  overrides (the CLI's defaults, groups, `+experiment=...` and resolvers), then validates;
- `check(cfg)` takes a `Config` built from the dataclasses and applies the CLI's type check (the
  structured schema) and `saetrain.checks.validate`, so both routes fail with the same
  message;
- `train(cfg, output_dir)` calls `saetrain.run.run()` and hands back every trained dictionary,
  loaded from its saved folder (folded: it works on raw activations), with its metrics;
- `load(folder)` loads any SAELens-layout folder saetrain's loader understands;
- `read_activations(text, site, model)` reads an LM's activations at a site for some text;
- `collect_activations(sites, n_tokens, cfg)` streams a dataset's activations in batches (a
  run's training stream or held-out split), `gather_activations` collects them into tensors.

`import saetrain` imports this module on first use of one of its names (saetrain/__init__.py),
so torch, Hydra and the rest of saetrain load here without making `import saetrain` slower.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from saetrain import config_dir
from saetrain.activations.cache import ActivationCache, activation_key_fields
from saetrain.activations.collect import check_request, collect
from saetrain.activations.model import TORCH_DTYPES, load_lm, resolve_device
from saetrain.activations.sites import canonical_site_name
from saetrain.activations.source import ActivationSource
from saetrain.activations.tokens import TokenSource, check_dataset
from saetrain.checks import to_config
from saetrain.config import Config, DataConfig, ModelConfig, register_configs
from saetrain.dictionaries.base import Dictionary
from saetrain.errors import ConfigError
from saetrain.export.saelens import load_dictionary
from saetrain.run import run

log = logging.getLogger(__name__)


def config_from_overrides(overrides: Sequence[str] = ()) -> Config:
    """The validated Config that `python -m saetrain <overrides>` would run.

    Overrides are written as on the command line (`dictionary.k=64`, `dictionary=jumprelu`,
    `+experiment=gemma_l12`). A key Hydra cannot compose (unknown, wrong type, missing group
    file) and a value `validate` refuses both raise `ConfigError` with the message the CLI prints.
    """
    register_configs()
    try:
        # The context restores any Hydra state that was there before (e.g. inside a Hydra app).
        with initialize_config_dir(config_dir=config_dir(), version_base=None, job_name="saetrain"):
            node = compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_hydra_message(e)) from e
    return to_config(node)


def _hydra_message(error: BaseException) -> str:
    """Hydra's message with its cause's (the key OmegaConf names), as the CLI prints them."""
    parts = [str(error).strip()]
    cause = error.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in parts[0]:
        parts.append(str(cause).strip())
    return "\n".join(parts)


def check(cfg: Config) -> Config:
    """`cfg` type-checked against the schema (as Hydra checks the CLI's) and validated.

    Returns a fresh Config with interpolations (`${stdlib:}`) resolved and `dictionaries`
    entries given as mappings turned into DictionarySpec; raises ConfigError naming the field.
    """
    if not isinstance(cfg, Config):
        raise ConfigError(f"expected a saetrain Config, got {type(cfg).__name__}")
    try:
        # Merged into the schema as plain values, each error names its full key (dictionary.k).
        node = OmegaConf.merge(OmegaConf.structured(Config), dataclasses.asdict(cfg))
        return to_config(node)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).strip()) from None


@dataclass
class TrainedDictionary:
    """One dictionary of a run: its folder name, folder, held-out metrics and the module."""

    name: str
    folder: Path
    metrics: dict[str, float]
    # Loaded back from `folder`: the exported weights, normalisation folded in, on the run's
    # device, in eval mode. encode / decode / forward take raw activations.
    dictionary: Dictionary


@dataclass
class TrainResult:
    """What `train` hands back: the run folder and every dictionary it trained."""

    output_dir: Path
    dictionaries: list[TrainedDictionary]

    @property
    def dictionary(self) -> Dictionary:
        """The first (in a one-dictionary run, the only) dictionary."""
        return self.dictionaries[0].dictionary

    @property
    def metrics(self) -> dict[str, float]:
        """The first dictionary's held-out metrics (saetrain_run.json's `final_metrics`)."""
        return self.dictionaries[0].metrics

    @property
    def folder(self) -> Path:
        """The first dictionary's folder."""
        return self.dictionaries[0].folder

    def __getitem__(self, name: str) -> TrainedDictionary:
        for trained in self.dictionaries:
            if trained.name == name:
                return trained
        names = ", ".join(t.name for t in self.dictionaries)
        raise KeyError(f"no dictionary named {name!r} in this run; it trained: {names}")


def train(
    cfg: Config | Sequence[str],
    output_dir: str | Path | None = None,
    *,
    verbose: bool = True,
) -> TrainResult:
    """Train, evaluate and save what `cfg` describes, as `python -m saetrain` does.

    `cfg` is a Config (checked with `check`) or a list of overrides (`config_from_overrides`).
    `output_dir`: the run folder; default `cfg.output_dir`, else `outputs/<date>/<time>` under the
    working directory, like the CLI. `verbose` prints the progress lines where logging is not
    configured (a notebook); training can be stopped with Ctrl-C / interrupt, which writes a
    checkpoint and raises TrainingInterrupted.
    """
    cfg = config_from_overrides(cfg) if _is_overrides(cfg) else check(cfg)  # type: ignore[arg-type]
    outputs_root = Path.cwd() / "outputs"
    if output_dir is None:
        output_dir = cfg.output_dir or outputs_root / time.strftime("%Y-%m-%d/%H-%M-%S")
    output_dir = Path(output_dir).expanduser().absolute()  # a notebook may change directory later
    with _progress_to_stdout(verbose):
        result = run(cfg, output_dir, outputs_root)
    device = resolve_device(cfg.model.device)
    trained = [
        TrainedDictionary(d.name, d.dictionary_dir, d.metrics, load(d.dictionary_dir, device))
        for d in result.dictionaries
    ]
    return TrainResult(result.output_dir, trained)


def _is_overrides(cfg: Any) -> bool:
    return isinstance(cfg, list | tuple) and all(isinstance(x, str) for x in cfg)


@contextlib.contextmanager
def _progress_to_stdout(verbose: bool) -> Iterator[None]:
    """Show saetrain's INFO lines (progress, evaluation) when nobody configured logging."""
    logger = logging.getLogger("saetrain")
    if not verbose or logging.getLogger().handlers or logger.handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def load(
    folder: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> Dictionary:
    """A saved dictionary folder as a module: the SAELens layout (cfg.json +
    sae_weights.safetensors; saetrain's own folders and other tools' SAEs and transcoders),
    sparsify's (cfg.json + sae.safetensors) or dictionary_learning's (config.json + ae.pt).

    Every config field that changes the math is honoured or refused by name; an unknown one is a
    warning naming it (docs/formats.md). The weights work on raw activations:
    `encode(x [N, d_in])` gives the codes (TopK: `SparseCodes(indices, values)`, otherwise dense
    [N, d_sae]), `decode(codes)` the decoder's output, `forward(x)` / `sae(x)` both (plus a skip
    transcoder's W_skip·x), for any leading shape. `dtype` (float32, bfloat16, float16, float64
    or a torch dtype) casts the weights; encode and decode expect
    inputs in that dtype, forward casts them. The module is in eval mode with its parameters
    frozen (`requires_grad_(True)` to fine-tune it). saetrain's `mlp_in` folders come back for
    the model's MLP input (`read_activations(text, "mlp_in.L")`); another tool's folder at
    `ln2.hook_normalized` stays on TransformerLens's tensor, before the norm's weight (the
    evaluate and inspect commands rewrite it with the model's norm: export/norm_space.py).
    """
    dictionary = load_dictionary(folder, device).requires_grad_(False)  # for inference
    if dtype is not None:
        if isinstance(dtype, str):
            names = TORCH_DTYPES | {"float64": torch.float64}
            if dtype not in names:
                raise ValueError(f"dtype={dtype!r}; choose one of: {', '.join(names)}")
            dtype = names[dtype]
        dictionary = dictionary.to(dtype=dtype)
    return dictionary


# Loaded LMs, by their config and device: a notebook that reads activations repeatedly loads
# the model once.
_LMS: dict[str, tuple[Any, Any]] = {}


def read_activations(
    text: str,
    site: str,
    model: ModelConfig | None = None,
    *,
    prepend_bos: bool = True,
) -> torch.Tensor:
    """The LM's activations at `site` for `text`: [n_tokens, d_model], one row per token.

    The text is tokenized without special tokens and, like training contexts, preceded by BOS
    (`prepend_bos`), whose row is left out: rows line up with
    `tokenizer(text, add_special_tokens=False)` and are what a dictionary trained on the site
    saw. `model` defaults to the default job's model (`ModelConfig()`).
    """
    lm, tokenizer = _lm(model if model is not None else ModelConfig())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prepend_bos and bos is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token; use prepend_bos=False")
    ids = [bos, *ids] if prepend_bos else ids
    if not ids:
        raise ValueError("the text has no tokens")
    acts = ActivationSource(lm, [site])(torch.tensor([ids]))[site][0]
    return acts[1:] if prepend_bos else acts


def _lm(model: ModelConfig) -> tuple[Any, Any]:
    """The LM and tokenizer of `model`, loaded once per config and device."""
    device = resolve_device(model.device)
    key = f"{model!r}@{device}"
    if key not in _LMS:
        _LMS[key] = load_lm(model, device)
    return _LMS[key]


def collect_activations(
    sites: str | Sequence[str],
    n_tokens: int,
    cfg: Config | Sequence[str] | None = None,
    *,
    split: str = "train",
    batch_rows: int = 4096,
    model: ModelConfig | None = None,
    data: DataConfig | None = None,
    cache_dir: str | Path | None = None,
    verbose: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """A dataset's activations at `sites`, `batch_rows` rows at a time: {site: [rows, width]}.

    The rows are those a run of `cfg` (a Config or overrides; default the default job) reads:
    `split="train"` its training stream (before the buffer's shuffle), `"held_out"` its held-out
    contexts in its order — the same documents and seed give the same rows, so a metric computed
    on them matches the run's. One row per token that is not special (BOS, separators), the
    sites' rows aligned. `model` / `data` replace the config's; `cache_dir` (default
    `cfg.cache.dir`) reads and extends the activation cache of the training stream, under the key
    a run with the same sites in the same order uses. At most `n_tokens` rows in all; memory
    holds one batch and one LM batch, and the LM runs only as far as the batches taken. Progress
    lines (rows, rate, ETA) print where logging is not configured (`verbose`).
    """
    names = [sites] if isinstance(sites, str) else list(sites)
    check_request(names, n_tokens, split, batch_rows)
    names = [canonical_site_name(site) for site in names]  # an unknown site fails now
    cfg = _request_config(cfg, model, data, cache_dir)
    check_dataset(cfg.data)  # a missing path or column fails before the LM loads
    return _collected(cfg, names, n_tokens, split, batch_rows, verbose)


def _collected(
    cfg: Config, sites: list[str], n_tokens: int, split: str, batch_rows: int, verbose: bool
) -> Iterator[dict[str, torch.Tensor]]:
    """collect_activations's batches: the LM loads at the first one."""
    dtype = TORCH_DTYPES[cfg.buffer.dtype]
    with _progress_to_stdout(verbose):
        lm, tokenizer = _lm(cfg.model)
        source = ActivationSource(lm, sites)
        cache = None
        if cfg.cache.dir is not None and split == "train":  # the cache holds training streams
            cache = ActivationCache(
                cfg.cache.dir, activation_key_fields(cfg, sites), dict(source.widths), dtype,
                cfg.cache.shard_tokens, cfg.cache.verify,
            )  # fmt: skip
        tokens = TokenSource(cfg.data, tokenizer, cfg.seed)
        yield from collect(
            source, tokens, sites, n_tokens, split, batch_rows, dtype,
            cfg.buffer.lm_batch_contexts, cache, cfg.seed,
        )  # fmt: skip


def _request_config(
    cfg: Config | Sequence[str] | None,
    model: ModelConfig | None,
    data: DataConfig | None,
    cache_dir: str | Path | None,
) -> Config:
    """The run config whose stream `collect_activations` reads, with the caller's replacements."""
    if cfg is None:
        cfg = config_from_overrides([])
    elif _is_overrides(cfg):
        cfg = config_from_overrides(cfg)  # type: ignore[arg-type]
    else:
        cfg = check(cfg)  # type: ignore[arg-type]
    if model is not None:
        cfg = dataclasses.replace(cfg, model=model)
    if data is not None:
        cfg = dataclasses.replace(cfg, data=data)
    if cache_dir is not None:
        cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, dir=str(cache_dir)))
    return cfg


def gather_activations(
    sites: str | Sequence[str],
    n_tokens: int,
    cfg: Config | Sequence[str] | None = None,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """`collect_activations` gathered into one [rows, width] tensor per site (rows ≤ n_tokens,
    fewer only where the held-out split ends): memory is the budget n_tokens × width (per site)
    and one batch. The keyword arguments are collect_activations's."""
    out: dict[str, torch.Tensor] = {}
    filled = 0
    for batch in collect_activations(sites, n_tokens, cfg, **kwargs):
        n = next(iter(batch.values())).shape[0]
        for site, rows in batch.items():
            if site not in out:
                out[site] = torch.empty(n_tokens, rows.shape[1], dtype=rows.dtype)
            out[site][filled : filled + n] = rows.cpu()
        filled += n
    return {site: rows[:filled] for site, rows in out.items()}
