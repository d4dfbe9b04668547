"""Data and dictionary parallel: the ranks share the token stream, and the global batch each step.

Each rank runs the LM on its own share of the training contexts (every W-th, from its rank:
sharding.rank_items), fills its own buffer of buffer.size_tokens / W rows and draws
trainer.batch_tokens / W rows per step. The ranks' rows are gathered, in rank order, into the
global batch of trainer.batch_tokens rows, and every rank steps its dictionaries on that batch.

Why the rows travel rather than gradients: the TopK family's loss is a batch FVU (divided by the
batch's total variance), AuxK divides by its residual's variance, and BatchTopK keeps the k·N
largest activations of the whole batch. Per-rank losses with an all-reduce of their gradients
would train on other numbers than one process does; the gathered batch gives every statistic of
the data — the normalisation estimate and b_dec (from the gathered init samples), the
dead-latent counters, BatchTopK's threshold, the training metrics — exactly as one process
computes it, on every rank, with no further reduction. The exchange is small: a step moves
batch_tokens × width activations, where an all-reduce would move 2 × n_latents × width weights'
gradients. With one dictionary every rank takes its step (the LM forward, 10× the step's
cost, is the part that is split).

Several dictionaries (`dictionaries`) are spread over the ranks instead (sharding.
assign_dictionaries): each is trained by one rank, its owner, on the same global batch as in one
process. Each step every rank sends each other rank only the columns (sites) that rank's
dictionaries read, with one all_to_all: G ranks train G× the dictionaries in about the time of
one. The owner writes its dictionaries' folders and checkpoint states; rank 0 the rest.

At world size 1 every method returns what it was given: a single process runs today's code.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from saetrain.distributed.collectives import (
    all_gather_objects,
    all_gather_rows,
    all_reduce_,
    all_reduce_metrics,
    all_to_all,
    barrier,
    broadcast_object,
)
from saetrain.distributed.sharding import assign_dictionaries, local_batch, row_share
from saetrain.distributed.world import World
from saetrain.errors import ConfigError, TrainingDiverged

log = logging.getLogger(__name__)

# Each rank's buffer shuffles with its own generator: seed + stride·rank (rank 0 keeps the seed).
_RANK_SEED_STRIDE = 1_000_003
# What a rank reports after each step (rank_codes): carry on, stop (a signal), or diverged.
_GO, _STOP, _DIVERGED = 0, 1, 2


class _Agreed(TrainingDiverged):
    """A divergence every rank has heard of: raised the same way on each."""


class DataParallel:
    """One rank's part in a run whose ranks share the stream; the whole run at world size 1."""

    def __init__(self, world: World):
        self.world = world
        # The owner rank of each dictionary; None: every rank trains every one (one dictionary,
        # or one process).
        self.owners: list[int] | None = None

    @property
    def distributed(self) -> bool:
        return self.world.distributed

    def check(self, batch_tokens: int, buffer_tokens: int, cache_dir: str | None = None) -> None:
        """What the config must allow under W ranks (before anything loads). The activation
        cache (`cache_dir`) is allowed: each rank caches its own share (cache.py's key)."""
        if not self.distributed:
            return
        local_batch(batch_tokens, self.world.world_size, "trainer.batch_tokens")
        local_batch(buffer_tokens, self.world.world_size, "buffer.size_tokens")

    def own(self, costs: Sequence[float], strategy: str = "balanced") -> None:
        """Decide who trains which dictionary (`costs`: sharding.dictionary_cost of each)."""
        n, ranks = len(costs), self.world.world_size
        if not self.distributed or n == 1:
            self.owners = None
            return
        if n < ranks:
            raise ConfigError(
                f"{n} dictionaries on {ranks} ranks: each dictionary is trained by one rank, so "
                f"{ranks - n} would have none; start at most {n} ranks (torchrun "
                f"--nproc-per-node={n}), or train more dictionaries"
            )
        self.owners = assign_dictionaries(costs, ranks, strategy)
        log.info("dictionaries by rank: %s", self.owners)

    def mine(self, i: int) -> bool:
        """Whether this rank trains dictionary i."""
        return self.owners is None or self.owners[i] == self.world.rank

    def writes(self, i: int) -> bool:
        """Whether this rank writes dictionary i's files (its owner; rank 0 when all train it)."""
        return self.world.is_main if self.owners is None else self.owners[i] == self.world.rank

    def local(self, rows: int) -> int:
        """This rank's share of a global number of rows (checked to split evenly by `check`)."""
        return rows // self.world.world_size

    def seed(self, seed: int) -> int:
        """This rank's seed for what each rank draws for itself (its buffer's shuffling)."""
        return seed + _RANK_SEED_STRIDE * self.world.rank

    def decide(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (the run folder, the checkpoint to resume)."""
        return broadcast_object(self.world, value)

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, concatenated in rank order: the global rows, on every rank."""
        if not self.distributed:
            return rows
        return torch.cat(all_gather_rows(self.world, rows))

    def batches(
        self, draw: Callable[[int], torch.Tensor], columns: Sequence[Sequence[slice]] = ()
    ) -> Callable[[int], torch.Tensor]:
        """next_batch(n) for a global batch of n rows from each rank's `draw(n / W)`.

        `columns[i]`: the columns dictionary i reads. When dictionaries are spread over the
        ranks, each rank receives only its dictionaries' columns (the others are left 0).
        """
        if not self.distributed:
            return draw
        if self.owners is None:
            return lambda n: self.gather(draw(self.local(n)))
        wanted = [
            torch.tensor(
                sorted(
                    {
                        c
                        for i in range(len(columns))
                        if self.owners[i] == d
                        for s in columns[i]
                        for c in range(s.start, s.stop)
                    }
                ),
                dtype=torch.long,
            )
            for d in range(self.world.world_size)
        ]
        return lambda n: self._exchange(draw(self.local(n)), n, wanted)

    def _exchange(self, rows: torch.Tensor, n: int, wanted: list[torch.Tensor]) -> torch.Tensor:
        """all_to_all: rank d gets the `wanted[d]` columns of every rank's rows, placed at their
        global rows (rank order) and columns."""
        world = self.world
        idx = [w.to(rows.device) for w in wanted]
        got = all_to_all(world, [rows[:, w].contiguous() for w in idx])
        out = rows.new_zeros((n, rows.shape[1]))
        mine = idx[world.rank]
        for source, part in enumerate(got):
            out[row_share(n, world.world_size, source)].index_copy_(1, mine, part)
        return out

    def total(self, counts: dict[str, float]) -> dict[str, float]:
        """Numbers summed over ranks (tokens the LM ran on, ...)."""
        return all_reduce_metrics(self.world, counts)

    def stop_agreed(self, stop: Callable[[], bool]) -> Callable[[], bool]:
        """The training loop's after-step check, agreed by every rank: a signal seen by one rank
        stops all at the same step (their checkpoint is one), and a rank whose loss diverged
        (`diverging_together`) stops them all with its message."""
        if not self.distributed:
            return stop
        return lambda: self._agree(_STOP if stop() else _GO, "")

    @contextlib.contextmanager
    def diverging_together(self) -> Iterator[None]:
        """Around the training loop: this rank's TrainingDiverged (raised by Trainer.step, between
        two after-step checks) is told to the others at their next check, so every rank stops
        with the message and none waits for a step that will not come."""
        try:
            yield
        except TrainingDiverged as e:
            if not self.distributed or isinstance(e, _Agreed):
                raise
            self._agree(_DIVERGED, str(e))
            raise  # unreachable: _agree raised the agreed error

    def _agree(self, code: int, message: str) -> bool:
        world = self.world
        codes = torch.zeros(world.world_size, dtype=torch.int64, device=world.device)
        codes[world.rank] = code
        all_reduce_(world, codes, "sum")
        if (codes == _DIVERGED).any():
            messages = all_gather_objects(world, message)
            said = "; ".join(
                f"rank {r}: {m}"
                for r, (c, m) in enumerate(zip(codes.tolist(), messages, strict=True))
                if c == _DIVERGED
            )
            raise _Agreed(f"training diverged on {said} (every rank stopped)")
        return bool((codes == _STOP).any())

    def collect(self, items: list[Any]) -> list[Any]:
        """Every rank's items, in rank order (small, picklable: results, error messages)."""
        if not self.distributed:
            return items
        return [item for got in all_gather_objects(self.world, items) for item in got]

    def finish(self) -> None:
        """At the end of a run: no rank leaves before rank 0 has written everything."""
        barrier(self.world, "run finished")

    def report_memory(self, parts: dict[str, int]) -> None:
        """Rank 0 logs every rank's bytes of weights, Adam state and buffer."""
        every = all_gather_objects(self.world, parts)
        if not self.world.is_main:
            return
        for rank, got in enumerate(every):
            described = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in got.items())
            log.info("memory%s: %s", f" of rank {rank}" if self.distributed else "", described)


@contextlib.contextmanager
def only_main_reports(world: World) -> Iterator[None]:
    """Ranks other than 0 log warnings and errors only (rank 0 logs and prints progress)."""
    if world.is_main:
        yield
        return
    logger = logging.getLogger("saetrain")
    before = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(before)
