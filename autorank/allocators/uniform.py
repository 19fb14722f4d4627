r"""The ``"uniform"`` allocator: the same fraction of the full rank in every layer.

Plain SVD (``k = 1``): layer ``l`` keeps ``j_l = max(1, floor(r * min(f, c*K)))``, or
stays dense when that is not cheaper; ``r`` is the largest fraction that fits the
budget (total cost is non-decreasing in ``r``, so bisection finds it).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..curves import LayerCurves
from ..solver import Infeasible
from .base import AllocationContext, register_allocator

__all__ = ["uniform_rank", "uniform_pick", "uniform_allocation"]


def uniform_rank(fraction: float, full: int) -> int:
    """``max(1, floor(fraction * full))``: the rank at ``fraction`` of the full rank ``full``."""
    return max(1, int(np.floor(fraction * full + 1e-9)))


def uniform_pick(lc: LayerCurves, fraction: float) -> int:
    """Index of the k = 1 candidate at ``fraction`` of full rank, or 0 (dense) if it is not cheaper."""
    info = lc.info
    rank = uniform_rank(fraction, min(info.out_features, info.in_channels * info.taps))
    index = lc.find("alds", groups=1, rank=rank)
    return 0 if index is None else index


def largest_fraction(ctx: AllocationContext, pick: Callable[[LayerCurves, float], int]) -> dict[str, int]:
    """``{layer: pick(curves, x)}`` at the largest ``x`` in ``[0, 1]`` whose plan meets the budget (bisection).

    ``pick`` maps a layer's curves and a fraction to a candidate index and must be
    monotone (a larger fraction never costs less); ``Infeasible`` when even ``x = 0`` is over.
    """
    def picks(fraction: float) -> dict[str, int]:
        return {n: pick(lc, fraction) for n, lc in ctx.curves.items()}

    lowest = ctx.cost(picks(0.0))
    if lowest > ctx.room:
        raise Infeasible(ctx.room, lowest)
    lo, hi = 0.0, 1.0
    for _ in range(40):  # fraction resolution 1e-12: finer than any rank step
        mid = 0.5 * (lo + hi)
        if ctx.cost(picks(mid)) <= ctx.room:
            lo = mid
        else:
            hi = mid
    return picks(lo)


def uniform_allocation(ctx: AllocationContext) -> dict[str, int]:
    """The same rank fraction in every layer, the largest that meets the budget."""
    return largest_fraction(ctx, uniform_pick)


register_allocator("uniform", uniform_allocation)
