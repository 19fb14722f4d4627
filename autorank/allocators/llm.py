r"""The ``"svd_llm"`` allocator: the uniform per-matrix parameter ratio of SVD-LLM (Wang et al., 2025).

A ``f x n`` weight kept at parameter ratio ``rho`` takes rank

.. math::  r(\rho) = \max(1, \lfloor \rho \, f n / (f + n) \rfloor),

so its two factors hold ``r (f + n) <= rho f n`` parameters: every matrix keeps the same
fraction of its parameters (a layer stays dense when rank ``r`` is not cheaper).  ``rho`` is
the largest ratio that meets the budget (total cost is non-decreasing in ``rho``: bisection).
With a calibrated call whose curves are whitened (``DataAware(output_weighting=False,
output_allocation=False, sequential=False)``) each layer is then the SVD-LLM truncation
``W_hat = [W L]_r L^{-1}``, ``L L^T = X X^T`` -- the rank-``r`` minimiser of
``||(W - W_hat) X||_F``, which autorank's whitened factors compute in eigen form
(:func:`autorank.linalg.whitened_factors`; :func:`autorank.linalg.whitened_factors_cholesky`
is the Cholesky form, equal to rounding).
"""

from __future__ import annotations

import math

from ..curves import LayerCurves
from .base import AllocationContext, register_allocator
from .uniform import largest_fraction

__all__ = ["svd_llm_rank", "svd_llm_pick", "svd_llm_allocation"]


def svd_llm_rank(ratio: float, f: int, n: int) -> int:
    """``max(1, floor(ratio * f * n / (f + n)))``: the rank that keeps ``ratio`` of an ``f x n`` matrix's parameters."""
    if not (0.0 <= ratio <= 1.0):
        raise ValueError(f"svd_llm: ratio must be in [0, 1], got {ratio!r}")
    if f < 1 or n < 1:
        raise ValueError(f"svd_llm: matrix sizes must be positive, got {f} x {n}")
    return max(1, int(math.floor(ratio * f * n / (f + n) + 1e-9)))


def svd_llm_pick(lc: LayerCurves, ratio: float) -> int:
    """Index of the one-group candidate of rank :func:`svd_llm_rank`, or 0 (dense) if it is not cheaper."""
    info = lc.info
    f, n = info.out_features, info.in_channels * info.taps
    rank = min(svd_llm_rank(ratio, f, n), f, n)
    index = lc.find("alds", groups=1, rank=rank)
    return 0 if index is None else index


def svd_llm_allocation(ctx: AllocationContext) -> dict[str, int]:
    """Every layer at one parameter ratio ``rho`` (:func:`svd_llm_rank`), the largest that meets the budget."""
    return largest_fraction(ctx, svd_llm_pick)


register_allocator("svd_llm", svd_llm_allocation)
