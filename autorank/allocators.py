"""Allocators: rules that pick one candidate per layer from the curves under a budget.

An allocator is a plain function::

    allocator(curves, budget, metric, total, fixed, solver) -> {layer: candidate index}

with ``fixed + sum(cost of the picked candidates) <= budget * total``.  Register
your own with :func:`register_allocator`; ``optimize(..., allocator=name)`` uses it.

* ``"alds"`` (default): the exact global step of :mod:`autorank.solver`.
* ``"uniform"``: the same fraction ``r`` of the full rank in every layer (plain SVD,
  ``k = 1``): layer ``l`` keeps ``j_l = max(1, floor(r * min(f, c*K)))``, or stays
  dense when that is not cheaper; ``r`` is the largest fraction that fits the budget
  (total cost is non-decreasing in ``r``, so bisection finds it).
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from .config import SolverConfig
from .curves import LayerCurves
from .solver import Infeasible

__all__ = ["register_allocator", "get_allocator", "available_allocators", "uniform_allocation"]

Allocator = Callable[[Mapping[str, LayerCurves], float, str, int, int, SolverConfig], dict[str, int]]
_ALLOCATORS: dict[str, Allocator] = {}


def register_allocator(name: str, fn: Allocator) -> Allocator:
    """Register ``fn`` under ``name`` (replacing one of the same name)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"allocator name must be a non-empty str, got {name!r}")
    if not callable(fn):
        raise TypeError(f"allocator must be callable, got {type(fn).__name__}")
    _ALLOCATORS[name] = fn
    return fn


def get_allocator(name: str) -> Allocator:
    try:
        return _ALLOCATORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown allocator {name!r}; available: {available_allocators()}") from None


def available_allocators() -> list[str]:
    """Names of the registered allocators."""
    return sorted(_ALLOCATORS)


def _uniform_pick(lc: LayerCurves, fraction: float) -> int:
    """Index of the k = 1 candidate at ``fraction`` of full rank, or 0 (dense) if it is not cheaper."""
    info = lc.info
    full = min(info.out_features, info.in_channels * info.taps)
    rank = max(1, int(np.floor(fraction * full + 1e-9)))
    if "alds" not in lc.families:
        return 0
    fam = lc.families.index("alds")
    cols = lc.hyper[fam]
    idx = np.nonzero((lc.family == fam) & (cols["groups"][lc.row] == 1) & (cols["rank"][lc.row] == rank))[0]
    return int(idx[0]) if len(idx) else 0


def uniform_allocation(
    curves: Mapping[str, LayerCurves], budget: float, metric: str, total: int, fixed: int,
    solver: SolverConfig | None = None,
) -> dict[str, int]:
    """The same rank fraction in every layer, the largest that meets the budget."""
    room = budget * total - fixed

    def cost(fraction: float) -> tuple[float, dict[str, int]]:
        picked = {n: _uniform_pick(lc, fraction) for n, lc in curves.items()}
        return sum(float(curves[n].cost(metric)[i]) for n, i in picked.items()), picked

    lowest, picked = cost(0.0)
    if lowest > room:
        raise Infeasible(room, lowest)
    lo, hi = 0.0, 1.0
    for _ in range(40):  # fraction resolution 1e-12: finer than any rank step
        mid = 0.5 * (lo + hi)
        if cost(mid)[0] <= room:
            lo = mid
        else:
            hi = mid
    return cost(lo)[1]


def _alds(curves, budget, metric, total, fixed, solver):
    from .api import solve_curves

    return solve_curves(curves, budget, metric, total, fixed, solver)


register_allocator("alds", _alds)
register_allocator("uniform", uniform_allocation)
