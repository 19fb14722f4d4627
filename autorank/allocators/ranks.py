r"""Plain-SVD rank choices and the bisections shared by the baseline rules.

Each baseline chooses, per layer ``l``, a plain truncated-SVD rank ``j_l`` (the ALDS
candidate with ``groups = 1``) or keeps the layer dense (candidate 0).  A
:class:`RankTable` maps every rank ``j = 0 .. m`` (``m = min(f, n)``) to its candidate
index and cost; :func:`bisect_threshold` and :func:`bisect_sorted` find the most
generous setting of a rule's one global scalar knob (total cost is monotone in it)
that meets ``sum_l cost_l(j_l) <= ctx.room``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from ..curves import LayerCurves
from ..solver import Infeasible
from .base import AllocationContext

__all__ = ["RankTable", "rank_table", "rank_tables", "picked_indices", "total_cost", "check_floor",
           "bisect_threshold", "bisect_sorted"]


@dataclass(frozen=True)
class RankTable:
    """Plain-SVD choices of one layer: ``index[j]`` / ``cost[j]`` for ranks ``j = 0 .. m``.

    Entry 0 is dense (candidate 0 at the dense cost); a rank whose ``groups = 1``
    candidate is absent (not cheaper than dense) maps to dense as well.
    """

    index: np.ndarray  # int64, length m + 1
    cost: np.ndarray  # float64, length m + 1

    @property
    def full(self) -> int:
        """The full rank ``m = min(f, n)``."""
        return len(self.index) - 1

    @property
    def dense_cost(self) -> float:
        return float(self.cost[0])

    @property
    def top(self) -> int:
        """The largest rank whose candidate exists (0 when none does)."""
        present = np.nonzero(self.index[1:])[0]
        return int(present[-1]) + 1 if len(present) else 0


def rank_table(lc: LayerCurves, metric: str) -> RankTable | None:
    """The :class:`RankTable` of one layer, or None when its curves have no ``"alds"`` candidates."""
    if "alds" not in lc.families:
        return None
    full = min(lc.info.out_features, lc.info.in_channels * lc.info.taps)
    costs = lc.cost(metric)
    index = np.zeros(full + 1, np.int64)
    for j in range(1, full + 1):
        i = lc.find("alds", groups=1, rank=j)
        if i is None:  # cost j * (n + f) grows with j: every larger rank is absent too
            break
        index[j] = i
    return RankTable(index=index, cost=costs[index].astype(np.float64))


def rank_tables(ctx: AllocationContext) -> tuple[dict[str, RankTable], float]:
    """``({layer: RankTable}, cost of the layers that stay dense)`` for the context's curves."""
    tables: dict[str, RankTable] = {}
    dense = 0.0
    for name, lc in ctx.curves.items():
        t = rank_table(lc, ctx.metric)
        if t is None:
            dense += float(lc.cost(ctx.metric)[0])
        else:
            tables[name] = t
    return tables, dense


def picked_indices(ctx: AllocationContext, tables: Mapping[str, RankTable], ranks: Mapping[str, int]) -> dict[str, int]:
    """``{layer: candidate index}`` for every layer of the curves (missing ranks: dense)."""
    out = {name: 0 for name in ctx.curves}
    for name, j in ranks.items():
        out[name] = int(tables[name].index[j])
    return out


def total_cost(tables: Mapping[str, RankTable], ranks: Mapping[str, int], dense: float) -> float:
    """``dense + sum_l cost_l(j_l)``: what the compressible layers cost at ``ranks``."""
    return dense + sum(float(tables[n].cost[j]) for n, j in ranks.items())


def check_floor(ctx: AllocationContext, tables: Mapping[str, RankTable], dense: float) -> None:
    """Raise :class:`Infeasible` when every layer at rank 1 (or dense where rank 1 is absent) is over budget."""
    lowest = total_cost(tables, {n: min(1, t.full) for n, t in tables.items()}, dense)
    if lowest > ctx.room:
        raise Infeasible(ctx.room, lowest)


def bisect_threshold(
    total: Callable[[float], float],
    room: float,
    lo: float,
    hi: float,
    *,
    increasing: bool,
    geometric: bool = False,
    iters: int = 200,
) -> float:
    """The most generous ``t`` in ``[lo, hi]`` with ``total(t) <= room``, by bisection.

    ``total`` must be monotone in ``t``: non-decreasing when ``increasing`` (the largest
    feasible ``t`` is returned) or non-increasing (the smallest).  ``geometric`` bisects
    ``log t`` (``0 < lo < hi``), for knobs spanning many decades.  Stops when the
    interval no longer shrinks in floating point, so the answer is as tight as the
    float grid allows.

    Raises:
        Infeasible: even the cheap end (``lo`` if ``increasing`` else ``hi``) is over ``room``.
    """
    if geometric and not 0 < lo < hi:
        raise ValueError(f"geometric bisection needs 0 < lo < hi, got lo={lo!r}, hi={hi!r}")
    ok, bad = (lo, hi) if increasing else (hi, lo)  # ok: feasible end, bad: generous end
    if total(bad) <= room:
        return bad
    cheapest = total(ok)
    if cheapest > room:
        raise Infeasible(room, cheapest)
    for _ in range(iters):
        mid = math.sqrt(ok * bad) if geometric else 0.5 * (ok + bad)
        if mid in (ok, bad):
            break
        if total(mid) <= room:
            ok = mid
        else:
            bad = mid
    return ok


def bisect_sorted(
    total: Callable[[float], float], room: float, values: np.ndarray | Sequence[float], *, increasing: bool
) -> float:
    """:func:`bisect_threshold` over a finite set: the most generous of ``values`` that fits.

    Exact when ``total`` only changes at these values (a threshold compared with a
    finite set of per-layer quantities).

    Raises:
        Infeasible: even the cheapest of ``values`` is over ``room``.
    """
    v = np.unique(np.asarray(values, dtype=np.float64))
    if len(v) == 0:
        raise ValueError("bisect_sorted needs at least one value")
    if not increasing:
        v = v[::-1]  # now total is non-decreasing along v: v[0] cheapest, v[-1] most generous
    cheapest = total(float(v[0]))
    if cheapest > room:
        raise Infeasible(room, cheapest)
    lo, hi = 0, len(v) - 1  # v[lo] feasible
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total(float(v[mid])) <= room:
            lo = mid
        else:
            hi = mid - 1
    return float(v[lo])
