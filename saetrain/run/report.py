"""What a run says and records about itself: the console lines (each dictionary announced, the
held-out summary), the provenance saetrain_run.json keeps (config, versions, git revision, stream,
metrics, training log), and the SAELens metadata of cfg.json (which the model card reads)."""

from __future__ import annotations

import dataclasses
import logging
import platform
import subprocess
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from saetrain.activations.source import ActivationSource
from saetrain.config import Config, ModelConfig
from saetrain.progress import emit
from saetrain.run.load import Setup
from saetrain.run.plan import Job
from saetrain.training.fit import Fitted
from saetrain.training.initialization import scale_summary

log = logging.getLogger("saetrain.run")  # the run's one logger, whichever module of it writes


def tag(job: Job, jobs: list[Job]) -> str:
    """A progress line's prefix naming the dictionary, when the run has several."""
    return f"[{job.name}] " if len(jobs) > 1 else ""


def announce(job: Job) -> None:
    """One log line on what a trainer will train (and a CLT's decoder size: it grows with the
    square of the layer count)."""
    trainer = job.trainer
    assert trainer is not None
    dictionary = trainer.dictionary
    what = {"crosscoder": "crosscoder", "clt": "CLT"}.get(
        dictionary.kind, "transcoder" if job.transcoder else "SAE"
    )
    log.info(
        "dictionary %s: %s %s, %s → %s, %d latents; normalisation scales %s / %s; "
        "%d steps of %d tokens, lr %.3g",
        job.name,
        dictionary.architecture,
        what,
        ", ".join(job.inputs),
        ", ".join(job.targets),
        trainer.shard.n_latents if trainer.shard is not None else dictionary.n_latents,
        _scales_text(trainer.scale),
        _scales_text(trainer.target_scale),
        trainer.total_steps,
        trainer.cfg.batch_tokens,
        trainer.base_lr,
    )

    note = dictionary.memory_note()  # e.g. a CLT's triangular decoders
    if note is not None:
        log.info("dictionary %s: %s", job.name, note)


def _scales_text(scale: float | torch.Tensor) -> str:
    summary = scale_summary(scale)
    if isinstance(summary, list):
        return "[" + ", ".join(f"{v:.4g}" for v in summary) + "]"
    return f"{summary:.4g}"


def run_record(
    setup: Setup, job: Job, fitted: Fitted, metrics: dict[str, Any], stream_info: dict[str, Any]
) -> dict[str, Any]:
    """saetrain_run.json: what made the dictionary (configs, versions, revision, device, where it
    started from, its scales, the stream) and what it reached (tokens, metrics, training log)."""
    state = fitted.state
    return {
        "config": dataclasses.asdict(job.cfg),
        "run_config": dataclasses.asdict(setup.cfg) if len(setup.jobs) > 1 else None,
        "name": job.name,
        "versions": package_versions(),
        "git_revision": git_revision(),
        "device": str(setup.device),
        "tokens_seen": state.tokens,
        "steps": state.step,
        # dictionary.init_from: the folder it started from and what was taken from it.
        "init_from": job.start.record() if job.start is not None else None,
        "normalization_scale": scale_summary(fitted.scale_in),
        "target_normalization_scale": scale_summary(fitted.scale_out),
        "stream": stream_info,
        "train_seconds": stream_info["train_seconds"],
        "total_seconds": time.time() - setup.started,
        "final_metrics": metrics,
        "train_log": state.history,
    }


def saelens_metadata(
    cfg: Config,
    source: ActivationSource,
    architecture: str,
    inputs: list[str] | None = None,
    targets: list[str] | None = None,
) -> dict[str, Any]:
    """cfg.json's metadata block: which model, hook(s) and data the dictionary belongs to.

    `inputs` / `targets`: the sites of a dictionary that reads several (a crosscoder's sources, a
    CLT's layers); SAELens's single-hook fields then name the first, and `hook_names` (and
    `hook_names_out`) list them all.
    """
    inputs = inputs or [cfg.site.input]
    targets = targets or [cfg.site.target or cfg.site.input]
    resolved = source.sites[inputs[0]]
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
        "saetrain_site": inputs[0],
        # How the model loads (a packaged GGUF file, a revision): what `model_name` alone does
        # not say, so that a folder without its saetrain_run.json still evaluates offline.
        "saetrain_model": model_record(cfg.model),
    }
    if len(inputs) > 1:
        metadata |= {
            "saetrain_kind": cfg.dictionary.kind,
            "hook_names": [source.sites[site].tl_hook_name for site in inputs],
            "saetrain_sites": inputs,
        }
    if targets != inputs:
        resolved_out = source.sites[targets[0]]
        metadata |= {
            "hook_name_out": resolved_out.tl_hook_name,
            "hook_layer_out": resolved_out.site.layer,
            "hook_head_index_out": None,
            "saetrain_target_site": targets[0],
        }
        if len(targets) > 1:
            metadata |= {
                "hook_names_out": [source.sites[site].tl_hook_name for site in targets],
                "saetrain_target_sites": targets,
            }
    return metadata


def model_record(model: ModelConfig) -> dict[str, Any]:
    """The model group's fields that say how the model loads (not the machine's device)."""
    return {k: v for k, v in dataclasses.asdict(model).items() if k != "device"}


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
        "never_fired_fraction",
        "never_fired_tokens",
        "dense_count",
        "ce_clean",
        "ce_spliced",
        "ce_zero_ablated",
        "delta_ce",
        "ce_recovered",
        "kl_div",
    ):
        if key in metrics:
            whole = key.endswith(("_count", "_tokens"))  # counts print as counts
            lines.append(f"  {key:<20} {metrics[key]:{'.0f' if whole else '.4f'}}")
    for key, value in metrics.items():  # per site / layer / model: fvu.mlp_out.3, ce_spliced@b
        if ("." in key or "@" in key) and isinstance(value, float):
            lines.append(f"  {key:<20} {value:.4f}")
    if "dead_fraction" in metrics:  # not held-out: the training window's
        lines.append(
            f"training: dead_fraction {metrics['dead_fraction']:.4f} (no firing in the last "
            f"{metrics['dead_window_tokens']:.0f} training tokens)"
        )
    lines.append(f"dictionary saved to {folder}")
    emit("\n".join(lines), log)  # the console and the run's log file
