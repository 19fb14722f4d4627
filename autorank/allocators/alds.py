r"""ALDS allocators: the exact global step over every candidate of every enabled family.

* ``"alds"`` (default): :func:`autorank.allocators.solve_curves` on the curves as they are.
* ``"alds_output"``: the same step on output-weighted errors ``(g_l eps_l)^power``, with
  ``g_l`` each layer's measured output gain (:func:`autorank.allocators.output_gains`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Sequence

import numpy as np

from ..config import SolverConfig
from .base import AllocationContext, register_allocator, solve_curves
from .evaluated import check_ratios, output_gains

__all__ = ["alds_allocation", "alds_output_allocation", "output_weighted_error"]

log = logging.getLogger(__name__)


def alds_allocation(ctx: AllocationContext) -> dict[str, int]:
    """The exact ALDS global step over every candidate of every enabled family."""
    return solve_curves(ctx.curves, ctx.budget, ctx.metric, ctx.total, ctx.fixed, ctx.solver)


def output_weighted_error(error: np.ndarray, gain: float, power: float) -> np.ndarray:
    """``(g * eps)^power``: a layer's errors ``eps`` as the error they cause at the model's output."""
    return (gain * error) ** float(power)


def alds_output_allocation(
    ctx: AllocationContext,
    *,
    probes: Sequence[float] = (0.25, 0.5),
    cache_path: str | os.PathLike | None = None,
    power: float = 2.0,
) -> dict[str, int]:
    r"""ALDS on output-weighted errors: the exact global step over ``(g_l eps_l)^power``.

    Each layer's error curve (every candidate of every enabled family, weight-only or
    data-aware) is scaled by its measured output gain ``g_l`` (:func:`output_gains`), so
    ``g_l eps_l`` predicts the error the layer causes at the model's output (to first
    order).  Errors from different layers add roughly in quadrature, so the solver
    minimises ``sum_l log(1 + (g_l eps_l)^2) ~= sum_l (g_l eps_l)^2`` (the sum objective)
    under the budget (``power=2``; ``power=1`` assumes the errors add coherently).  It
    costs one evaluation per layer and probe on top of ALDS.
    """
    probes = check_ratios(probes)
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0.25 <= float(power) <= 8:
        raise ValueError(f"alds_output: power must be a number in [0.25, 8], got {power!r}")
    gains = output_gains(ctx, probes, cache_path)
    scaled = {n: replace(lc, error=output_weighted_error(lc.error, gains[n], power)) for n, lc in ctx.curves.items()}
    solver = SolverConfig(objective="sum", method=ctx.solver.method if ctx.solver.objective == "sum" else "auto",
                          dp_bins=ctx.solver.dp_bins)
    log.info("alds_output: gains %s", {n: round(g, 3) for n, g in gains.items()})
    return solve_curves(scaled, ctx.budget, ctx.metric, ctx.total, ctx.fixed, solver)


register_allocator("alds", alds_allocation)
register_allocator("alds_output", alds_output_allocation)
