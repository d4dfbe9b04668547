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

# replacement_lm_metrics's per-token means (for each model: `ce_clean`, `ce_clean@b`, ...), summed
# over ranks weighted by their tokens.
_CE_MEANS = ("ce_clean", "ce_spliced", "ce_zero_ablated", "kl_div")


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
    """replacement_lm_metrics's result over every rank's contexts (`metrics`: this rank's, None
    when it had no context); each model's numbers (a model-diffing pair's `@b` too)."""
    if not world.distributed:
        if metrics is None:
            raise ValueError("no contexts for the CE evaluation")
        return metrics
    mine: dict[str, Any] = {"tokens": 0.0}
    if metrics is not None:
        mine["tokens"] = metrics["ce_tokens"]
        mine |= {
            key: value * metrics["ce_tokens"]
            for key, value in metrics.items()
            if key.startswith(_CE_MEANS)
        }
    every = all_gather_objects(world, mine)
    count = sum(part["tokens"] for part in every)
    if count == 0:
        raise ValueError("no valid next-token positions in the CE evaluation batches")
    keys = {key for part in every for key in part if key != "tokens"}
    ce = {key: sum(part.get(key, 0.0) for part in every) / count for key in keys}
    out: dict[str, float] = {}
    for suffix in sorted(key[len("ce_clean") :] for key in keys if key.startswith("ce_clean")):
        clean, spliced = ce[f"ce_clean{suffix}"], ce[f"ce_spliced{suffix}"]
        zero = ce[f"ce_zero_ablated{suffix}"]
        out |= {
            f"ce_clean{suffix}": clean,
            f"ce_spliced{suffix}": spliced,
            f"ce_zero_ablated{suffix}": zero,
            f"delta_ce{suffix}": spliced - clean,
            f"ce_recovered{suffix}": ce_recovered(clean, spliced, zero),
            f"kl_div{suffix}": ce[f"kl_div{suffix}"],
        }
    out["ce_tokens"] = float(count)
    return out
