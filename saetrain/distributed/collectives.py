"""Every exchange between ranks: the one place that communicates over torch.distributed.

Each function takes the World and is a no-op (returning its input) at world size 1, so a
single-process run calls the same code without a process group. Sizes travel first where they
differ between ranks: gloo's all_gather needs equal shapes, so variable rows are padded.

Portable across gloo (CPU tests) and NCCL (GPUs), for torch >= 2.3:
- mean is a sum divided by the world size (ReduceOp.AVG is missing on older gloo);
- exchanges use all_to_all_single with split sizes (in gloo since 2020), never the list form
  all_to_all, which older gloo refuses ("ProcessGroup gloo does not support alltoall");
- reduce_scatter is not used: gloo gained the list form only in 2025.
A collective that fails or times out raises DistributedError naming this rank. After one, a gloo
group is broken ("Application timeout caused pair closure"): stop, do not communicate again.
"""

from __future__ import annotations

import datetime
import math
import re
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from saetrain.distributed.world import World, mark_broken
from saetrain.errors import DistributedError

_OPS = ("sum", "max", "min")
_SHAPE_SLOTS = 8  # all_to_all sends each shape as 8 int64 slots: ndim, then up to 7 sizes


@contextmanager
def _failing_as(world: World, what: str) -> Iterator[None]:
    """Turn torch.distributed's errors into a DistributedError that names rank and operation."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as e:
        mark_broken()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"rank {world.rank} of {world.world_size}: {what} failed: {first} (another rank has "
            f"probably died or stopped answering; distributed.timeout_s={world.timeout_s:g}; "
            "see the other ranks' logs)"
        ) from e


def _op(name: str) -> Any:
    return getattr(dist.ReduceOp, name.upper())


def all_reduce_(world: World, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce `tensor` in place across ranks (sum, max or min) and return it."""
    if op not in _OPS:
        raise ValueError(f"reduce op {op!r}; choose one of: {', '.join(_OPS)}")
    if not world.distributed:
        return tensor
    reduce_op = _op(op)
    with _failing_as(world, f"all_reduce({op}) of {tuple(tensor.shape)} {tensor.dtype}"):
        dist.all_reduce(tensor, op=reduce_op)
    return tensor


