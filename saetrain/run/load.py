"""What a run loads before it streams: the LM (and model_b) as a source of the dictionaries'
sites, the dictionaries laid out against it, the data with its held-out contexts, the activation
cache, and one logger per dictionary."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saetrain.activations.cache import ActivationCache, activation_key_fields
from saetrain.activations.model import TORCH_DTYPES, load_lm
from saetrain.activations.paired import PairedSource, check_same_tokenizer, split_sites
from saetrain.activations.source import ActivationSource
from saetrain.activations.tokens import TokenBatch, TokenSource
from saetrain.config import Config, second_model
from saetrain.distributed.data_parallel import DataParallel
from saetrain.loggers import CompositeLogger, open_logger
from saetrain.planning.model_shape import ModelShape
from saetrain.progress import phase
from saetrain.run.plan import Begun, Job, job_cost, lay_out_jobs, plan_dictionaries
from saetrain.training.run_folder import RunGuard


@dataclass
class Setup:
    """What the run loaded before training: the LM as a source, the data, the jobs, loggers."""

    cfg: Config
    output_dir: Path
    checkpoint: dict[str, Any] | None  # set when resuming
    jobs: list[Job]
    loggers: list[CompositeLogger]
    source: ActivationSource
    tokens: TokenSource
    held_out: list[TokenBatch]
    cache: ActivationCache | None
    device: torch.device
    sites: list[str]
    started: float
    dp: DataParallel
    guard: RunGuard  # the run's signal handler: the training loop's signals go to a StopRequest

    def abort_loggers(self) -> None:
        """A run that failed: each logger says so (a finished logger ignores it)."""
        for logger in self.loggers:
            logger.abort()


def load(
    cfg: Config, shape: ModelShape, begun: Begun, guard: RunGuard, dp: DataParallel, started: float
) -> Setup:
    """The LM(s), the dictionaries' jobs (shared out between the ranks of a torchrun), the data,
    the cache and the loggers."""
    world = dp.world
    device = world.device
    with phase(f"model load ({cfg.model.name})"):
        model, tokenizer = load_lm(cfg.model, device)
    planned = plan_dictionaries(cfg, shape)
    source = _source(cfg, model, tokenizer, planned.sites, device)
    jobs = lay_out_jobs(planned, source)
    # Several dictionaries under torchrun: each trained (and written) by one rank, unless each is
    # split over every rank (distributed.shard_latents).
    if not cfg.distributed.shard_latents:
        dp.own([job_cost(job) for job in jobs], cfg.distributed.assign)

    tokens = TokenSource(cfg.data, tokenizer, cfg.seed, world.rank, world.world_size)
    n_eval_contexts = max(math.ceil(cfg.eval.n_tokens / cfg.data.context_size), 1)
    with phase("held-out contexts"):  # tokenizes until enough held-out documents are found
        held_out = tokens.held_out(
            max(n_eval_contexts, cfg.eval.ce_contexts if cfg.eval.compute_ce else 0),
            cfg.eval.batch_contexts,
        )
    cache = None
    if cfg.cache.dir is not None:
        cache = ActivationCache(
            cfg.cache.dir,
            activation_key_fields(cfg, planned.sites, world.rank, world.world_size),
            {site: source.width(site) for site in planned.sites},
            TORCH_DTYPES[cfg.buffer.dtype],
            cfg.cache.shard_tokens,
            cfg.cache.verify,
        )
    loggers = _loggers(cfg, begun.output_dir, jobs, dp)
    return Setup(cfg, begun.output_dir, begun.checkpoint, jobs, loggers, source, tokens,
                 held_out, cache, device, planned.sites, started, dp, guard)  # fmt: skip


def _loggers(
    cfg: Config, output_dir: Path, jobs: list[Job], dp: DataParallel
) -> list[CompositeLogger]:
    """One logger per dictionary: a real one on the rank that writes it, an empty one elsewhere
    (those opened before a failure are aborted)."""
    loggers: list[CompositeLogger] = []
    try:
        for i, job in enumerate(jobs):
            loggers.append(
                open_logger(
                    cfg.logger,
                    output_dir / job.name,
                    dataclasses.asdict(job.cfg),
                    prefix=job.name if len(jobs) > 1 else "",
                )
                if dp.writes(i)
                else CompositeLogger([])  # another rank writes this dictionary's rows
            )
    except BaseException:
        for logger in loggers:
            logger.abort()
        raise
    return loggers


def _source(
    cfg: Config, model: torch.nn.Module, tokenizer: Any, sites: list[str], device: torch.device
) -> ActivationSource:
    """The LM as a source of the sites; with model_b, both models on the same tokens (unknown
    site / layer out of range fail here)."""
    if second_model(cfg) is None:
        return ActivationSource(model, sites)
    model_b_cfg = dataclasses.replace(cfg.model_b, device=cfg.model.device)
    with phase(f"model load ({model_b_cfg.name}, model_b)"):
        model_b, tokenizer_b = load_lm(model_b_cfg, device)
    check_same_tokenizer(tokenizer, tokenizer_b, cfg.model.name, model_b_cfg.name)
    sites_a, sites_b = split_sites(sites)
    return PairedSource(ActivationSource(model, sites_a), ActivationSource(model_b, sites_b))
