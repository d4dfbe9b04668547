"""Compute the next LM batches in a background thread while the dictionaries train.

The LM forward is most of a run's cost. Run in the training loop, it leaves the dictionary idle
while the LM works and the LM idle while the dictionary works; run `depth` batches ahead in a
thread (on its own CUDA stream on a GPU), the two overlap. Torch releases the GIL inside its
kernels, so the overlap is real on CPU as well when there are spare cores.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of an item: the item itself, or those in a tuple item."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


class Prefetcher:
    """Iterates `items` (tensors, or tuples holding tensors) in a background thread, at most
    `depth` items ahead of the consumer.

    Items arrive in the source's order, so a run is as deterministic as without the thread; an
    exception in the source is raised in the consumer at the same point of the stream.
    """

    def __init__(self, items: Iterator[Any], depth: int, device: torch.device):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._items = items
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._cuda = device.type == "cuda"
        self._device = device
        self._thread = threading.Thread(target=self._produce, name="saetrain-lm", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        """Blocks while the queue is full; False once the consumer has closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            stream = torch.cuda.Stream(self._device) if self._cuda else None
            ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with ctx, torch.no_grad():
                for item in self._items:
                    event = None
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not self._put((item, event)):
                        return
        except BaseException as e:  # re-raised in the consumer
            self._put(_Failure(e))
            return
        self._put(_END)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._finished = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._finished = True
            raise item.error
        value, event = item
        if event is not None:
            current = torch.cuda.current_stream(self._device)
            current.wait_event(event)
            for tensor in _tensors(value):
                if tensor.is_cuda:  # a CPU tensor has no stream to record (and would raise)
                    tensor.record_stream(current)
        return value

    def queued(self) -> list[torch.Tensor]:
        """The tensors computed but not yet consumed (for memory accounting)."""
        with self._queue.mutex:
            items = list(self._queue.queue)
        return [t for i in items if isinstance(i, tuple) for t in _tensors(i[0])]

    def close(self) -> None:
        """Stop the thread and drop what it computed ahead."""
        self._stop.set()
        self._thread.join()
        while not self._queue.empty():
            self._queue.get_nowait()
        self._finished = True
