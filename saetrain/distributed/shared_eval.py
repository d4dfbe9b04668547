"""The held-out evaluation of one dictionary shared by the ranks that all hold it.

Why: under data parallel every rank holds the same dictionary, and each evaluating all of the
held-out contexts would repeat the same LM forwards N times. Each rank takes a contiguous share
of every held-out batch's contexts (sharding.row_share), and the sums the metrics are made of are
reduced: the reconstruction statistics (ReconstructionStats.merged, around one shift, so the
FVU's total variance is the one over every rank's rows) and the CE sums (each rank's per-token
means times its token count). The metrics are then those of one pass over the whole held-out
set, up to the LM's float rounding at another batch size.

At world size 1 every function returns what it was given.
"""

from __future__ import annotations

from typing import Any

from saetrain.activations.tokens import TokenBatch
from saetrain.distributed.collectives import all_gather_objects
from saetrain.distributed.sharding import row_share
from saetrain.distributed.world import World
from saetrain.evaluation.metrics import ReconstructionStats, ce_recovered

# spliced_lm_metrics's per-token means, summed over ranks weighted by their tokens.
_CE_MEANS = {
    "clean": "ce_clean",
    "spliced": "ce_spliced",
    "zero": "ce_zero_ablated",
    "kl": "kl_div",
}


def my_contexts(world: World, batches: list[TokenBatch]) -> list[TokenBatch]:
    """This rank's contexts of each batch (batches a rank has no context of are left out)."""
    if not world.distributed:
        return batches
    out = []
    for batch in batches:
        share = row_share(len(batch), world.world_size, world.rank)
        if share.stop > share.start:
            out.append(TokenBatch(batch.input_ids[share], batch.mask[share]))
    return out


def reduce_stats(world: World, stats: ReconstructionStats) -> ReconstructionStats:
    """Every rank's held-out reconstruction statistics, merged (the same on every rank)."""
    if not world.distributed:
        return stats
    parts = all_gather_objects(world, _portable(stats))
    return ReconstructionStats.merged(parts)


def _portable(stats: ReconstructionStats) -> ReconstructionStats:
    """A CPU copy for pickling (a CUDA tensor would travel as a device handle)."""
    copy = ReconstructionStats(stats.n_latents, stats.sum_x.numel(), "cpu")
    copy.rows = stats.rows
    copy.shift = None if stats.shift is None else stats.shift.cpu()
    copy.sum_x, copy.sum_sq_x = stats.sum_x.cpu(), stats.sum_sq_x.cpu()
    copy.sum_sq_err, copy.sum_l0 = stats.sum_sq_err.cpu(), stats.sum_l0.cpu()
    copy.fire_counts = stats.fire_counts.cpu()
    return copy


def reduce_ce(world: World, metrics: dict[str, float] | None) -> dict[str, float]:
    """spliced_lm_metrics's result over every rank's contexts (`metrics`: this rank's, None when
    it had no context)."""
    if not world.distributed:
        if metrics is None:
            raise ValueError("no contexts for the CE evaluation")
        return metrics
    mine: dict[str, Any] = {"tokens": 0.0} | {k: 0.0 for k in _CE_MEANS}
    if metrics is not None:
        mine["tokens"] = metrics["ce_tokens"]
        mine |= {k: metrics[name] * metrics["ce_tokens"] for k, name in _CE_MEANS.items()}
    every = all_gather_objects(world, mine)
    count = sum(part["tokens"] for part in every)
    if count == 0:
        raise ValueError("no valid next-token positions in the CE evaluation batches")
    ce = {k: sum(part[k] for part in every) / count for k in _CE_MEANS}
    return {
        "ce_clean": ce["clean"],
        "ce_spliced": ce["spliced"],
        "ce_zero_ablated": ce["zero"],
        "delta_ce": ce["spliced"] - ce["clean"],
        "ce_recovered": ce_recovered(ce["clean"], ce["spliced"], ce["zero"]),
        "kl_div": ce["kl"],
        "ce_tokens": float(count),
    }