def all_reduce_mean_(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """The mean over ranks, in place (a floating tensor)."""
    if not tensor.is_floating_point():
        raise TypeError(f"all_reduce_mean_ needs a floating tensor, not {tensor.dtype}")
    if not world.distributed:
        return tensor
    return all_reduce_(world, tensor, "sum").div_(world.world_size)


def all_reduce_many_(
    world: World, tensors: Sequence[torch.Tensor], op: str = "sum"
) -> Sequence[torch.Tensor]:
    """Reduce several tensors in place with one collective per (dtype, device): gradients.

    Every rank must pass the same shapes in the same order (a missing gradient is a zero one,
    never left out, or the flat buffers would not line up).
    """
    if not world.distributed or not tensors:
        return tensors
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        all_reduce_(world, flat, op)
        for t, part in zip(group, flat.split([t.numel() for t in group]), strict=True):
            t.copy_(part.view_as(t))
    return tensors


def _key_hashes(keys: Sequence[str]) -> list[float]:
    """Two 16-bit hashes of the metric names: small enough that the checks below are exact."""
    crc = zlib.crc32("\0".join(keys).encode())
    return [float(crc & 0xFFFF), float(crc >> 16)]


def all_reduce_metrics(
    world: World, metrics: dict[str, float], op: str = "sum"
) -> dict[str, float]:
    """Reduce a dict of numbers across ranks in float64 (sums of squares, counts, totals).

    Every rank must pass the same keys. Hashes of them travel with the values, reduced so that
    every rank can tell whether all ranks sent the same (for a sum: W·Σh² = (Σh)² only when all h
    are equal; for max/min: max h = −max(−h)); a mismatch fails on every rank at once instead of
    adding unrelated numbers.
    """
    if not world.distributed:
        return dict(metrics)
    keys = sorted(metrics)
    hashes = _key_hashes(keys)
    if op == "sum":
        check = [x for h in hashes for x in (h, h * h)]
    else:
        check = [x for h in hashes for x in (h, -h)]
    values = torch.tensor(
        [float(metrics[k]) for k in keys] + check, dtype=torch.float64, device=world.device
    )
    all_reduce_(world, values, op)
    got = values[len(keys) :].tolist()
    pairs = list(zip(got[0::2], got[1::2], strict=True))
    if op == "sum":
        same = all(world.world_size * b == a * a for a, b in pairs)
    else:
        same = all(a == -b for a, b in pairs)
    if not same:
        raise DistributedError(
            f"rank {world.rank}: the ranks reduced different metric names (this rank: "
            f"{', '.join(keys)}); every rank must report the same metrics"
        )
    return {k: float(v) for k, v in zip(keys, values[: len(keys)].tolist(), strict=True)}


def flagged_ranks(world: World, flag: bool) -> list[int]:
    """The ranks where `flag` is true (e.g. a non-finite loss, a stop signal), agreed by all."""
    if not world.distributed:
        return [0] if flag else []
    votes = torch.zeros(world.world_size, dtype=torch.int32, device=world.device)
    votes[world.rank] = int(flag)
    all_reduce_(world, votes, "max")
    return [r for r, v in enumerate(votes.tolist()) if v]


def broadcast_(world: World, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """`src`'s values into `tensor` on every rank (same shape and dtype everywhere)."""
    if not world.distributed:
        return tensor
    with _failing_as(world, f"broadcast from rank {src} of {tuple(tensor.shape)}"):
        dist.broadcast(tensor, src=src)
    return tensor


def broadcast_object(world: World, obj: Any, src: int = 0) -> Any:
    """`src`'s picklable object on every rank (a decision made once: output dir, resume point).

    Small things only: it is pickled and sent whole.
    """
    if not world.distributed:
        return obj
    box = [obj if world.rank == src else None]
    with _failing_as(world, f"broadcast_object from rank {src}"):
        dist.broadcast_object_list(box, src=src, device=_object_device(world))
    return box[0]


def all_gather_objects(world: World, obj: Any) -> list[Any]:
    """Every rank's picklable object, in rank order (small things: per-rank sizes, timings)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.world_size
    with _failing_as(world, "all_gather_object"):
        dist.all_gather_object(out, obj)
    return out


def _object_device(world: World) -> torch.device | None:
    return world.device if world.backend == "nccl" else None


def all_gather_rows(world: World, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor, in rank order; the first dimension may differ between ranks.

    The others must agree. Rows are padded to the longest rank's and cut back after.
    """
    if tensor.dim() == 0:
        raise ValueError("all_gather_rows needs a tensor with rows (at least one dimension)")
    if not world.distributed:
        return [tensor]
    ndim = torch.tensor([tensor.dim(), -tensor.dim()], dtype=torch.int64, device=tensor.device)
    all_reduce_(world, ndim, "max")
    if int(ndim[0]) != -int(ndim[1]):
        raise DistributedError(
            f"rank {world.rank}: all_gather_rows of tensors with different numbers of dimensions"
        )
    shape = torch.tensor(list(tensor.shape), dtype=torch.int64, device=tensor.device)
    gathered = [torch.empty_like(shape) for _ in range(world.world_size)]
    with _failing_as(world, "all_gather_rows (shapes)"):
        dist.all_gather(gathered, shape)
    shapes = torch.stack(gathered)
    rows = shapes[:, 0].tolist()
    if any(s[1:] != list(tensor.shape[1:]) for s in shapes.tolist()):
        raise DistributedError(
            f"rank {world.rank}: all_gather_rows of shapes {shapes.tolist()}: only the first "
            "dimension may differ"
        )
    longest = max(rows)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world.world_size)]
    with _failing_as(world, f"all_gather_rows of {tuple(tensor.shape)} {tensor.dtype}"):
        dist.all_gather(parts, padded.contiguous())
    return [part[:n] for part, n in zip(parts, rows, strict=True)]


