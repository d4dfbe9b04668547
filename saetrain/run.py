"""One run, wired end to end: LM + data → buffer → trainer → evaluation → export."""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from saetrain.activations.buffer import ActivationBuffer
from saetrain.activations.cache import ActivationCache, activation_key_fields
from saetrain.activations.model import TORCH_DTYPES, load_lm, resolve_device
from saetrain.activations.source import ActivationSource
from saetrain.activations.stream import TrainingStream
from saetrain.activations.tokens import LOCAL_BUILDERS, TokenSource, expand_data_files
from saetrain.config import Config, ConfigError, dictionary_configs, validate
from saetrain.evaluation.evaluate import evaluate_dictionary
from saetrain.export.saelens import save_dictionary
from saetrain.training.fit import fold, prepare_trainer, train_together
from saetrain.training.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class DictionaryResult:
    name: str
    dictionary_dir: Path
    metrics: dict[str, float]


@dataclass
class RunResult:
    output_dir: Path
    dictionary_dir: Path  # the first dictionary's folder
    metrics: dict[str, float]  # the first dictionary's held-out metrics
    dictionaries: list[DictionaryResult]


@dataclass
class _Job:
    """One dictionary of the run: its config, where its columns sit in the stream, its trainer."""

    name: str
    cfg: Config
    input_site: str
    target_site: str
    columns: list[slice]
    trainer: Trainer | None = None

    @property
    def transcoder(self) -> bool:
        return self.target_site != self.input_site

    def view(self, rows: torch.Tensor) -> torch.Tensor:
        """This dictionary's raw rows ([x] or [x, y]) out of the stream's rows."""
        if len(self.columns) == 1:
            return rows[:, self.columns[0]]
        return torch.cat([rows[:, c] for c in self.columns], dim=-1)


