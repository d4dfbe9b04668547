"""Which share of the work is this rank's: contexts of the stream, rows of a batch, dictionaries
of a list, latents of a dictionary.

Pure functions of (sizes, rank, world size): every rank computes every other rank's share the
same way, with no communication, and a resumed run with the same world size gets the same shares.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

from saetrain.errors import ConfigError

T = TypeVar("T")
ASSIGNMENTS = ("balanced", "round_robin")


def share_bounds(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of `total` items; the first total % world_size
    ranks hold one more, so shares differ by at most one and cover everything once."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of a world of {world_size}")
    if total < 0:
        raise ValueError(f"cannot share {total} items")
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def share_sizes(total: int, world_size: int) -> list[int]:
    """Every rank's share of `total`, in rank order (what share_bounds gives each)."""
    return [b - a for a, b in (share_bounds(total, world_size, r) for r in range(world_size))]


def local_batch(global_batch: int, world_size: int, what: str = "trainer.batch_tokens") -> int:
    """Each rank's rows of a global batch. The batch stays the global one, so it must split
    evenly: unequal shares would weigh one rank's rows more in a mean of means."""
    if global_batch % world_size:
        raise ConfigError(
            f"{what}={global_batch} does not split evenly over {world_size} ranks; choose a "
            f"multiple of {world_size}"
        )
    return global_batch // world_size


def row_share(n_rows: int, world_size: int, rank: int) -> slice:
    """The rows of a global batch [n_rows, ...] that rank holds (contiguous, in rank order, so
    concatenating the ranks' rows gives the global batch back)."""
    return slice(*share_bounds(n_rows, world_size, rank))


def rank_items(items: Iterable[T], world_size: int, rank: int, skip_local: int = 0) -> Iterator[T]:
    """Rank's items of a stream dealt round robin: global item j·W + rank is its j-th.

    For the training contexts: every rank packs the same deterministic stream and keeps every
    W-th context, so the ranks' contexts together are exactly the single process's, whatever the
    LM batch size. `skip_local` skips this rank's first contexts (its checkpointed position).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of a world of {world_size}")
    return itertools.islice(items, skip_local * world_size + rank, None, world_size)


def global_index(local: int, world_size: int, rank: int) -> int:
    """The stream position of rank's `local`-th item under rank_items."""
    return local * world_size + rank


def dictionary_cost(n_latents: int, d_in: int, d_out: int) -> float:
    """What a dictionary weighs on its rank: its weights (and Adam's two copies of them) and
    its step's FLOPs both grow with n·(d_in + d_out)."""
    return float(n_latents * (d_in + d_out))


def assign_dictionaries(
    costs: Sequence[float], world_size: int, strategy: str = "balanced"
) -> list[int]:
    """The owner rank of each dictionary of a list.

    round_robin: dictionary i on rank i % W. balanced: the heaviest first, each to the rank with
    the least load so far (ties: the lower rank), which keeps the largest rank's load, and so the
    step time, near the mean. Deterministic: every rank computes the same owners.
    """
    if strategy not in ASSIGNMENTS:
        raise ConfigError(
            f"distributed.assign={strategy!r}; choose one of: {', '.join(ASSIGNMENTS)}"
        )
    if world_size < 1:
        raise ValueError(f"a world of {world_size}")
    if strategy == "round_robin":
        return [i % world_size for i in range(len(costs))]
    owners = [0] * len(costs)
    load = [0.0] * world_size
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


def owned_by(owners: Sequence[int], rank: int) -> list[int]:
    """The indices of the dictionaries that `rank` owns, in list order."""
    return [i for i, owner in enumerate(owners) if owner == rank]


def latent_slice(n_latents: int, world_size: int, rank: int) -> slice:
    """Rank's latents of a dictionary sharded on its latent axis (distributed.shard_latents):
    W_enc[:, s], b_enc[s], W_dec[s], threshold[s] and their Adam state. Contiguous, in rank
    order, so local latent i is global latent s.start + i and gathering in rank order gives
    the SAELens layout back."""
    return slice(*share_bounds(n_latents, world_size, rank))
