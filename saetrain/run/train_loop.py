"""The stream a run trains from and the training loop: the LM's (or the cache's) rows of every
site side by side, into a shuffling buffer of this rank's share of them; each dictionary's trainer
made (or restored from the checkpoint), then all trained together, one global batch per step,
checkpointed every `checkpoint.every_tokens` and on SIGTERM / SIGINT; and what saetrain_run.json
records about the stream once training is over."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saetrain.activations.buffer import ActivationBuffer
from saetrain.activations.model import TORCH_DTYPES
from saetrain.activations.stream import TrainingStream
from saetrain.config import Config
from saetrain.errors import ConfigError
from saetrain.run.load import Setup
from saetrain.run.plan import training_memory
from saetrain.run.report import announce
from saetrain.training.checkpoint import StopRequest, rng_state, save_checkpoint, set_rng_state
from saetrain.training.fit import prepare_trainer, restore_trainer, train_together
from saetrain.training.latent_shard import latent_shard

log = logging.getLogger("saetrain.run")  # the run's one logger, whichever module of it writes


@dataclass
class Feed:
    """The open stream, the buffer it fills, this rank's batch of rows, and when the first fill
    began (what the LM + buffer + training cost is timed from)."""

    stream: TrainingStream
    buffer: ActivationBuffer
    batch_tokens: int
    started: float


@dataclass
class Trained:
    """How long training took and how far it went (the first dictionary's tokens, a resumed run's
    checkpointed ones included; `resumed_tokens`: those)."""

    tokens: int
    resumed_tokens: int
    train_seconds: float
    pipeline_seconds: float  # from the first buffer fill to the last step


@contextmanager
def feeding(setup: Setup) -> Iterator[Feed]:
    """The stream and its buffer, sized for this rank (a resumed run's at its checkpointed
    position); the stream is closed on leaving."""
    cfg, checkpoint, sites, dp = setup.cfg, setup.checkpoint, setup.sites, setup.dp
    source, device = setup.source, setup.device
    row_width = sum(source.width(site) for site in sites)
    buffer_dtype = TORCH_DTYPES[cfg.buffer.dtype]
    total_steps = max(cfg.trainer.total_tokens // cfg.trainer.batch_tokens, 1)
    # This rank's buffer and batch: its share of the global ones (all of them in one process).
    buffer_tokens = dp.local(cfg.buffer.size_tokens)
    batch_tokens = dp.local(cfg.trainer.batch_tokens)
    # A run that draws fewer rows than the buffer holds reads only those (a quick look before a
    # long run does not fill a long run's buffer first).
    drawn = ActivationBuffer.holds_all_size(buffer_tokens, batch_tokens, total_steps)
    if drawn is not None:
        log.info(
            "buffer: this run draws %d rows (%d steps × %d), fewer than the buffer's %d "
            "(buffer.size_tokens); "
            "the buffer holds just those (filled once, shuffled, never refilled)",
            drawn,
            total_steps,
            batch_tokens,
            buffer_tokens,
        )
        buffer_tokens = drawn
    pipeline_start = time.time()
    stream = TrainingStream(
        source,
        setup.tokens,
        sites,
        buffer_dtype,
        cfg.buffer.lm_batch_contexts,
        setup.cache,
        _prefetch_batches(cfg, device),
        torch.Generator().manual_seed(cfg.seed + 1),
        limit_tokens=ActivationBuffer.rows_needed(
            buffer_tokens, batch_tokens, total_steps, holds_all=drawn is not None
        ),
        position=checkpoint["stream"] if checkpoint is not None else None,
    )
    try:
        buffer = ActivationBuffer(
            stream,
            buffer_tokens,
            row_width,
            buffer_dtype,
            device,
            torch.Generator().manual_seed(dp.seed(cfg.seed)),
            state=checkpoint["buffer"] if checkpoint is not None else None,
            holds_all=drawn is not None,
        )
        log.info(
            "buffer: %d tokens × %d sites (%d wide in all) (%s) = %.1f MiB on %s",
            buffer_tokens,
            len(sites),
            row_width,
            cfg.buffer.dtype,
            buffer.storage_bytes() / 2**20,
            device,
        )
        yield Feed(stream, buffer, batch_tokens, pipeline_start)
    finally:
        stream.close()


def train(setup: Setup, feed: Feed) -> Trained:
    """Each job this rank trains gets its trainer (`job.trainer`), and they train together to
    `trainer.total_tokens` (or until a signal, after a last checkpoint)."""
    cfg, jobs, dp = setup.cfg, setup.jobs, setup.dp
    stop = StopRequest()
    _make_trainers(setup, feed)
    if setup.checkpoint is not None:
        set_rng_state(setup.checkpoint["rng"])
    mine = [i for i, job in enumerate(jobs) if job.trainer is not None]
    trainers = [jobs[i].trainer for i in mine]
    dp.report_memory(training_memory(trainers, feed.buffer))

    def save(step: int) -> Path:
        state = {
            "format": 1,
            "config": dataclasses.asdict(cfg),
            "step": step,
            "names": [job.name for job in jobs],
            # Each dictionary's state from the rank that writes it (None elsewhere); a
            # latent-sharded one's from every rank, each its own latents.
            "trainers": [
                job.trainer.state_dict()
                if job.trainer is not None and (dp.writes(i) or job.trainer.state_per_rank)
                else None
                for i, job in enumerate(jobs)
            ],
            "buffer": feed.buffer.state_dict(),
            "stream": feed.stream.position(),
            "rng": rng_state(),
        }
        return save_checkpoint(setup.output_dir, step, state, cfg.checkpoint.keep_last, dp.world)

    every = cfg.checkpoint.every_tokens
    resumed_tokens = trainers[0].state.tokens  # 0 unless resumed
    train_start = time.time()
    with setup.guard.deferring_to(stop), dp.diverging_together():
        train_together(
            trainers,
            [jobs[i].view for i in mine],
            # The global batch, from every rank's rows (the columns this rank trains on).
            dp.batches(feed.buffer.next_batch, [job.columns for job in jobs]),
            cfg.logger.log_every,
            on_log=lambda i, row: setup.loggers[mine[i]].log(row),
            checkpoint_every=max(every // cfg.trainer.batch_tokens, 1) if every else 0,
            save=save,
            stop=dp.stop_agreed(stop.is_set),
        )
    train_seconds = time.time() - train_start
    pipeline_seconds = time.time() - feed.started
    return Trained(trainers[0].state.tokens, resumed_tokens, train_seconds, pipeline_seconds)


def _make_trainers(setup: Setup, feed: Feed) -> None:
    """A trainer for each job this rank trains: a fresh run's initialized from the first rows
    (every rank's share: the same samples on every rank), a resumed run's from the checkpoint."""
    cfg, checkpoint, jobs = setup.cfg, setup.checkpoint, setup.jobs
    dp, device = setup.dp, setup.device
    if checkpoint is None:  # every rank's share: the same samples on every rank
        samples = dp.gather(feed.buffer.peek(cfg.trainer.init_batches * feed.batch_tokens))
    for i, job in enumerate(jobs):
        name = job.name if len(jobs) > 1 else ""
        if not dp.mine(i):
            continue  # another rank trains it
        if checkpoint is None:
            job.trainer = prepare_trainer(
                job.cfg.dictionary,
                job.cfg.trainer,
                job.view(samples),
                job.d_in,
                job.d_out,
                job.transcoder,
                device,
                torch.Generator().manual_seed(job.cfg.seed),
                name=name,
                layout=job.layout,
                shard=latent_shard(job.cfg, dp.world, job.d_in),
                start=job.start,
            )
        else:
            if checkpoint["trainers"][i] is None:
                raise ConfigError(
                    f"resume: this rank ({dp.world.rank}) trains dictionary {job.name}, but "
                    "its state is in another rank's part of the checkpoint; resume with the "
                    "run's distributed.assign"
                )
            job.trainer = restore_trainer(
                job.cfg.dictionary,
                job.cfg.trainer,
                checkpoint["trainers"][i],
                job.d_in,
                job.d_out,
                job.transcoder,
                device,
                name=name,
                layout=job.layout,
                shard=latent_shard(job.cfg, dp.world, job.d_in),
            )
        announce(job)


def stream_record(setup: Setup, feed: Feed, trained: Trained) -> dict[str, Any]:
    """What saetrain_run.json records about the stream (the LM's token counts over every rank:
    under torchrun each ran the LM on its own share)."""
    cfg, checkpoint, cache, dp = setup.cfg, setup.checkpoint, setup.cache, setup.dp
    stream, buffer = feed.stream, feed.buffer
    counts = dp.total(
        {
            "lm_tokens": stream.lm_tokens,
            "lm_contexts": stream.lm_contexts,
            "cached_tokens": stream.cached_tokens,
        }
    )
    lm_tokens, lm_contexts, cached_tokens = (
        int(counts[k]) for k in ("lm_tokens", "lm_contexts", "cached_tokens")
    )
    train_seconds, pipeline_seconds = trained.train_seconds, trained.pipeline_seconds
    stream_info = {
        "sites": setup.sites,
        "buffer_tokens": cfg.buffer.size_tokens,
        "buffer_rows": buffer.size,  # this rank's: fewer when the run draws fewer (holds_all)
        "buffer_bytes": buffer.storage_bytes(),
        "lm_tokens": lm_tokens,
        "lm_contexts": lm_contexts,
        "cached_tokens": cached_tokens,
        "cache_dir": str(cache.folder) if cache is not None else None,
        "position": stream.position(),  # this rank's (every rank's is in the checkpoints)
        "world_size": dp.world.world_size,
        "resumed_at_step": checkpoint["step"] if checkpoint is not None else None,
        "train_seconds": train_seconds,
        # From the first buffer fill to the last step: what the LM + buffer + training cost.
        "pipeline_seconds": pipeline_seconds,
        # Tokens trained by this process: a resumed run's checkpointed tokens were made before.
        "tokens_per_s": (trained.tokens - trained.resumed_tokens) / max(train_seconds, 1e-9),
        "pipeline_rows_per_s": (lm_tokens + cached_tokens) / max(pipeline_seconds, 1e-9),
    }
    log.info(
        "trained %d dictionar%s on %d tokens in %.1f s (LM on %d tokens, %d from the cache)",
        len(setup.jobs),
        "y" if len(setup.jobs) == 1 else "ies",
        trained.tokens,
        train_seconds,
        lm_tokens,
        cached_tokens,
    )
    return stream_info


def _prefetch_batches(cfg: Config, device: torch.device) -> int:
    """buffer.prefetch_batches, or its default for the device (2 on a GPU, 0 on a CPU)."""
    if cfg.buffer.prefetch_batches is not None:
        return cfg.buffer.prefetch_batches
    return 2 if device.type == "cuda" else 0