def run(cfg: Config, output_dir: str | Path) -> RunResult:
    """Train, evaluate and save every dictionary `cfg` describes, from one LM pass."""
    validate(cfg)
    started = time.time()
    output_dir = Path(output_dir)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.model.device)
    if cfg.data.path in LOCAL_BUILDERS:
        expand_data_files(list(cfg.data.data_files))  # a missing file fails before the LM loads

    model, tokenizer = load_lm(cfg.model, device)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and cfg.data.context_size > positions:
        raise ConfigError(
            f"data.context_size={cfg.data.context_size} exceeds the model's "
            f"max_position_embeddings={positions}"
        )
    configs = dictionary_configs(cfg)
    sites: list[str] = []
    for _, sub in configs:
        for site in (sub.site.input, sub.site.target or sub.site.input):
            if site not in sites:
                sites.append(site)
    source = ActivationSource(model, sites)  # unknown site / layer out of range fail here
    d = source.d_model
    column = {site: slice(i * d, (i + 1) * d) for i, site in enumerate(sites)}
    jobs: list[_Job] = []
    for name, sub in configs:
        target = sub.site.target or sub.site.input
        cols = [column[sub.site.input]] + ([column[target]] if target != sub.site.input else [])
        jobs.append(_Job(name, sub, sub.site.input, target, cols))

    tokens = TokenSource(cfg.data, tokenizer, cfg.seed)
    n_eval_contexts = max(math.ceil(cfg.eval.n_tokens / cfg.data.context_size), 1)
    held_out = tokens.held_out(
        max(n_eval_contexts, cfg.eval.ce_contexts if cfg.eval.compute_ce else 0),
        cfg.eval.batch_contexts,
    )
    buffer_dtype = TORCH_DTYPES[cfg.buffer.dtype]
    cache = None
    if cfg.cache.dir is not None:
        cache = ActivationCache(
            cfg.cache.dir,
            activation_key_fields(cfg, sites),
            dict.fromkeys(sites, d),
            buffer_dtype,
            cfg.cache.shard_tokens,
            cfg.cache.verify,
        )
    stream = TrainingStream(
        source,
        tokens,
        sites,
        buffer_dtype,
        cfg.buffer.lm_batch_contexts,
        cache,
        cfg.buffer.prefetch_batches,
        torch.Generator().manual_seed(cfg.seed + 1),
        limit_tokens=ActivationBuffer.rows_needed(
            cfg.buffer.size_tokens,
            cfg.trainer.batch_tokens,
            max(cfg.trainer.total_tokens // cfg.trainer.batch_tokens, 1),
        ),
    )
    try:
        buffer = ActivationBuffer(
            stream,
            cfg.buffer.size_tokens,
            d * len(sites),
            buffer_dtype,
            device,
            torch.Generator().manual_seed(cfg.seed),
        )
        log.info(
            "buffer: %d tokens × %d sites × %d (%s) = %.1f MiB on %s",
            cfg.buffer.size_tokens,
            len(sites),
            d,
            cfg.buffer.dtype,
            buffer.storage_bytes() / 2**20,
            device,
        )
        samples = buffer.peek(cfg.trainer.init_batches * cfg.trainer.batch_tokens)
        for job in jobs:
            job.trainer = prepare_trainer(
                job.cfg.dictionary,
                job.cfg.trainer,
                job.view(samples),
                d,
                d,
                job.transcoder,
                device,
                torch.Generator().manual_seed(job.cfg.seed),
                name=job.name if len(jobs) > 1 else "",
            )
            _announce(job)
        train_start = time.time()
        trainers = [job.trainer for job in jobs if job.trainer is not None]
        train_together(
            trainers, [job.view for job in jobs], buffer.next_batch, cfg.logger.log_every
        )
        train_seconds = time.time() - train_start
    finally:
        stream.close()
    stream_info = {
        "sites": sites,
        "buffer_tokens": cfg.buffer.size_tokens,
        "buffer_bytes": buffer.storage_bytes(),
        "lm_tokens": stream.lm_tokens,
        "lm_contexts": stream.lm_contexts,
        "cached_tokens": stream.cached_tokens,
        "cache_dir": str(cache.folder) if cache is not None else None,
        "train_seconds": train_seconds,
        "tokens_per_s": trainers[0].state.tokens / max(train_seconds, 1e-9),
    }
    log.info(
        "trained %d dictionar%s on %d tokens in %.1f s (%.0f tok/s; LM on %d tokens, %d from "
        "the cache)",
        len(jobs),
        "y" if len(jobs) == 1 else "ies",
        trainers[0].state.tokens,
        train_seconds,
        stream_info["tokens_per_s"],
        stream.lm_tokens,
        stream.cached_tokens,
    )

    results: list[DictionaryResult] = []
    for job in jobs:
        assert job.trainer is not None
        fitted = fold(job.trainer)
        exported, trainer, state = fitted.exported, fitted.trainer, fitted.state
        log.info("%sevaluating on %d held-out contexts", _tag(job, jobs), _n_contexts(held_out))
        metrics = evaluate_dictionary(
            source,
            exported,
            held_out,
            job.input_site,
            job.target_site,
            cfg.eval.compute_ce,
            cfg.eval.ce_contexts,
        )
        metrics["train_dead_fraction"] = float(trainer.dead_mask().double().mean())
        run_info = {
            "config": dataclasses.asdict(job.cfg),
            "run_config": dataclasses.asdict(cfg) if len(jobs) > 1 else None,
            "name": job.name,
            "versions": package_versions(),
            "git_revision": git_revision(),
            "device": str(device),
            "tokens_seen": state.tokens,
            "steps": state.step,
            "normalization_scale": fitted.scale_in,
            "target_normalization_scale": fitted.scale_out,
            "stream": stream_info,
            "train_seconds": train_seconds,
            "total_seconds": time.time() - started,
            "final_metrics": metrics,
            "train_log": state.history,
        }
        sae_metadata = saelens_metadata(job.cfg, source, exported.architecture)
        folder = save_dictionary(exported, output_dir / job.name, sae_metadata, run_info)
        print_summary(metrics, folder, job.name if len(jobs) > 1 else None)
        results.append(DictionaryResult(job.name, folder, metrics))
    return RunResult(output_dir, results[0].dictionary_dir, results[0].metrics, results)


def _tag(job: _Job, jobs: list[_Job]) -> str:
    return f"[{job.name}] " if len(jobs) > 1 else ""


def _n_contexts(batches: list) -> int:
    return sum(len(b) for b in batches)


def _announce(job: _Job) -> None:
    trainer = job.trainer
    assert trainer is not None
    dictionary = trainer.dictionary
    log.info(
        "dictionary %s: %s %s, %s → %s, %d latents; normalisation scales %.4g / %.4g; "
        "%d steps of %d tokens, lr %.3g",
        job.name,
        dictionary.architecture,
        "transcoder" if job.transcoder else "SAE",
        job.input_site,
        job.target_site,
        dictionary.n_latents,
        trainer.scale,
        trainer.target_scale,
        trainer.total_steps,
        trainer.cfg.batch_tokens,
        trainer.base_lr,
    )


def saelens_metadata(cfg: Config, source: ActivationSource, architecture: str) -> dict[str, Any]:
    """cfg.json's metadata block: which model, hook(s) and data the dictionary belongs to."""
    resolved = source.sites[cfg.site.input]
    metadata: dict[str, Any] = {
        "model_name": cfg.model.name,
        "hook_name": resolved.tl_hook_name,
        "hook_layer": resolved.site.layer,
        "hook_head_index": None,
        "context_size": cfg.data.context_size,
        "prepend_bos": cfg.data.prepend_bos,
        "dataset_path": cfg.data.path if cfg.data.path != "text" else "local text files",
        "model_from_pretrained_kwargs": {},
        "saetrain_architecture": architecture,
        "saetrain_site": cfg.site.input,
    }
    target = cfg.site.target
    if target is not None and target != cfg.site.input:
        resolved_out = source.sites[target]
        metadata |= {
            "hook_name_out": resolved_out.tl_hook_name,
            "hook_layer_out": resolved_out.site.layer,
            "hook_head_index_out": None,
            "saetrain_target_site": target,
        }
    return metadata


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("saetrain", "torch", "transformers", "datasets", "safetensors", "hydra-core"):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision() -> str | None:
    """The saetrain source's git commit, when it runs from a checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return rev.stdout.strip() or None if rev.returncode == 0 else None


def print_summary(metrics: dict[str, Any], folder: Path, name: str | None = None) -> None:
    lines = ["", f"held-out evaluation{f' of {name}' if name else ''}:"]
    for key in (
        "fvu",
        "fvu_zero_baseline",
        "mse",
        "l0",
        "dead_fraction",
        "ce_clean",
        "ce_spliced",
        "ce_zero_ablated",
        "delta_ce",
        "ce_recovered",
        "kl_div",
    ):
        if key in metrics:
            lines.append(f"  {key:<18} {metrics[key]:.4f}")
    lines.append(f"dictionary saved to {folder}")
    print("\n".join(lines), flush=True)
