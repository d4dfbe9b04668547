"""Initialise, train and fold one dictionary from a source of activation batches.

Shared by `run()` and the benchmark scripts, so that every dictionary is made the same way:
normalisation scales and b_dec from the first activations, the trainer loop, then the scales
folded into a copy that works on raw activations.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from saetrain.config import DictionaryConfig, TrainerConfig
from saetrain.dictionaries import Dictionary, build_dictionary
from saetrain.training.initialization import initial_b_dec, normalization_scale
from saetrain.training.trainer import Trainer, TrainState


@dataclass
class Fitted:
    exported: Dictionary  # folded: works on raw activations
    trainer: Trainer
    state: TrainState
    scale_in: float
    scale_out: float


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
    """Train on `next_batch(n)` (raw rows; [x, y] side by side for a transcoder).

    `samples` are raw rows used for the normalisation scales and b_dec's initial value.
    """
    samples = samples.float()
    x, y = (samples[:, :d_in], samples[:, d_in:]) if transcoder else (samples, samples)
    normalize = dict_cfg.normalize_activations
    scale_in = normalization_scale(x) if normalize else 1.0
    scale_out = normalization_scale(y) if normalize and transcoder else scale_in
    dictionary = build_dictionary(dict_cfg, d_in, d_out, device, generator, transcoder)
    with torch.no_grad():
        b_dec = initial_b_dec(y.to(device) * scale_out, dict_cfg.b_dec_init)
        dictionary.b_dec.copy_(b_dec.to(dictionary.b_dec.dtype))
    total_steps = max(trainer_cfg.total_tokens // trainer_cfg.batch_tokens, 1)
    trainer = Trainer(dictionary, trainer_cfg, scale_in, total_steps, target_scale=scale_out)
    if on_ready is not None:
        on_ready(dictionary, trainer)
    state = trainer.train(next_batch, log_every)
    exported = copy.deepcopy(dictionary).eval()
    exported.fold_input_scale(scale_in, scale_out)
    return Fitted(exported, trainer, state, scale_in, scale_out)
