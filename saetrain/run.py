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
from saetrain.activations.model import TORCH_DTYPES, load_lm, resolve_device
from saetrain.activations.source import ActivationSource
from saetrain.activations.tokens import LOCAL_BUILDERS, TokenSource, expand_data_files
from saetrain.config import Config, ConfigError, validate
from saetrain.dictionaries import Dictionary
from saetrain.evaluation.evaluate import evaluate_dictionary
from saetrain.export.saelens import save_dictionary
from saetrain.training.fit import fit_dictionary
from saetrain.training.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path
    dictionary_dir: Path
    metrics: dict[str, float]


def run(cfg: Config, output_dir: str | Path) -> RunResult:
    """Train, evaluate and save one dictionary as `cfg` describes, under `output_dir`."""
    validate(cfg)
    started = time.time()
    output_dir = Path(output_dir)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
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
    input_site = cfg.site.input
    target_site = cfg.site.target or input_site
    transcoder = target_site != input_site
    sites = [input_site, target_site] if transcoder else [input_site]
    source = ActivationSource(model, sites)  # unknown site / layer out of range fail here
    d_in = d_out = source.d_model

    tokens = TokenSource(cfg.data, tokenizer, cfg.seed)
    n_eval_contexts = max(math.ceil(cfg.eval.n_tokens / cfg.data.context_size), 1)
    held_out = tokens.held_out(
        max(n_eval_contexts, cfg.eval.ce_contexts if cfg.eval.compute_ce else 0),
        cfg.eval.batch_contexts,
    )
    buffer_dtype = TORCH_DTYPES[cfg.buffer.dtype]
    rows = source.rows(tokens.training(cfg.buffer.lm_batch_contexts), sites, buffer_dtype)
    width = d_in + d_out if transcoder else d_in
    buffer = ActivationBuffer(rows, cfg.buffer.size_tokens, width, buffer_dtype, device, generator)

    samples = buffer.peek(cfg.trainer.init_batches * cfg.trainer.batch_tokens)

    def announce(dictionary: Dictionary, trainer: Trainer) -> None:
        log.info(
            "dictionary: %s %s, %s → %s, %d latents; normalisation scales %.4g / %.4g",
            dictionary.architecture,
            "transcoder" if transcoder else "SAE",
            input_site,
            target_site,
            dictionary.n_latents,
            trainer.scale,
            trainer.target_scale,
        )
        log.info(
            "training on %d tokens: %d steps of %d, lr %.3g",
            trainer.total_steps * cfg.trainer.batch_tokens,
            trainer.total_steps,
            cfg.trainer.batch_tokens,
            trainer.base_lr,
        )

    train_start = time.time()
    fitted = fit_dictionary(
        cfg.dictionary,
        cfg.trainer,
        buffer.next_batch,
        samples,
        d_in,
        d_out,
        transcoder,
        device,
        generator,
        cfg.logger.log_every,
        on_ready=announce,
    )
    train_seconds = time.time() - train_start
    exported, trainer, state = fitted.exported, fitted.trainer, fitted.state

    log.info("evaluating on %d held-out contexts", sum(len(b) for b in held_out))
    metrics = evaluate_dictionary(
        source,
        exported,
        held_out,
        input_site,
        target_site,
        cfg.eval.compute_ce,
        cfg.eval.ce_contexts,
    )
    metrics["train_dead_fraction"] = float(trainer.dead_mask().double().mean())

    sae_metadata = saelens_metadata(cfg, source, exported.architecture)
    run_info = {
        "config": dataclasses.asdict(cfg),
        "versions": package_versions(),
        "git_revision": git_revision(),
        "device": str(device),
        "tokens_seen": state.tokens,
        "steps": state.step,
        "normalization_scale": fitted.scale_in,
        "target_normalization_scale": fitted.scale_out,
        "train_seconds": train_seconds,
        "total_seconds": time.time() - started,
        "final_metrics": metrics,
        "train_log": state.history,
    }
    folder = f"{input_site}-{target_site}" if transcoder else input_site
    dictionary_dir = save_dictionary(exported, output_dir / folder, sae_metadata, run_info)
    print_summary(metrics, dictionary_dir)
    return RunResult(output_dir, dictionary_dir, metrics)


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


def print_summary(metrics: dict[str, Any], folder: Path) -> None:
    lines = ["", "held-out evaluation:"]
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
