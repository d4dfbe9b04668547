"""An LM's activation rows at one site, held in memory for a benchmark.

Benchmarks train many dictionaries on the same rows, so the LM runs once and its rows are kept
as one float32 tensor. `saetrain.activations.collect` serves the API's batches (per site, through
a run's training stream and its cache); here a plain tensor of the first `n` rows of a token
stream is what every comparison needs, taken straight from the hooked forward.
"""

from __future__ import annotations

import os
import sysconfig
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch

from saetrain.activations.model import load_lm
from saetrain.activations.source import ActivationSource
from saetrain.config import DataConfig, ModelConfig


def default_data(data_glob: str | None = None, sample_by: str = "document") -> DataConfig:
    """Text files matching `data_glob`, else the Python standard library (configs/data default)."""
    data = DataConfig(sample_by=sample_by)
    files = data_glob or os.path.join(sysconfig.get_paths()["stdlib"], "*.py")
    return replace(data, data_files=[files])


def lm_source(model_cfg: ModelConfig, site: str, device: torch.device):
    """(model, tokenizer, source): the LM loaded as runs load it, hooked at `site`."""
    model, tokenizer = load_lm(model_cfg, device)
    return model, tokenizer, ActivationSource(model, [site])


def collect_rows(source: ActivationSource, batches: Iterable, site: str, n: int) -> torch.Tensor:
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


def lm_forward_rate(source, batches, site: str, rows_wanted: int) -> dict[str, float]:
    """Rows/s of `source` (an ActivationSource) over token batches until `rows_wanted` rows of
    `site` are out, after one warm-up batch: the LM's own rate, what training is measured
    against."""
    source(next(batches).input_ids)  # warm-up
    rows = 0
    if source.device.type == "cuda":
        torch.cuda.synchronize(source.device)
    start = time.perf_counter()
    for batch in batches:
        acts = source(batch.input_ids)
        rows += int(acts[site][batch.mask.to(source.device)].shape[0])
        if rows >= rows_wanted:
            break
    if source.device.type == "cuda":
        torch.cuda.synchronize(source.device)
    seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds}


def save_rows(path: Path, train: torch.Tensor, held_out: torch.Tensor, meta: dict) -> None:
    """Training and held-out rows in one file, read back by `load_rows` (a later benchmark run
    then skips the LM): {"train", "held_out", "meta"} with meta's "site" and "seed"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"train": train.cpu(), "held_out": held_out.cpu(), "meta": meta}, path)


def load_rows(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train, held_out, meta) as `save_rows` wrote them, in float32."""
    saved = torch.load(path)
    return saved["train"].float(), saved["held_out"].float(), saved.get("meta", {})
