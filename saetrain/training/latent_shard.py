"""Latent sharding (`distributed.shard_latents=true`): one dictionary's latents split over ranks.

Why: at widths whose weights and Adam state do not fit on one device, each rank holds only its
latents [start, stop) (sharding.latent_slice): W_enc[:, s], b_enc[s], W_dec[s], their Adam state
and their dead-latent counters. b_dec and W_skip are replicated. Every rank holds the same global
batch (data_parallel.py gathers the rows), so a step is exactly one process's.

The step is the dictionary's own training_forward, run on the shard with
`Dictionary.latent_split` set to this rank's LatentShard, whose exchanges make every selection
and every sum over latents whole (the class says whether it can: `Dictionary.latent_sharding`):

- pre_s = x_in·W_enc[:, s] + b_enc[s]: the one dense product, split W ways;
- selection (the TopK family): each rank's top candidates (value, global index) are all_gathered
  and the top of the merged set is taken (`merge_top`); each rank keeps the winners in its shard
  (`keep_mine`). TopK merges per row, BatchTopK the k·N largest of the batch, AuxK the aux_k
  largest dead pre-activations per row (with the dead count summed over ranks). A candidate that
  wins globally is in its rank's local top list, so the merged selection is the one-process
  selection (saetrain/dictionaries/topk.py, batchtopk.py);
- sums over latents (`sum_parts`): the decoder's x̂ = Σ_r x̂_r + b_dec (+ x·W_skipᵀ), AuxK's
  decoder, Gated's auxiliary decoder, the penalties' per-row sums (so JumpReLU's quadratic L0
  penalty sees the global L0), each summed by an all_reduce; and the encoder input's gradient
  summed (`sum_gradients`).

The penalty family's extra per-latent tensors (JumpReLU's log θ, Gated's b_gate, b_mag, r_mag)
are split like b_enc. Matryoshka (nested prefixes of the latent axis) is not split.

Gradients. Every rank computes the same loss from the same sums, so the gradient reaching a
rank's part of a sum is the gradient of the sum itself: the sum's backward passes it
unchanged, and each shard's gradient is the one-process gradient's slice, with no exchange.
b_dec is reached twice: through x̂ (the same on every rank) and, for an SAE, through the
encoder input x − b_dec, where each rank sees only its own latents' part; that input passes an
op whose forward is the identity and whose backward sums the ranks' gradients. Adam is
elementwise, so each rank's state is a slice of one process's. Gradient clipping uses the global
norm (the shards' squares summed over ranks, replicated tensors counted once).

Evaluation and export: the folded shards are gathered on rank 0 into an ordinary dictionary,
which rank 0 evaluates on the held-out set and saves in the SAELens layout (the whole dictionary
must fit on rank 0's device then: once, without gradients or Adam state).

Initialisation: a fresh dictionary is initialised whole on each rank's CPU from the run's seed
(the one-process weights), then each rank keeps its latents on its device: host memory must hold
one whole fp32 dictionary per rank for that moment. A resume builds the shard alone.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from saetrain.activations.sites import Site
from saetrain.config import Config, TrainerConfig
from saetrain.dictionaries import KINDS, latents_per_input, shardable_architectures
from saetrain.dictionaries.base import (
    Dictionary,
    TrainOutput,
    active_count,
)
from saetrain.distributed.collectives import all_gather_equal, all_reduce_, gather_equal
from saetrain.distributed.sharding import latent_slice
from saetrain.distributed.world import World
from saetrain.errors import ConfigError
from saetrain.planning.expand import dictionary_configs
from saetrain.training.schedules import default_lr
from saetrain.training.trainer import Trainer

if TYPE_CHECKING:
    from saetrain.planning.model_shape import ModelShape
    from saetrain.training.fit import Fitted

log = logging.getLogger(__name__)

# The tensors split over ranks, by their latent axis; every other tensor is replicated.
LATENT_AXIS = {
    "W_enc": 1,
    "b_enc": 0,
    "W_dec": 0,
    "threshold": 0,
    "log_threshold": 0,
    "b_gate": 0,
    "b_mag": 0,
    "r_mag": 0,
}


def check_shardable(cfg: Config, world_size: int, shape: ModelShape) -> None:
    """Refuse, before the LM loads, what latent sharding does not support: an architecture whose
    class does not shard its latents, a crosscoder or CLT, a width that does not split evenly over
    the ranks."""
    if not cfg.distributed.shard_latents:
        return
    shardable = shardable_architectures()
    for i, (_, sub) in enumerate(dictionary_configs(cfg, shape.n_layers)):
        where = f"dictionaries[{i}]." if cfg.dictionaries else ""
        d = sub.dictionary
        if not KINDS[d.kind].shardable_kind:
            raise ConfigError(
                f"{where}dictionary.kind={d.kind!r} cannot be split over ranks yet "
                "(distributed.shard_latents=true); shard an SAE or transcoder (kind single), or "
                "set distributed.shard_latents=false"
            )
        if d.architecture not in shardable:
            raise ConfigError(
                f"{where}dictionary.architecture={d.architecture!r} cannot be split over ranks "
                f"(distributed.shard_latents=true); choose one of: {', '.join(shardable)}, or "
                "set distributed.shard_latents=false"
            )
        n = latents_per_input(d, shape.width(Site.parse(sub.site.input)))
        if n % world_size:
            raise ConfigError(
                f"{where}dictionary.n_latents={n} does not split evenly over {world_size} ranks "
                f"(distributed.shard_latents=true); choose a multiple of {world_size}"
            )


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum over ranks. Backward: the gradient unchanged (every rank's loss is the
    same function of the sum, so dL/dpart = dL/dsum on each)."""

    @staticmethod
    def forward(ctx: Any, world: World, part: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_reduce_(world, part.clone(), "sum")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return None, grad


class _SumGradientOverRanks(torch.autograd.Function):
    """Forward: the identity. Backward: the sum of the ranks' gradients (each rank's reaches the
    input only through its own latents)."""

    @staticmethod
    def forward(ctx: Any, world: World, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.world = world
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return None, all_reduce_(ctx.world, grad.clone(), "sum")


@dataclass(frozen=True)
class LatentShard:
    """This rank's latents of a dictionary of `n_latents`, and the exchanges that make its
    training step the whole dictionary's (a Dictionary's `latent_split`)."""

    world: World
    n_latents: int

    def __post_init__(self) -> None:
        if self.n_latents % self.world.world_size:
            raise ConfigError(
                f"dictionary.n_latents={self.n_latents} does not split evenly over "
                f"{self.world.world_size} ranks (distributed.shard_latents=true); choose a "
                f"multiple of {self.world.world_size}"
            )

    @property
    def latents(self) -> slice:
        return latent_slice(self.n_latents, self.world.world_size, self.world.rank)

    @property
    def start(self) -> int:
        return self.latents.start

    @property
    def n_local(self) -> int:
        return self.n_latents // self.world.world_size

    def describe(self) -> str:
        return f"latents {self.start}..{self.start + self.n_local - 1} of {self.n_latents}"

    # -- weights -------------------------------------------------------------------------------

    def sharded_tensors(
        self, dictionary: nn.Module, size: int
    ) -> list[tuple[str, int, torch.Tensor]]:
        """(name, latent axis, tensor) of the dictionary's tensors split over ranks, whose latent
        axis is `size` long now (BatchTopK's scalar threshold is replicated)."""
        held = dict(dictionary.named_parameters(recurse=False))
        held |= dict(dictionary.named_buffers(recurse=False))
        found = []
        for name, axis in LATENT_AXIS.items():
            t = held.get(name)
            if t is not None and t.dim() > axis and t.shape[axis] == size:
                found.append((name, axis, t))
        return found

    def split(self, dictionary: Dictionary) -> Dictionary:
        """Keep this rank's latents of a whole dictionary (in place; returns it)."""
        if dictionary.n_latents != self.n_latents:
            raise ValueError(
                f"a dictionary of {dictionary.n_latents} latents, not {self.n_latents}"
            )
        for name, axis, t in self.sharded_tensors(dictionary, self.n_latents):
            part = t.detach().narrow(axis, self.start, self.n_local).clone()
            is_param = isinstance(t, nn.Parameter)
            setattr(dictionary, name, nn.Parameter(part) if is_param else part)
        dictionary.n_latents = self.n_local
        return dictionary

    def gather(self, dictionary: Dictionary, dst: int = 0) -> Dictionary | None:
        """The whole dictionary, on rank `dst`, from every rank's shard (None on the others)."""
        whole = copy.deepcopy(dictionary) if self.world.rank == dst else None
        for name, axis, t in self.sharded_tensors(dictionary, self.n_local):
            parts = gather_equal(self.world, t.detach().movedim(axis, 0).contiguous(), dst)
            if whole is not None and parts is not None:
                joined = torch.cat(parts).movedim(0, axis).contiguous()
                setattr(
                    whole, name, nn.Parameter(joined) if isinstance(t, nn.Parameter) else joined
                )
        if whole is not None:
            whole.n_latents = self.n_latents
        return whole

    def gather_latent_values(self, values: torch.Tensor, dst: int = 0) -> torch.Tensor | None:
        """Per-latent numbers (dead-latent counters) of every shard, on rank `dst`."""
        parts = gather_equal(self.world, values, dst)
        return None if parts is None else torch.cat(parts)

    # -- exchanges -----------------------------------------------------------------------------

    def total(self, count: torch.Tensor | float) -> float:
        """A number summed over ranks (dead latents, active codes)."""
        t = torch.tensor(float(count), dtype=torch.float64, device=self.world.device)
        return float(all_reduce_(self.world, t, "sum"))

    def sum_parts(self, part: torch.Tensor) -> torch.Tensor:
        return _SumOverRanks.apply(self.world, part)

    def sum_gradients(self, x: torch.Tensor) -> torch.Tensor:
        return _SumGradientOverRanks.apply(self.world, x)

    def merge_top(
        self, values: torch.Tensor, index: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, global indices) [N, k] of the k largest of every rank's candidates [N, c].

        Values and indices travel together in float64 (exact for both: indices below 2^53)."""
        packed = torch.stack([values.double(), index.double()], dim=-1)
        merged = torch.cat(all_gather_equal(self.world, packed), dim=1)
        top = merged[..., 0].topk(k, dim=1, sorted=False).indices
        won = merged.gather(1, top.unsqueeze(-1).expand(*top.shape, 2))
        return won[..., 0], won[..., 1].long()

    def keep_mine(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(local indices, mask of the slots that are this shard's) of global winners; another
        shard's slot gets a local index spread over the shard, and its value must be masked."""
        mine = (index >= self.start) & (index < self.start + self.n_local)
        return torch.where(mine, index - self.start, index % self.n_local), mine


class ShardedTrainer(Trainer):
    """The Trainer of one rank's shard: the step over shards, and global clipping, L0 and dead
    fraction; its checkpoint state is this rank's shard (written in this rank's part)."""

    state_per_rank = True

    def __init__(
        self,
        dictionary: Dictionary,
        cfg: TrainerConfig,
        scale: float,
        total_steps: int,
        shard: LatentShard,
        target_scale: float | None = None,
        name: str = "",
    ):
        if dictionary.latent_sharding is None:
            raise ConfigError(
                f"dictionary.architecture={dictionary.architecture!r} "
                f"(kind {dictionary.kind}) cannot be split over ranks "
                "(distributed.shard_latents=true)"
            )
        super().__init__(dictionary, cfg, scale, total_steps, target_scale, name)
        self.shard = shard
        if cfg.lr is None:  # the whole dictionary's width sets the default
            self.base_lr = default_lr(shard.n_latents)
        log.info("%slatent shard: %s per rank", f"[{name}] " if name else "", shard.n_local)

    def forward(self, x: torch.Tensor, y: torch.Tensor, sparsity: float) -> TrainOutput:
        """The dictionary's own training_forward, its selections and sums over latents made
        whole through this shard (Dictionary.latent_split)."""
        d = self.dictionary
        d.latent_split = self.shard  # the hooks' autograd ops are in the graph once it returns
        try:
            return d.training_forward(x, y, self.dead_mask(), sparsity)
        finally:
            d.latent_split = None

    def mean_l0(self, out: TrainOutput, rows: int) -> float:
        return self.shard.total(active_count(out.codes)) / rows

    def clip_gradients(self, max_norm: float) -> None:
        """torch's clip_grad_norm_ over the whole dictionary: Σ‖g‖² of the shards summed over
        ranks, the replicated gradients' counted once."""
        sharded = {
            name for name, _, _ in self.shard.sharded_tensors(self.dictionary, self.shard.n_local)
        }
        own = torch.zeros((), dtype=torch.float32, device=self.dictionary.W_enc.device)
        common = own.clone()
        grads = []
        for name, p in self.dictionary.named_parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            sq = torch.linalg.vector_norm(p.grad).float().pow(2)
            if name in sharded:
                own += sq
            else:
                common += sq
        total = (all_reduce_(self.shard.world, own, "sum") + common).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))

    def batch_metrics(self, y: torch.Tensor, out: TrainOutput) -> dict[str, float]:
        metrics = super().batch_metrics(y, out)
        metrics["l0"] = self.mean_l0(out, y.shape[0])
        return metrics

    def dead_fraction(self) -> float:
        return self.shard.total(self.dead_mask().sum()) / self.shard.n_latents

    def state_dict(self) -> dict[str, Any]:
        world = self.shard.world
        where = {
            "rank": world.rank,
            "world_size": world.world_size,
            "n_latents": self.shard.n_latents,
        }
        return super().state_dict() | {"latent_shard": where}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        world = self.shard.world
        got = state.get("latent_shard")
        want = {
            "rank": world.rank,
            "world_size": world.world_size,
            "n_latents": self.shard.n_latents,
        }
        if got != want:
            raise ConfigError(
                f"resume: the checkpoint's state of this rank's dictionary is {got or 'unsharded'}"
                f", this run's is {want}; resume with the run's distributed.shard_latents and "
                "number of ranks"
            )
        super().load_state_dict(state)

    def gathered(self, fitted: Fitted, dst: int = 0) -> Fitted | None:
        """The folded dictionary whole, with its dead-latent counters, on rank `dst`."""
        whole = self.shard.gather(fitted.exported, dst)
        counters = self.shard.gather_latent_values(fitted.tokens_since_fired, dst)
        if whole is None or counters is None:
            return None
        return dataclasses.replace(fitted, exported=whole.eval(), tokens_since_fired=counters)


def latent_shard(cfg: Config, world: World, d_in: int) -> LatentShard | None:
    """This rank's shard of the dictionary `cfg` describes (None without shard_latents)."""
    if not cfg.distributed.shard_latents:
        return None
    return LatentShard(world, latents_per_input(cfg.dictionary, d_in))


__all__ = ["LatentShard", "ShardedTrainer", "check_shardable", "latent_shard"]
