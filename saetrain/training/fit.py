"""Initialise, train and fold one dictionary from a source of activation batches.

Shared by `run()` and the benchmark scripts, so that every dictionary is made the same way:
normalisation scales and b_dec from the first activations, the trainer loop, then the scales
folded into a copy that works on raw activations.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from saetrain.config import DictionaryConfig, TrainerConfig
from saetrain.dictionaries import Dictionary, Layout, build_dictionary
from saetrain.dictionaries.base import Scale
from saetrain.errors import ConfigError, TrainingInterrupted
from saetrain.progress import phase
from saetrain.training.finetune import Start, start_fvu, start_weights_
from saetrain.training.initialization import block_normalization_scales, initial_b_dec
from saetrain.training.latent_shard import LatentShard, ShardedTrainer
from saetrain.training.trainer import Trainer, TrainState

log = logging.getLogger(__name__)


@dataclass
class Fitted:
    exported: Dictionary  # folded: works on raw activations
    trainer: Trainer
    state: TrainState
    scale_in: Scale
    scale_out: Scale
    # The trainer's dead-latent counters (every latent's, when a sharded dictionary is gathered).
    tokens_since_fired: torch.Tensor = field(default_factory=lambda: torch.zeros(0))


def prepare_trainer(
    dict_cfg: DictionaryConfig,
    trainer_cfg: TrainerConfig,
    samples: torch.Tensor,
    d_in: int,
    d_out: int,
    transcoder: bool,
    device: torch.device,
    generator: torch.Generator,
    name: str = "",
    layout: Layout | None = None,
    shard: LatentShard | None = None,
    start: Start | None = None,
) -> Trainer:
    """A new dictionary, its normalisation scales and b_dec set from `samples`, and its trainer.

    `samples` are raw rows ([x, y] side by side for a transcoder). With a `layout` of several
    sites (a crosscoder, a CLT), each site gets its own scale. With `shard`, the dictionary is
    initialised whole on the CPU (the same weights as one process), and this rank keeps its
    latents on `device`. With `start` (dictionary.init_from), the dictionary is the folder's
    instead, in the normalised space of the folder's recorded scales or of those estimated here
    (saetrain/training/finetune.py).
    """
    layout = layout or Layout.single(d_in, d_out)
    # Usually quick; a line (and a name for a signal's message) when it is not.
    with phase(f"initialisation{f' of {name}' if name else ''}", quiet_below=2.0):
        samples = samples.float()
        x, y = (samples[:, :d_in], samples[:, d_in:]) if transcoder else (samples, samples)
        normalize = dict_cfg.normalize_activations
        scale_in: Scale = block_normalization_scales(x, layout.in_widths) if normalize else 1.0
        scale_out: Scale = (
            block_normalization_scales(y, layout.out_widths)
            if normalize and transcoder
            else scale_in
        )
        if start is not None and start.scales is not None and normalize:
            scale_in, scale_out = start.scales  # the space the folder's weights were trained in
        where = torch.device("cpu") if shard is not None else device
        dictionary = build_dictionary(dict_cfg, d_in, d_out, where, generator, transcoder, layout)
        if start is not None:
            assert not isinstance(scale_in, torch.Tensor)  # one site: validate() refuses others
            assert not isinstance(scale_out, torch.Tensor)
            start_weights_(dictionary, start, scale_in, scale_out)
            fvu = start_fvu(dictionary, (x * scale_in).to(where), (y * scale_out).to(where))
            log.info(
                "%sstarting dictionary: FVU %.4f on the %d initialisation rows",
                f"[{name}] " if name else "", fvu, x.shape[0],
            )  # fmt: skip
        else:
            _initial_b_dec(dictionary, y, scale_out, dict_cfg.b_dec_init, where)
    total_steps = max(trainer_cfg.total_tokens // trainer_cfg.batch_tokens, 1)
    if shard is not None:
        local = shard.split(dictionary).to(device)
        return ShardedTrainer(
            local, trainer_cfg, scale_in, total_steps, shard, target_scale=scale_out, name=name
        )
    return Trainer(
        dictionary, trainer_cfg, scale_in, total_steps, target_scale=scale_out, name=name
    )


@torch.no_grad()
def _initial_b_dec(
    dictionary: Dictionary, y: torch.Tensor, scale_out: Scale, method: str, where: torch.device
) -> None:
    """b_dec of a new dictionary from the raw targets `y` (dictionary.b_dec_init)."""
    # per-column scales broadcast over the columns
    s_out = scale_out.to(y.device) if isinstance(scale_out, torch.Tensor) else scale_out
    b_dec = initial_b_dec((y * s_out).to(where), method)
    dictionary.b_dec.copy_(b_dec.to(dictionary.b_dec.dtype))


def restore_trainer(
    dict_cfg: DictionaryConfig,
    trainer_cfg: TrainerConfig,
    state: dict,
    d_in: int,
    d_out: int,
    transcoder: bool,
    device: torch.device,
    name: str = "",
    layout: Layout | None = None,
    shard: LatentShard | None = None,
) -> Trainer:
    """A trainer continuing from a checkpoint's `state` (see Trainer.state_dict); with `shard`,
    this rank's latents only (its own part of the checkpoint)."""
    total_steps = max(trainer_cfg.total_tokens // trainer_cfg.batch_tokens, 1)
    if shard is not None:
        local_cfg = dataclasses.replace(dict_cfg, n_latents=shard.n_local)
        dictionary = build_dictionary(local_cfg, d_in, d_out, device, None, transcoder)
        trainer: Trainer = ShardedTrainer(
            dictionary,
            trainer_cfg,
            state["scale"],
            total_steps,
            shard,
            target_scale=state["target_scale"],
            name=name,
        )
        trainer.load_state_dict(state)
        return trainer
    if "latent_shard" in state:
        raise ConfigError(
            f"resume: the checkpoint's dictionary{f' {name}' if name else ''} is split over ranks "
            "(distributed.shard_latents=true); resume with distributed.shard_latents=true"
        )
    dictionary = build_dictionary(dict_cfg, d_in, d_out, device, None, transcoder, layout)
    trainer = Trainer(
        dictionary,
        trainer_cfg,
        state["scale"],
        total_steps,
        target_scale=state["target_scale"],
        name=name,
    )
    trainer.load_state_dict(state)
    return trainer


def train_together(
    trainers: list[Trainer],
    views: list[Callable[[torch.Tensor], torch.Tensor]],
    next_batch: Callable[[int], torch.Tensor],
    log_every: int,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    checkpoint_every: int = 0,
    save: Callable[[int], object] | None = None,
    stop: Callable[[], bool] | None = None,
) -> None:
    """Train several dictionaries on the same batches: one draw from the stream per step.

    `views[i]` picks trainer i's columns (its sites) out of the shared batch. Continues from the
    trainers' current step (a resumed run). Every `checkpoint_every` steps, and when `stop()`
    turns true (a signal), `save(step)` is called; after a stop, TrainingInterrupted is raised.
    """
    if not trainers:
        return
    total_steps = trainers[0].total_steps
    batch_tokens = trainers[0].cfg.batch_tokens
    first = trainers[0].state.step
    start_tokens = [t.state.tokens for t in trainers]
    start = time.perf_counter()
    for step in range(first, total_steps):
        batch = next_batch(batch_tokens)
        for i, (trainer, view) in enumerate(zip(trainers, views, strict=True)):
            y, out = trainer.step(view(batch))
            row = trainer.maybe_log(y, out, log_every, time.perf_counter() - start, start_tokens[i])
            if row is not None and on_log is not None:
                on_log(i, row)
        done = step + 1
        if stop is not None and stop():
            if save is not None:
                where = save(done)
                raise TrainingInterrupted(
                    f"stopped by a signal after step {done}; checkpoint written to {where}",
                    where if isinstance(where, Path) else None,
                )
            raise TrainingInterrupted(f"stopped by a signal after step {done}")
        if save is not None and checkpoint_every and done % checkpoint_every == 0:
            if done < total_steps:
                save(done)


def fold(trainer: Trainer) -> Fitted:
    """A copy of the trained dictionary with the normalisation folded in (works on raw input)."""
    exported = copy.deepcopy(trainer.dictionary).eval()
    exported.fold_input_scale(trainer.scale, trainer.target_scale)
    return Fitted(
        exported,
        trainer,
        trainer.state,
        trainer.scale,
        trainer.target_scale,
        trainer.tokens_since_fired.clone(),
    )


def fit_dictionary(
    dict_cfg: DictionaryConfig,
    trainer_cfg: TrainerConfig,
    next_batch: Callable[[int], torch.Tensor],
    samples: torch.Tensor,
    d_in: int,
    d_out: int,
    transcoder: bool,
    device: torch.device,
    generator: torch.Generator,
    log_every: int,
    on_ready: Callable[[Dictionary, Trainer], None] | None = None,
) -> Fitted:
    """Initialise, train on `next_batch(n)` and fold one dictionary."""
    trainer = prepare_trainer(
        dict_cfg, trainer_cfg, samples, d_in, d_out, transcoder, device, generator
    )
    if on_ready is not None:
        on_ready(trainer.dictionary, trainer)
    trainer.train(next_batch, log_every)
    return fold(trainer)
