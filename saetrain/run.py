"""One run, wired end to end: LM + data → buffer → trainer → evaluation → export."""

from __future__ import annotations

import copy
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
from saetrain.config import Config, validate
from saetrain.dictionaries import build_dictionary
from saetrain.evaluation.evaluate import evaluate_dictionary
from saetrain.export.saelens import save_dictionary
from saetrain.training.initialization import initial_b_dec, normalization_scale
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
    site = cfg.site.input
    source = ActivationSource(model, [site])  # unknown site / layer out of range fail here
    d = source.d_model

    tokens = TokenSource(cfg.data, tokenizer, cfg.seed)
    n_eval_contexts = max(math.ceil(cfg.eval.n_tokens / cfg.data.context_size), 1)
    held_out = tokens.held_out(
        max(n_eval_contexts, cfg.eval.ce_contexts if cfg.eval.compute_ce else 0),
        cfg.eval.batch_contexts,
    )
    chunks = source.flat(
        tokens.training(cfg.buffer.lm_batch_contexts), site, TORCH_DTYPES[cfg.buffer.dtype]
    )
    buffer = ActivationBuffer(
        chunks, cfg.buffer.size_tokens, d, TORCH_DTYPES[cfg.buffer.dtype], device, generator
    )

    samples = buffer.peek(cfg.trainer.init_batches * cfg.trainer.batch_tokens).float()
    scale = normalization_scale(samples) if cfg.dictionary.normalize_activations else 1.0
    dictionary = build_dictionary(cfg.dictionary, d, d, device, generator)
    with torch.no_grad():
        b_dec = initial_b_dec(samples * scale, cfg.dictionary.b_dec_init)
        dictionary.b_dec.copy_(b_dec.to(dictionary.b_dec.dtype))
    log.info(
        "dictionary: %s, d_in %d, %d latents, k %d; normalisation scale %.4g",
        dictionary.architecture,
        d,
        dictionary.n_latents,
        cfg.dictionary.k,
        scale,
    )

    total_steps = max(cfg.trainer.total_tokens // cfg.trainer.batch_tokens, 1)
    trainer = Trainer(dictionary, cfg.trainer, scale, total_steps)
    log.info(
        "training on %d tokens: %d steps of %d, lr %.3g",
        total_steps * cfg.trainer.batch_tokens,
        total_steps,
        cfg.trainer.batch_tokens,
        trainer.base_lr,
    )
    train_start = time.time()
    state = trainer.train(buffer.next_batch, cfg.logger.log_every)
    train_seconds = time.time() - train_start

    exported = copy.deepcopy(dictionary).eval()
    exported.fold_input_scale(scale, scale)
    log.info("evaluating on %d held-out contexts", sum(len(b) for b in held_out))
    metrics = evaluate_dictionary(
        source, site, exported, held_out, cfg.eval.compute_ce, cfg.eval.ce_contexts
    )
    metrics["train_dead_fraction"] = float(trainer.dead_mask().double().mean())

    resolved = source.sites[site]
    sae_metadata = {
        "model_name": cfg.model.name,
        "hook_name": resolved.tl_hook_name,
        "hook_layer": resolved.site.layer,
        "hook_head_index": None,
        "context_size": cfg.data.context_size,
        "prepend_bos": cfg.data.prepend_bos,
        "dataset_path": cfg.data.path if cfg.data.path != "text" else "local text files",
        "model_from_pretrained_kwargs": {},
        "saetrain_site": site,
    }
    run_info = {
        "config": dataclasses.asdict(cfg),
        "versions": package_versions(),
        "git_revision": git_revision(),
        "device": str(device),
        "tokens_seen": state.tokens,
        "steps": state.step,
        "normalization_scale": scale,
        "train_seconds": train_seconds,
        "total_seconds": time.time() - started,
        "final_metrics": metrics,
        "train_log": state.history,
    }
    dictionary_dir = save_dictionary(exported, output_dir / site, sae_metadata, run_info)
    print_summary(metrics, dictionary_dir)
    return RunResult(output_dir, dictionary_dir, metrics)


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
            lines.append(f"  {key:<16} {metrics[key]:.4f}")
    lines.append(f"dictionary saved to {folder}")
    print("\n".join(lines), flush=True)
