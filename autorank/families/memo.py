"""A memo of per-weight decompositions, shared by the candidates and the build of one compression.

The conv families compute the same expensive, budget-independent decompositions of a kernel
twice: once for the candidates (every rank's error) and again when the chosen candidate is
built, and a budget sweep builds once per budget.  Inside :func:`memo_scope` (the pipeline
opens one per prepared compression, see :class:`autorank.pipeline.Prepared`), :func:`memoized`
keeps each result under ``(tag, shape, dtype, device, digest)``, where the digest is a BLAKE2b
hash of the tensor's bytes: the key is its exact value, so a deep copy of the model (a sweep
builds each budget on a fresh copy) hits, and a changed weight never does.  Outside a scope
it simply computes.

The results are kept until the scope's :class:`FitMemo` is dropped, up to ``max_bytes`` (the
least recently used go first).  Every stored value must be treated as read-only.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import threading
from collections import OrderedDict
from typing import Any, Callable, Iterator, TypeVar

import torch

__all__ = ["FIT_MEMO_BYTES", "FitMemo", "memo_scope", "memoized", "weight_key"]

# The most one compression keeps.  Measured: ResNet-18 with every conv family, 181 MiB (34 entries:
# spatial SVDs and channel bases in float64); VGG-16's 3x3 kernels would take about 260 MiB.
FIT_MEMO_BYTES = 512 << 20

T = TypeVar("T")
_ACTIVE: contextvars.ContextVar["FitMemo | None"] = contextvars.ContextVar("autorank_fit_memo", default=None)


def weight_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """``(shape, dtype, device, BLAKE2b digest of the bytes)`` of ``tensor``: equal exactly when the values are."""
    t = tensor.detach()
    raw = t.reshape(-1).contiguous().view(torch.uint8).cpu().numpy()
    return tuple(t.shape), str(t.dtype), str(t.device), hashlib.blake2b(raw, digest_size=16).hexdigest()


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


class FitMemo:
    """The store of one compression: ``key -> value``, least recently used evicted past ``max_bytes``."""

    def __init__(self, max_bytes: int = FIT_MEMO_BYTES) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"FitMemo max_bytes={max_bytes!r} must be an int >= 0")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._store: OrderedDict[tuple[Any, ...], tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()  # curve workers share one memo

    def __len__(self) -> int:
        return len(self._store)

    def get(self, tag: str, tensor: torch.Tensor, compute: Callable[[], T]) -> T:
        key = (tag, *weight_key(tensor))
        with self._lock:
            if key in self._store:
                self._store.move_to_end(key)
                self.hits += 1
                return self._store[key][0]
            self.misses += 1
        value = compute()  # outside the lock: two workers on one weight at worst compute it twice
        size = _nbytes(value)
        if size <= self.max_bytes:
            with self._lock:
                if key not in self._store:
                    self._store[key] = (value, size)
                    self.bytes += size
                while self.bytes > self.max_bytes:
                    _, (_, dropped) = self._store.popitem(last=False)
                    self.bytes -= dropped
        return value


@contextlib.contextmanager
def memo_scope(memo: FitMemo | None) -> Iterator[FitMemo | None]:
    """Make ``memo`` the store of :func:`memoized` in this context (and in the curve workers it starts)."""
    token = _ACTIVE.set(memo)
    try:
        yield memo
    finally:
        _ACTIVE.reset(token)


def memoized(tag: str, tensor: torch.Tensor, compute: Callable[[], T]) -> T:
    """``compute()``, kept in the active :class:`FitMemo` under ``tag`` and the exact value of ``tensor``."""
    memo = _ACTIVE.get()
    return compute() if memo is None else memo.get(tag, tensor, compute)
