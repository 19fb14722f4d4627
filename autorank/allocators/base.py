"""The global step: :class:`AllocationContext`, the allocator registry, :func:`allocate`, :func:`solve_curves`.

An allocator is a plain function of an :class:`AllocationContext`::

    allocator(ctx) -> {layer: candidate index}

with ``ctx.fixed + sum(cost of the picked candidates) <= ctx.room + ctx.fixed``
(i.e. ``<= budget * total``); when even the cheapest choice is over budget it
raises :class:`autorank.solver.Infeasible`.  Register your own with
:func:`register_allocator`; ``optimize(..., compression=Compression(allocator=name))`` uses it,
and ``Compression(allocator=functools.partial(fn, option=...))`` passes options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn

from ..config import SolverConfig, callable_name
from ..curves import LayerCurves
from ..registry import ALLOCATORS
from ..solver import Infeasible, solve_minmax, solve_sum_dp, solve_sum_lagrangian

__all__ = ["AllocationContext", "Allocator", "register_allocator", "get_allocator", "resolve_allocator",
           "available_allocators", "solve_curves", "allocate"]


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
    outputs:  ``{layer: Moments}`` of the layers' output gradients (the Gauss-Newton output
              moments of :func:`autorank.calibration.collect_output_moments`), or None.
    cache:    a dict the allocator may use to keep results between calls with the
              same model (e.g. a sensitivity table); ``optimize`` keeps one per run.
    replay:   ``replay(work, layer)``, a context in which a copy ``work`` of the model that
              differs only in ``layer`` runs on ``example_inputs`` without recomputing the
              unchanged blocks before that layer (the same output as a full run;
              :func:`autorank.stream.block_replay`); ``layer=None`` for the unchanged copy's
              reference run.  None: run it all.
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
    outputs: Mapping[str, Any] | None = None
    replay: Callable[[Any, str | None], Any] | None = None

    @property
    def room(self) -> float:
        """What the compressible layers may cost together: ``budget * total - fixed``."""
        return self.budget * self.total - self.fixed

    def cost(self, picked: Mapping[str, int]) -> float:
        """Total cost of the picked candidates in the budget metric."""
        return sum(float(self.curves[n].cost(self.metric)[i]) for n, i in picked.items())

    def dense_model(self) -> nn.Module:
        """The model, for allocators that read the layer weights; ``ValueError`` when the context has none."""
        if not isinstance(self.model, nn.Module):
            raise ValueError("the baseline allocators read the layer weights: the context needs the model "
                             "(optimize and allocate(..., model=...) pass it)")
        return self.model

    def input_moment(self, name: str) -> torch.Tensor | None:
        """The calibration input moment ``M = E[x x^T]`` of layer ``name``, or None."""
        mom = (self.moments or {}).get(name)
        return None if mom is None else mom.matrix

    def output_moment(self, name: str) -> torch.Tensor | None:
        """The output-weighting moment of layer ``name`` (``Moments.output_matrix``), or None."""
        mom = (self.moments or {}).get(name)
        return None if mom is None else mom.output_matrix


Allocator = Callable[[AllocationContext], dict[str, int]]


def register_allocator(name: str, fn: Allocator) -> Allocator:
    """Register ``fn`` under ``name`` (replacing one of the same name)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"allocator name must be a non-empty str, got {name!r}")
    if not callable(fn):
        raise TypeError(f"allocator must be callable, got {type(fn).__name__}")
    return ALLOCATORS.register(name, fn)


def get_allocator(name: str) -> Allocator:
    """The allocator registered as ``name``; ``ValueError`` naming the available ones if there is none."""
    return ALLOCATORS.get(name)


def resolve_allocator(allocator: str | Allocator) -> tuple[str, Allocator]:
    """``(name, function)`` for a registered name or a callable taking an :class:`AllocationContext`."""
    if isinstance(allocator, str):
        return allocator, get_allocator(allocator)
    if callable(allocator):
        return callable_name(allocator), allocator  # a functools.partial by its function's name
    raise TypeError(f"allocator must be a registered name or a callable(ctx), got {allocator!r}")


def available_allocators() -> list[str]:
    """Names of the registered allocators."""
    return ALLOCATORS.names()


def solve_curves(
    curves: Mapping[str, LayerCurves],
    budget: float,
    metric: str,
    total: int,
    fixed: int,
    solver: SolverConfig | None = None,
) -> dict[str, int]:
    """The ALDS global step (:mod:`autorank.solver`) over the curves; raises ``Infeasible``.

    Minimises ``max_l error_l`` (``objective="max"``) or ``sum_l error_l`` subject to
    ``sum_l cost_l <= budget * total - fixed``.
    """
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
    curves: Mapping[str, LayerCurves], budget: float, metric: str, total: int, fixed: int,
    solver: SolverConfig | None = None, allocator: Any = "alds", **context: Any,
) -> tuple[dict[str, int], float]:
    """The global step: one candidate index per layer with ``fixed + sum(cost) <= budget * total``.

    ``allocator`` names a registered allocator (``available_allocators()``) or is a
    callable taking an :class:`autorank.allocators.AllocationContext`; ``context``
    fills that context's optional fields (``model``, ``example_inputs``, ``moments``,
    ``evaluate``, ``cache``, ``outputs``, ``replay``) for allocators that use data or evaluations.
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


def _check_picked(name: str, curves: Mapping[str, LayerCurves], picked: Any, ctx: AllocationContext) -> None:
    """``RuntimeError`` unless ``picked`` is one valid candidate index per layer, within the budget."""
    if not isinstance(picked, Mapping) or set(picked) != set(curves):
        raise RuntimeError(f"allocator {name!r} must return one candidate index for every layer with curves")
    for n, i in picked.items():
        if not 0 <= int(i) < len(curves[n]):
            raise RuntimeError(f"allocator {name!r} picked candidate {i} of layer {n!r}, which has {len(curves[n])}")
    if ctx.cost(picked) > ctx.room * (1 + 1e-9) + 1e-6:
        raise RuntimeError(f"allocator {name!r} went over budget: {ctx.cost(picked):,.0f} > {ctx.room:,.0f} "
                           f"{ctx.metric} for the compressible layers")
