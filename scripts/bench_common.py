"""What the benchmark scripts share: the default model's activations and one way to train on them.

`scripts/pareto.py` and `scripts/quality_bench.py` import it (they run with scripts/ on sys.path,
as `python scripts/X.py` puts it there):

    default_data(glob, sample_by)      the data config: text files, else the Python stdlib
    lm_source(model_cfg, site, device) (model, tokenizer, ActivationSource) for one site
    collect_rows(source, batches, site, n)  the first n activation rows of a token stream
    fit_on_rows(dict_cfg, trainer_cfg, acts, seed, device)  one dictionary trained on a tensor

Every dictionary trained by `fit_on_rows` on the same tensor and seed sees the same rows in the
same order (one permutation of the rows per seed), and is made by saetrain.training.fit, the one
way runs make dictionaries, so that comparisons are about the dictionaries alone.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterable
from dataclasses import replace

import torch

from saetrain.config import DataConfig, DictionaryConfig, ModelConfig, TrainerConfig
from saetrain.training.fit import Fitted, fit_dictionary

# Rows used for the normalisation scale and b_dec (as run() with init_batches = 8 × 2048).
INIT_ROWS = 16_384


def default_data(data_glob: str | None = None, sample_by: str = "document") -> DataConfig:
    """Text files matching `data_glob`, else the Python standard library (configs/data default)."""
    data = DataConfig(sample_by=sample_by)
    files = data_glob or os.path.join(sysconfig.get_paths()["stdlib"], "*.py")
    return replace(data, data_files=[files])


def lm_source(model_cfg: ModelConfig, site: str, device: torch.device):
    """(model, tokenizer, source): the LM loaded as runs load it, hooked at `site`."""
    from saetrain.activations.model import load_lm
    from saetrain.activations.source import ActivationSource

    model, tokenizer = load_lm(model_cfg, device)
    return model, tokenizer, ActivationSource(model, [site])


def collect_rows(source, batches: Iterable, site: str, n: int) -> torch.Tensor:
    """The first `n` activation rows (float32, special positions excluded) of `batches` at `site`.

    Fewer when `batches` ends first (a finite list of held-out contexts).
    """
    chunks, have = [], 0
    for rows in source.rows(iter(batches), [site], torch.float32):
        chunks.append(rows)
        have += len(rows)
        if have >= n:
            break
    if not chunks:
        raise ValueError(f"no activation rows came from the token batches at {site}")
    return torch.cat(chunks)[:n]


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
