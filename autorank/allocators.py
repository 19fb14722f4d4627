"""Allocators: rules that pick one candidate per layer from the curves under a budget.

An allocator is a plain function of an :class:`AllocationContext`::

    allocator(ctx) -> {layer: candidate index}

with ``ctx.fixed + sum(cost of the picked candidates) <= ctx.room + ctx.fixed``
(i.e. ``<= budget * total``); when even the cheapest choice is over budget it
raises :class:`autorank.solver.Infeasible`.  Register your own with
:func:`register_allocator`; ``optimize(..., allocator=name)`` uses it, and
``optimize(..., allocator=functools.partial(fn, option=...))`` passes options.

* ``"alds"`` (default): the exact global step of :mod:`autorank.solver`.
* ``"uniform"``: the same fraction ``r`` of the full rank in every layer (plain SVD,
  ``k = 1``): layer ``l`` keeps ``j_l = max(1, floor(r * min(f, c*K)))``, or stays
  dense when that is not cheaper; ``r`` is the largest fraction that fits the budget
  (total cost is non-decreasing in ``r``, so bisection finds it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from .config import SolverConfig
from .curves import LayerCurves
from .solver import Infeasible, solve_minmax, solve_sum_dp, solve_sum_lagrangian

__all__ = ["AllocationContext", "register_allocator", "get_allocator", "resolve_allocator",
           "available_allocators", "uniform_allocation",
           "allocate", "solve_curves"]


@dataclass
class AllocationContext:
    """Everything an allocator may use.

    curves:   ``{layer: LayerCurves}``, every candidate with its error and costs.
    budget, metric, total, fixed: the budget is ``fixed + sum(cost) <= budget * total``.
    solver:   the :class:`SolverConfig`.
    model:    the dense model being compressed (read-only: never modify it).
    example_inputs: the inputs ``optimize`` was given.
    moments:  ``{layer: Moments}`` of the calibration data, or None (weight-only).
    evaluate: the user's ``evaluate(model) -> float`` (higher is better), or None.
    cache:    a dict the allocator may use to keep results between calls with the
              same model (e.g. a sensitivity table); ``optimize`` keeps one per run.
    """

    curves: Mapping[str, LayerCurves]
    budget: float
    metric: str
    total: int
    fixed: int
    solver: SolverConfig = field(default_factory=SolverConfig)
    model: Any = None
    example_inputs: Any = None
    moments: Mapping[str, Any] | None = None
    evaluate: Callable[[Any], float] | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def room(self) -> float:
        """What the compressible layers may cost together: ``budget * total - fixed``."""
        return self.budget * self.total - self.fixed

    def cost(self, picked: Mapping[str, int]) -> float:
        """Total cost of the picked candidates in the budget metric."""
        return sum(float(self.curves[n].cost(self.metric)[i]) for n, i in picked.items())


Allocator = Callable[[AllocationContext], dict[str, int]]
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


def resolve_allocator(allocator: str | Allocator) -> tuple[str, Allocator]:
    """``(name, function)`` for a registered name or a callable taking an :class:`AllocationContext`."""
    if isinstance(allocator, str):
        return allocator, get_allocator(allocator)
    if callable(allocator):
        func = getattr(allocator, "func", allocator)  # functools.partial
        return getattr(func, "__name__", type(func).__name__), allocator
    raise TypeError(f"allocator must be a registered name or a callable(ctx), got {allocator!r}")


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


def uniform_allocation(ctx: AllocationContext) -> dict[str, int]:
    """The same rank fraction in every layer, the largest that meets the budget."""
    curves, metric, room = ctx.curves, ctx.metric, ctx.room

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


def alds_allocation(ctx: AllocationContext) -> dict[str, int]:
    """The exact ALDS global step over every candidate of every enabled family."""
    return solve_curves(ctx.curves, ctx.budget, ctx.metric, ctx.total, ctx.fixed, ctx.solver)


def solve_curves(
    curves: Mapping[str, LayerCurves],
    budget: float,
    metric: str,
    total: int,
    fixed: int,
    solver: SolverConfig | None = None,
) -> dict[str, int]:
    """The ALDS global step (:mod:`autorank.solver`) over the curves; raises ``Infeasible``."""
    solver = solver or SolverConfig()
    names = list(curves)
    errors = [curves[n].error for n in names]
    costs = [curves[n].cost(metric).astype(np.float64) for n in names]
    room = budget * total - fixed
    if solver.objective == "max":
        choice, _ = solve_minmax(errors, costs, room, fill=solver.fill)
    elif solver.method == "dp":
        choice = solve_sum_dp(errors, costs, room, bins=solver.dp_bins)
    else:
        choice = solve_sum_lagrangian(errors, costs, room)
    return {n: int(c) for n, c in zip(names, choice)}


def allocate(
    curves: Mapping[str, LayerCurves],
    budget: float,
    metric: str,
    total: int,
    fixed: int,
    solver: SolverConfig | None = None,
    allocator: Any = "alds",
    **context: Any,
) -> tuple[dict[str, int], float]:
    """The global step: one candidate index per layer with ``fixed + sum(cost) <= budget * total``.

    ``allocator`` names a registered allocator (``available_allocators()``) or is a
    callable taking an :class:`autorank.allocators.AllocationContext`; ``context``
    fills that context's optional fields (``model``, ``example_inputs``, ``moments``,
    ``evaluate``, ``cache``) for allocators that use data or evaluations.
    Returns ``({layer: candidate index}, largest error)``.

    Raises:
        ValueError: the budget cannot be met; the message gives the smallest reachable budget.
    """
    name, fn = resolve_allocator(allocator)
    ctx = AllocationContext(curves=curves, budget=budget, metric=metric, total=total, fixed=fixed,
                            solver=solver or SolverConfig(), **context)
    try:
        picked = fn(ctx)
    except Infeasible as exc:
        smallest = (fixed + exc.minimum) / total
        raise ValueError(
            f"budget={budget:g} of {metric} cannot be reached: the smallest reachable budget is "
            f"{smallest:.4f} ({fixed:,} of the {total:,} {metric} cannot be compressed, and every "
            "compressible layer is already at its cheapest candidate)"
        ) from None
    _check_picked(name, curves, picked, ctx)
    worst = max((float(curves[n].error[i]) for n, i in picked.items()), default=0.0)
    return picked, worst


def _check_picked(name: str, curves: Mapping[str, LayerCurves], picked: Any, ctx: Any) -> None:
    if not isinstance(picked, Mapping) or set(picked) != set(curves):
        raise RuntimeError(f"allocator {name!r} must return one candidate index for every layer with curves")
    for n, i in picked.items():
        if not 0 <= int(i) < len(curves[n]):
            raise RuntimeError(f"allocator {name!r} picked candidate {i} of layer {n!r}, which has {len(curves[n])}")
    if ctx.cost(picked) > ctx.room * (1 + 1e-9) + 1e-6:
        raise RuntimeError(f"allocator {name!r} went over budget: {ctx.cost(picked):,.0f} > {ctx.room:,.0f} "
                           f"{ctx.metric} for the compressible layers")


register_allocator("alds", alds_allocation)
register_allocator("uniform", uniform_allocation)
from . import baselines as _baselines  # noqa: E402,F401  (registers the baseline allocators)