def all_gather_equal(world: World, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor, in rank order, when every rank's has the same shape and dtype (one
    collective: no sizes travel first, unlike all_gather_rows)."""
    if not world.distributed:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(world.world_size)]
    with _failing_as(world, f"all_gather of {tuple(tensor.shape)} {tensor.dtype}"):
        dist.all_gather(parts, tensor.contiguous())
    return parts


def gather_equal(world: World, tensor: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
    """Every rank's tensor (same shape and dtype everywhere) on rank `dst`, in rank order; None on
    the other ranks, which hold only their own (a whole dictionary assembled on one rank)."""
    if not world.distributed:
        return [tensor]
    parts = (
        [torch.empty_like(tensor) for _ in range(world.world_size)] if world.rank == dst else None
    )
    with _failing_as(world, f"gather to rank {dst} of {tuple(tensor.shape)} {tensor.dtype}"):
        dist.gather(tensor.contiguous(), parts, dst=dst)
    return parts


def all_to_all(
    world: World, tensors: Sequence[torch.Tensor], via_gather: bool = False
) -> list[torch.Tensor]:
    """Send tensors[d] to rank d; return what each rank s sent here, as received[s].

    Shapes may differ per pair (rows of another width for each destination: each rank's
    dictionaries' columns); dtype and device must agree. Shapes travel first, then one
    all_to_all_single with split sizes. `via_gather`: the same exchange by all_gather and slicing
    (W× the traffic), for a backend without all_to_all_single.
    """
    if len(tensors) != world.world_size:
        raise ValueError(f"all_to_all: {len(tensors)} tensors for {world.world_size} ranks")
    if not world.distributed:
        return [tensors[0]]
    dtype, device = tensors[0].dtype, tensors[0].device
    if any(t.dtype != dtype or t.device != device for t in tensors):
        raise ValueError("all_to_all: every tensor must have the same dtype and device")
    if any(t.dim() >= _SHAPE_SLOTS for t in tensors):
        raise ValueError(f"all_to_all: at most {_SHAPE_SLOTS - 1} dimensions")
    sent_shapes = torch.full((world.world_size, _SHAPE_SLOTS), -1, dtype=torch.int64)
    for d, t in enumerate(tensors):
        sent_shapes[d, 0] = t.dim()
        sent_shapes[d, 1 : 1 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    sent_shapes = sent_shapes.to(device)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    sizes = [t.numel() for t in tensors]
    if via_gather:
        return _all_to_all_by_gather(world, flat, sizes, sent_shapes)
    got_shapes = torch.empty_like(sent_shapes)
    with _failing_as(world, "all_to_all (shapes)"):
        dist.all_to_all_single(got_shapes, sent_shapes)
    shapes = [_shape(row) for row in got_shapes.tolist()]
    counts = [math.prod(s) for s in shapes]
    out = torch.empty(sum(counts), dtype=dtype, device=device)
    with _failing_as(world, f"all_to_all of {sum(sizes)} {dtype} elements"):
        dist.all_to_all_single(out, flat, counts, sizes)
    return [part.view(s) for part, s in zip(out.split(counts), shapes, strict=True)]


def _shape(row: list[int]) -> tuple[int, ...]:
    return tuple(row[1 : 1 + row[0]])


def _all_to_all_by_gather(
    world: World, flat: torch.Tensor, sizes: list[int], shapes: torch.Tensor
) -> list[torch.Tensor]:
    """all_to_all from all_gather: every rank gathers every send buffer and keeps its slice."""
    table = all_gather_rows(world, shapes)  # [W][W, slots]: what s sent to each d
    buffers = all_gather_rows(world, flat)
    received = []
    for s in range(world.world_size):
        sent = [_shape(row) for row in table[s].tolist()]
        counts = [math.prod(x) for x in sent]
        start = sum(counts[: world.rank])
        piece = buffers[s][start : start + counts[world.rank]]
        received.append(piece.view(sent[world.rank]))
    return received


def barrier(world: World, what: str, timeout_s: float | None = None) -> None:
    """Wait for every rank; after `timeout_s` (default: the group's), fail naming the ranks that
    did not arrive (rank 0 learns which; the others that rank 0 did not answer).

    monitored_barrier, which names them, exists for gloo only: an NCCL run uses its gloo control
    group.
    """
    if not world.distributed:
        return
    seconds = world.timeout_s if timeout_s is None else timeout_s
    group = world.control_group if world.backend != "gloo" else None
    try:
        dist.monitored_barrier(
            group=group, timeout=datetime.timedelta(seconds=seconds), wait_all_ranks=True
        )
    except RuntimeError as e:
        mark_broken()
        raise DistributedError(
            f"rank {world.rank} of {world.world_size}: barrier '{what}': not every rank arrived "
            f"within {seconds:g} s: {_missing_ranks(e)}"
        ) from e


def _missing_ranks(error: RuntimeError) -> str:
    """Who did not arrive, in our words, from monitored_barrier's error ("[Rank 0]: Ranks 1, 3
    failed to pass monitoredBarrier in 2000 ms" on rank 0); otherwise its first line (the other
    ranks learn only that rank 0 stopped answering)."""
    text = str(error).strip()
    found = re.search(r"Ranks? ([\d, ]+?) failed to pass", text)
    if found:
        ranks = [r for r in re.split(r"[, ]+", found.group(1)) if r]
        who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(ranks)}"
        return f"{who} failed to pass it (died, hung, or is elsewhere in the code)"
    return text.splitlines()[0] if text else type(error).__name__
