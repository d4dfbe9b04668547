"""Progress lines for a run's long phases: what it is doing, done/total, rate, ETA.

A phase longer than a few seconds (the first buffer fill, held-out evaluation, CE splicing,
export, upload) must not look like a hang. A `Progress` writes a line when it starts, then at most
one every `every_s` seconds, then a last one with the time taken. Lines go through `logging`, so
under Hydra they reach the console and the job's log file alike.

The phases also say what the process is doing right now (`current_phase()`), which is what a
signal that stops the run reports.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

log = logging.getLogger("saetrain.progress")

T = TypeVar("T")

# The phases now running, innermost last (a phase may run inside another, e.g. an upload's
# model card inside "upload").
_active: list[Progress | _Timed] = []


def current_phase() -> str | None:
    """What the run is doing now ("buffer fill (4.1k/16.4k rows)"), or None between phases."""
    return _active[-1].describe() if _active else None


def human(n: float) -> str:
    """1234567 → '1.2M' (the training progress line's format)."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def duration(seconds: float) -> str:
    """Seconds as '4m05s' (or '1h02m')."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """One phase counted in units: `update(n)` as work is done, `finish()` at the end.

    Use it as a context manager (which finishes it, and forgets it on an error) or call
    `start()` / `finish()`.
    """

    def __init__(
        self,
        phase: str,
        total: int | None,
        unit: str,
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.phase = phase
        self.total = total
        self.unit = unit
        self.every_s = every_s
        self.done = 0
        self._clock = clock
        self._start = 0.0
        self._last_line = 0.0
        self._running = False

    def describe(self) -> str:
        total = f"/{human(self.total)}" if self.total is not None else ""
        return f"{self.phase} ({human(self.done)}{total} {self.unit})"

    def start(self) -> Progress:
        self._start = self._last_line = self._clock()
        self._running = True
        _active.append(self)
        total = f"{human(self.total)} {self.unit}" if self.total is not None else self.unit
        log.info("%s: starting (%s)", self.phase, total)
        return self

    def update(self, n: int = 1) -> None:
        """`n` more units done; a line if `every_s` seconds passed since the last one."""
        self.done += n
        now = self._clock()
        if self._running and now - self._last_line >= self.every_s:
            self._last_line = now
            log.info("%s", self._line(now))

    def _line(self, now: float) -> str:
        elapsed = now - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        text = f"{self.phase}: {human(self.done)}"
        if self.total:
            text += f"/{human(self.total)} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f" | {human(rate)} {self.unit}/s"
        if self.total and rate > 0:
            text += f" | eta {duration((self.total - self.done) / rate)}"
        return text

    def finish(self) -> None:
        """The last line: what was done, in how long."""
        if not self._running:
            return
        self._running = False
        _forget(self)
        elapsed = self._clock() - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        log.info(
            "%s: done, %s %s in %.1f s (%s %s/s)",
            self.phase,
            human(self.done),
            self.unit,
            elapsed,
            human(rate),
            self.unit,
        )

    def abandon(self) -> None:
        """Stop without a last line (the phase failed; the error says why)."""
        self._running = False
        _forget(self)

    def __enter__(self) -> Progress:
        return self.start()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abandon()


def _forget(item: Progress | _Timed) -> None:
    if item in _active:
        _active.remove(item)


def reporting(
    items: Iterable[T], progress: Progress, size: Callable[[T], int] = lambda _: 1
) -> Iterator[T]:
    """`items`, counting each into `progress` once the consumer asks for the next (its work is
    then done); the phase starts at the first item and finishes after the last."""
    progress.start()
    try:
        for item in items:
            yield item
            progress.update(size(item))
    except BaseException:
        progress.abandon()
        raise
    progress.finish()


class ReportedList(list[T]):
    """A list whose every iteration reports into a new `Progress` (for functions that take a
    list of batches and iterate it once)."""

    def __init__(
        self,
        items: Iterable[T],
        phase: str,
        unit: str,
        size: Callable[[T], int] = lambda _: 1,
        every_s: float = 5.0,
    ):
        super().__init__(items)
        self._phase, self._unit, self._size, self._every_s = phase, unit, size, every_s

    def __iter__(self) -> Iterator[T]:
        total = sum(self._size(item) for item in super().__iter__())
        progress = Progress(self._phase, total, self._unit, self._every_s)
        return reporting(super().__iter__(), progress, self._size)


class _Timed:
    """A phase measured only in time (model load, export, upload)."""

    def __init__(self, name: str, quiet_below: float | None):
        self.name = name
        self.quiet_below = quiet_below
        self.start = time.monotonic()

    def describe(self) -> str:
        return self.name


@contextlib.contextmanager
def phase(name: str, quiet_below: float | None = None) -> Iterator[None]:
    """A phase with a start line and a 'done in X s' line. With `quiet_below`, no start line,
    and the last line only when the phase took at least that many seconds."""
    timed = _Timed(name, quiet_below)
    if quiet_below is None:
        log.info("%s: starting", name)
    _active.append(timed)
    try:
        yield
    finally:
        _forget(timed)
    elapsed = time.monotonic() - timed.start
    if quiet_below is None or elapsed >= quiet_below:
        log.info("%s: done in %.1f s", name, elapsed)


def _console_shows(logger: logging.Logger, level: int) -> bool:
    """Whether a record of `level` from `logger` reaches a handler writing to stdout/stderr."""
    if not logger.isEnabledFor(level):
        return False
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            stream = getattr(handler, "stream", None)
            if (
                not isinstance(handler, logging.FileHandler)
                and stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
                and level >= handler.level
            ):
                return True
        current = current.parent if current.propagate else None
    return False


def emit(text: str, logger: logging.Logger | None = None) -> None:
    """`text` to the log (so the run's log file has it) and to the console once: printed only
    when no console handler shows the log (outside Hydra, logging is usually not set up)."""
    logger = logger or log
    logger.info("%s", text.lstrip("\n"))  # a log line's prefix already starts a line
    if not _console_shows(logger, logging.INFO):
        print(text, flush=True)
