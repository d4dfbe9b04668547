"""One dictionary trained on a tensor of rows, for comparisons between dictionaries.

Every dictionary trained by `fit_on_rows` on the same tensor and seed sees the same rows in the
same order (one permutation of the rows per seed); `fit_in_order` takes rows already in a random
order (synthetic ones) as they come, for any layout (a transcoder, a CLT). Both make it with
saetrain.training.fit, the one way runs make dictionaries, so that comparisons are about the
dictionaries alone.
"""

from __future__ import annotations

import torch

from saetrain.config import DictionaryConfig, TrainerConfig
from saetrain.dictionaries import Dictionary, Layout
from saetrain.training.fit import Fitted, fit_dictionary, fold, prepare_trainer

# Rows used for the normalisation scale and b_dec (as run() with init_batches = 8 × 2048).
INIT_ROWS = 16_384


def fit_on_rows(
    dict_cfg: DictionaryConfig,
    trainer_cfg: TrainerConfig,
    acts: torch.Tensor,
    seed: int,
    device: torch.device,
    init_rows: int = INIT_ROWS,
) -> Fitted:
    """Train one dictionary on the rows of `acts` [N, d] (an SAE: input = target).

    The rows are taken in one random order (a permutation seeded by `seed`, the same for every
    dictionary given the same tensor and seed); the init (scale, b_dec) reads the first
    `init_rows` rows of that order; the same generator then seeds the dictionary's init.
    `trainer_cfg.total_tokens` sets how many rows are drawn (at most N: the order is not reused).
    """
    if trainer_cfg.total_tokens > len(acts):
        raise ValueError(
            f"trainer.total_tokens={trainer_cfg.total_tokens} exceeds the {len(acts)} rows given"
        )
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(acts), generator=gen).to(acts.device)
    cursor = [0]

    def next_batch(n: int) -> torch.Tensor:
        rows = order[cursor[0] : cursor[0] + n]
        cursor[0] += n
        return acts[rows]

    return fit_dictionary(
        dict_cfg,
        trainer_cfg,
        next_batch,
        acts[order[:init_rows]],
        acts.shape[1],
        acts.shape[1],
        False,
        device,
        gen,
        log_every=10**9,
    )


def fit_in_order(
    dict_cfg: DictionaryConfig,
    trainer_cfg: TrainerConfig,
    rows: torch.Tensor,
    init_rows: int,
    layout: Layout,
    device: torch.device,
    seed: int,
) -> Dictionary:
    """A transcoder of `layout` (its inputs then its targets side by side in each row of `rows`)
    initialised on the first `init_rows` rows and trained on the rows after them, in order; the
    exported (folded) dictionary. `seed` seeds its init."""
    gen = torch.Generator().manual_seed(seed)
    trainer = prepare_trainer(
        dict_cfg, trainer_cfg, rows[:init_rows], layout.d_in, layout.d_out,
        True, device, gen, layout=layout,
    )  # fmt: skip
    cursor = [init_rows]

    def next_batch(m: int) -> torch.Tensor:
        out = rows[cursor[0] : cursor[0] + m]
        cursor[0] += m
        return out

    trainer.train(next_batch, 10**9)
    return fold(trainer).exported
