"""Progress of long work, one mechanism for the whole package: bars on a terminal, log lines otherwise.

Every long step of autorank (the analysis, calibration batches, error curves per layer,
allocator probes, realising, the sequential refit, fine-tuning rounds, Optuna trials, sweep
rows, training the demo's CNN) reports through this module, and every ``progress`` argument
means the same thing:

* ``True``  -- a tqdm bar on stderr;
* ``False`` -- nothing at all;
* ``None``  -- automatic: a bar when stderr is a terminal, otherwise INFO lines on the
  ``autorank.progress`` logger (first and last of each step, and at most one every
  :data:`LOG_INTERVAL` seconds in between), which a script or a log file sees once it
  configures logging (``logging.basicConfig(level=logging.INFO)``, the CLI's ``-v``).

A ``progress`` of ``None`` also defers to an enclosing :func:`progress_scope`:
:func:`autorank.optimize` and :func:`autorank.apps.sweep.run_sweep` open one with their own
``progress``, so ``optimize(..., progress=False)`` silences every nested step, including the
fine-tuning loops, unless one of them was given ``progress=True`` itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

__all__ = ["LOG_INTERVAL", "mode", "show_progress", "progress_scope", "Progress", "track", "stage"]

T = TypeVar("T")

log = logging.getLogger("autorank.progress")

#: seconds between two log lines of one step (its first and last lines are always written)
LOG_INTERVAL = 10.0

_SCOPE: contextvars.ContextVar[bool | None] = contextvars.ContextVar("autorank_progress", default=None)


def _check(progress: Any) -> None:
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None (automatic), got {progress!r}")


def mode(progress: bool | None = None) -> str:
    """How progress shows: ``"bar"``, ``"log"`` or ``"off"`` (``None`` defers to the scope, then to stderr)."""
    _check(progress)
    if progress is None:
        progress = _SCOPE.get()
    if progress is False:
        return "off"
    if progress is True:
        return "bar"
    return "bar" if sys.stderr is not None and sys.stderr.isatty() else "log"


def show_progress(progress: bool | None = None) -> bool:
    """Whether a tqdm bar is shown (``mode(progress) == "bar"``)."""
    return mode(progress) == "bar"


@contextlib.contextmanager
def progress_scope(progress: bool | None) -> Iterator[None]:
    """Make ``progress`` the default of every step inside the block whose own ``progress`` is ``None``.

    ``None`` leaves an enclosing scope as it is.
    """
    _check(progress)
    if progress is None:
        yield
        return
    token = _SCOPE.set(progress)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}" if n == 1 else f"{n} {unit}es" if unit.endswith(("s", "ch", "x")) else f"{n} {unit}s"


class Progress:
    """One step's progress: ``update()`` after each finished item, ``announce()`` before one starts.

    desc:     what is being done (``"calibration"``, ``"error curves (alds, cp)"``).
    total:    the number of items, if known.
    progress: ``True`` / ``False`` / ``None`` (see the module docstring).
    unit:     what an item is, for the bar and the lines (``"batch"``, ``"layer"``).
    interval: seconds between log lines (``0``: a line for every item and announcement).
    """

    def __init__(self, desc: str, total: int | None = None, progress: bool | None = None, unit: str = "it",
                 interval: float | None = None) -> None:
        self.mode = mode(progress)
        self.desc, self.total, self.unit, self.n = desc, total, unit, 0
        self.interval = LOG_INTERVAL if interval is None else float(interval)
        self._bar = None
        self._closed = False
        self._t0 = self._last = time.perf_counter()
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
        elif self.mode == "log":
            size = f" ({_plural(total, unit)})" if total is not None else ""
            log.info("%s: started%s", desc, size)

    def _count(self) -> str:
        return f"{self.n}/{self.total}" if self.total is not None else _plural(self.n, self.unit)

    def _due(self) -> bool:
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            return True
        return False

    def announce(self, note: str) -> None:
        """Say which item starts next (the bar's postfix; a log line when one is due)."""
        if self._bar is not None:
            self._bar.set_postfix_str(note)
        elif self.mode == "log" and self._due():
            where = f"{self.n + 1}/{self.total}" if self.total is not None else f"{self.unit} {self.n + 1}"
            log.info("%s: %s %s", self.desc, where, note)

    def update(self, n: int = 1, note: str | None = None) -> None:
        """``n`` more items are done (``note``: e.g. the layer that finished)."""
        self.n += n
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
        elif self.mode == "log" and self._due() and (self.total is None or self.n < self.total):
            log.info("%s: %s%s, %.1fs", self.desc, self._count(), f" ({note})" if note else "",
                     time.perf_counter() - self._t0)

    def close(self, done: bool = True) -> None:
        """End the step (a last line in log mode: done, or stopped when ``done`` is False)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "log":
            log.info("%s: %s %s in %.1fs", self.desc, "done" if done else "stopped after", self._count(),
                     time.perf_counter() - self._t0)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(done=exc_type is None)


def track(items: Iterable[T], desc: str, progress: bool | None = None, total: int | None = None,
          unit: str = "it", note: Callable[[T], str] | None = None) -> Iterable[T]:
    """``items``, reporting each one as it is consumed (``items`` itself when progress is off).

    ``note(item)`` labels a finished item (e.g. its layer name).
    """
    if mode(progress) == "off":
        return items
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return _tracked(items, Progress(desc, total, progress, unit), note)


def _tracked(items: Iterable[T], bar: Progress, note: Callable[[T], str] | None) -> Iterator[T]:
    done = False
    try:
        for item in items:
            yield item
            bar.update(1, note(item) if note is not None else None)
        done = True
    finally:
        bar.close(done)


@contextlib.contextmanager
def stage(desc: str, progress: bool | None = None) -> Iterator[Progress]:
    """One long step with no items to count (e.g. the analysis): a line when it starts and when it ends."""
    with Progress(desc, total=1, progress=progress, unit="step") as bar:
        yield bar
        bar.update(1)
