"""Tests for the shuffling activation buffer: no duplicates, no loss, bounded memory, seeded."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch

from saetrain.activations.buffer import ActivationBuffer

D = 4
CHUNK_SIZES = (37, 100, 3)


def _source(limit: int | None = None, counter: list[int] | None = None) -> Iterator[torch.Tensor]:
    """Chunks of varying sizes; column 0 is a unique row id, the other columns derive from it."""
    start = 0
    for size in itertools.cycle(CHUNK_SIZES):
        if limit is not None:
            size = min(size, limit - start)
            if size <= 0:
                return
        ids = torch.arange(start, start + size, dtype=torch.float32)
        rows = torch.stack([ids, 2 * ids, -ids, ids + 0.5], dim=1)
        start += size
        if counter is not None:
            counter[0] = start
        yield rows


def _buffer(size: int = 256, seed: int = 0, **kwargs) -> ActivationBuffer:
    return ActivationBuffer(
        _source(**kwargs),
        size=size,
        d=D,
        dtype=torch.float32,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(seed),
    )


def _ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].long().tolist()


def test_rows_arrive_intact():
    buf = _buffer()
    batch = buf.next_batch(32)
    assert batch.shape == (32, D)
    ids = batch[:, 0]
    expected = torch.stack([ids, 2 * ids, -ids, ids + 0.5], dim=1)
    assert torch.equal(batch, expected)


def test_no_duplicates_and_nothing_lost():
    size, batch = 256, 32
    counter = [0]
    buf = _buffer(size=size, counter=counter)
    served: list[int] = []
    for step in range(200):
        served += _ids(buf.next_batch(batch))
        if step % 17 == 0 or step == 199:
            served_set = set(served)
            assert len(served_set) == len(served), "an activation was served twice"
            stored = _ids(buf.storage)
            assert len(set(stored)) == size, "the buffer holds a row twice"
            # Everything taken from the source is served or still waiting in the buffer: the union
            # is a prefix 0..M-1 with no gap.
            union = served_set | set(stored)
            M = max(union) + 1
            assert union == set(range(M))
            # Rows consumed = initial fill + every refill (each refill replaces the rows drawn
            # since the previous one); the rows both served and stored are the ones drawn since
            # the last refill.
            drawn_since_refill = len(served_set & set(stored))
            assert M == size + len(served) - drawn_since_refill
            # The source was read only as far as needed, up to the end of one chunk.
            assert M <= counter[0] < M + max(CHUNK_SIZES)
    assert buf.tokens_served == 200 * batch == len(served)


def test_every_early_row_is_eventually_served():
    buf = _buffer(size=256)
    served: set[int] = set()
    for _ in range(400):  # 100 refills
        served |= set(_ids(buf.next_batch(32)))
    assert set(range(5000)) <= served
    assert len(served) == 400 * 32


def test_finite_source_served_rows_form_a_prefix_modulo_the_buffer():
    """A finite-but-long source: served + still-buffered rows are exactly the rows read so far."""
    total, size, batch = 3000, 128, 16
    counter = [0]
    buf = _buffer(size=size, limit=total, counter=counter)
    served: list[int] = []
    for _ in range(150):  # 2400 rows served, 150 / 4 = 37 refills of 64: 2496 rows read
        served += _ids(buf.next_batch(batch))
    assert len(set(served)) == len(served) == 2400
    waiting = set(_ids(buf.storage)) - set(served)
    assert set(served) | waiting == set(range(len(served) + len(waiting)))
    assert len(served) + len(waiting) == size + 37 * 64
    # Old rows have all gone out: everything from the first refills has been served.
    assert set(range(1500)) <= set(served)


def test_batches_are_shuffled():
    buf = _buffer(size=512)
    ids = _ids(buf.next_batch(64))
    assert ids != sorted(ids)
    assert max(ids) - min(ids) > 256  # drawn from across the whole buffer


def test_storage_is_bounded():
    size = 256
    buf = _buffer(size=size)
    ptr = buf.storage.data_ptr()
    for _ in range(100):
        buf.next_batch(64)
    assert buf.storage.shape == (size, D)
    assert buf.storage.data_ptr() == ptr
    assert buf.refills == 49  # batches 3, 5, ..., 99 each start with a refill


def test_refill_happens_when_half_is_drawn():
    size, batch = 256, 32
    buf = _buffer(size=size)
    assert set(_ids(buf.storage)) == set(range(size))
    served: list[int] = []
    for _ in range(4):  # 128 = size / 2 rows
        served += _ids(buf.next_batch(batch))
    assert buf.refills == 0
    before = buf.storage.clone()

    fifth = buf.next_batch(batch)
    assert buf.refills == 1
    after = buf.storage
    changed = (before != after).any(dim=1)
    # Exactly the rows drawn so far were overwritten, with the next 128 rows of the source.
    assert set(_ids(before[changed])) == set(served)
    assert set(_ids(after[changed])) == set(range(size, size + 128))
    assert int(changed.sum()) == 128
    # The fifth batch comes from the refilled, reshuffled buffer.
    assert not set(_ids(fifth)) & set(served)
    for _ in range(3):
        buf.next_batch(batch)
    assert buf.refills == 1
    buf.next_batch(batch)
    assert buf.refills == 2


def test_uneven_batches_refill_before_passing_half():
    buf = _buffer(size=100)
    buf.next_batch(30)
    buf.next_batch(20)  # exactly half drawn
    assert buf.refills == 0
    buf.next_batch(1)
    assert buf.refills == 1
    buf.next_batch(49)
    assert buf.refills == 1
    buf.next_batch(1)
    assert buf.refills == 2


def test_batch_larger_than_half_raises():
    buf = _buffer(size=256)
    with pytest.raises(ValueError, match="half"):
        buf.next_batch(129)
    assert buf.tokens_served == 0
    assert buf.next_batch(128).shape == (128, D)
    assert buf.next_batch(128).shape == (128, D)


def test_served_batch_is_not_overwritten_by_a_refill():
    buf = _buffer(size=64)
    first = buf.next_batch(32)
    kept = first.clone()
    for _ in range(10):
        buf.next_batch(32)
    assert torch.equal(first, kept)


def test_same_seed_same_batches_other_seed_different():
    def draws(seed: int) -> list[int]:
        buf = _buffer(size=128, seed=seed)
        out: list[int] = []
        for _ in range(20):
            out += _ids(buf.next_batch(16))
        return out

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)
    assert sorted(draws(3)[:64]) != sorted(draws(4)[:64])


def test_peek_does_not_draw():
    a, b = _buffer(size=128, seed=1), _buffer(size=128, seed=1)
    peeked = a.peek(50)
    assert peeked.shape == (50, D)
    assert len(set(_ids(peeked))) == 50
    assert set(_ids(peeked)) <= set(_ids(a.storage))
    assert a.tokens_served == 0
    assert a.refills == 0
    # The draws before the next reshuffle are those of an identical buffer that did not peek.
    for _ in range(4):
        assert torch.equal(a.next_batch(16), b.next_batch(16))
    served_a: set[int] = set()
    for _ in range(30):
        served_a |= set(_ids(a.next_batch(16)))
    assert len(served_a) == 30 * 16  # peeked rows were not marked as drawn nor served twice


def test_peek_is_capped_at_size():
    buf = _buffer(size=64)
    rows = buf.peek(1000)
    assert rows.shape == (64, D)
    assert set(_ids(rows)) == set(range(64))


def test_storage_dtype_conversion():
    buf = ActivationBuffer(
        _source(),
        size=64,
        d=D,
        dtype=torch.bfloat16,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
    )
    batch = buf.next_batch(16)
    assert batch.dtype == torch.bfloat16
    ids = batch[:, 0].float()
    torch.testing.assert_close(batch[:, 1].float(), (2 * ids).bfloat16().float())


def test_a_buffer_that_holds_every_row_the_run_draws_serves_them_all_without_refilling():
    """A run of 5 steps of 48 draws 240 rows: its buffer holds those, read once, all served."""
    batch, steps = 48, 5
    size = ActivationBuffer.holds_all_size(4096, batch, steps)
    assert size == 240
    assert ActivationBuffer.holds_all_size(240, batch, steps) is None  # a buffer's worth: as ever
    counter = [0]
    buf = ActivationBuffer(
        _source(counter=counter),
        size=size,
        d=D,
        dtype=torch.float32,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
        holds_all=True,
    )
    served = [i for _ in range(steps) for i in _ids(buf.next_batch(batch))]
    assert sorted(served) == list(range(240)) and served != sorted(served)  # all, shuffled
    assert buf.refills == 0
    assert ActivationBuffer.rows_needed(size, batch, steps, holds_all=True) == 240
    assert counter[0] < 240 + max(CHUNK_SIZES)  # the source was read no further
    with pytest.raises(ValueError, match="more than the buffer holds"):
        buf.next_batch(1)


def test_only_a_run_that_draws_less_than_its_buffer_gets_a_smaller_one():
    """The default job draws 97 × 2048 rows through its 16,384-row buffer: unchanged. The issue's
    quick look at gemma_l12 (32,768 tokens) gets 32,768 rows, not the 1,048,576 it configures."""
    from saetrain.api import config_from_overrides

    def drawn(overrides: list[str]) -> int | None:
        cfg = config_from_overrides(overrides)
        steps = max(cfg.trainer.total_tokens // cfg.trainer.batch_tokens, 1)
        return ActivationBuffer.holds_all_size(
            cfg.buffer.size_tokens, cfg.trainer.batch_tokens, steps
        )

    assert drawn([]) is None
    assert drawn(["+experiment=gemma_l12"]) is None
    assert drawn(["+experiment=gemma_l12", "trainer.total_tokens=32768"]) == 32768
