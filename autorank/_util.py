"""Small runtime helpers: progress bars, thread control, deprecated aliases of moved modules and names."""

from __future__ import annotations

import contextlib
import importlib
import sys
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def show_progress(enabled: bool | None) -> bool:
    """``enabled`` if given, else whether stderr is a terminal."""
    if enabled is not None:
        return enabled
    return sys.stderr is not None and sys.stderr.isatty()


@contextlib.contextmanager
def seeded_rng(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the block with the CPU generator (and ``device``'s, if CUDA) seeded with ``seed``; restore them after.

    Only the generators that are forked are seeded, so the global random state of the
    CPU and of every GPU is the same after the block as before it.  ``seed=None`` forks
    without seeding.
    """
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        if seed is not None:
            torch.random.default_generator.manual_seed(seed)
            for index in cuda:
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(seed)
        yield


def progress_bar(items: Iterable[T], desc: str, enabled: bool | None = None, total: int | None = None) -> Iterable[T]:
    """Wrap ``items`` in a tqdm bar when ``enabled`` (``None``: only if stderr is a terminal)."""
    if not show_progress(enabled):
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, leave=False)


@contextlib.contextmanager
def single_thread(size: int = 0, limit: int = 1024) -> Iterator[None]:
    """Run a LAPACK eigensolver of a ``size x size`` problem on one thread when ``size <= limit``.

    Below ~1k a second thread gains nothing, and with several threads the
    solver slows down many times over when another process competes for the
    cores (measured on 512x512 float64: 0.17 s alone; 1.2 s with 2 threads vs
    0.4 s with 1 thread beside a busy training process).  Larger problems do
    gain from threads (4096x4096: 3.4 s with 2 threads, 4.4 s with 1).
    """
    n = torch.get_num_threads()
    if n > 1 and size <= limit:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def parallel_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    weight: Callable[[T], float] | None = None,
    desc: str = "",
    progress: bool | None = None,
) -> list[R]:
    """``[fn(x) for x in items]`` on as many threads as torch has, each op single-threaded.

    Dense linear algebra of many medium-sized matrices (one eigensolver per
    layer) scales better across layers than inside one LAPACK call, and one
    thread per call stays fast when another process competes for the cores.
    ``weight(x)`` orders the work largest first for load balance; the result keeps
    the order of ``items``.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    workers = min(torch.get_num_threads(), len(items))
    if workers <= 1:
        return [fn(x) for x in progress_bar(items, desc, progress, total=len(items))]
    order = sorted(range(len(items)), key=lambda i: -weight(items[i])) if weight else range(len(items))
    out: list = [None] * len(items)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            futures = {pool.submit(fn, items[i]): i for i in order}
            for fut in progress_bar(as_completed(futures), desc, progress, total=len(items)):
                out[futures[fut]] = fut.result()
    finally:
        torch.set_num_threads(n)
    return out


def moved_names(module: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` that keeps old import paths of moved names working, deprecated.

    ``moved`` maps each old name of ``module`` to the module that holds it now;
    ``module.name`` then warns (``DeprecationWarning``) and returns ``new_module.name``
    (imported by :func:`importlib.import_module` when first asked for).  Use as
    ``__getattr__ = moved_names(__name__, {"name": "autorank.new_home"})``.
    """

    def __getattr__(name: str) -> Any:
        target = moved.get(name)
        if target is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{module}.{name} has moved to {target}.{name}; import it from there",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(target), name)

    return __getattr__


def moved_module(old: str, new: str) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for a deprecated alias module ``old`` of the module ``new``.

    An alias module is three lines, ``__getattr__, __dir__, __all__ = moved_module(OLD, NEW)``:
    importing it issues one ``DeprecationWarning`` and imports ``new``; every attribute
    (public or not) is then looked up on ``new``, so ``from OLD import name`` keeps working.
    """
    warnings.warn(f"{old} is deprecated and will be removed; import {new} instead", DeprecationWarning,
                  stacklevel=3)
    target = importlib.import_module(new)

    def __getattr__(name: str) -> Any:
        return getattr(target, name)

    def __dir__() -> list[str]:
        return dir(target)

    return __getattr__, __dir__, list(getattr(target, "__all__", ()))
