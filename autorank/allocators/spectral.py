r"""Spectral baseline allocators: rules that read each layer's singular values.

Notation: ``s_1 >= s_2 >= ... >= s_m`` (``m = min(f, n)``) is the layer's spectrum --
the singular values of its ``f x n`` weight matrix ``W``, or, with calibration moments
``M = E[x x^T]``, the singular values of ``W M^{1/2}`` (square roots of the eigenvalues
of ``W M W^T``), whose truncation is the data-aware (whitened) one that autorank
realises (:mod:`autorank.calibration`).  Each rule picks plain-SVD ranks
(:mod:`autorank.allocators.ranks`) with one global knob, found by bisection.

* ``"svd_energy"`` -- equal discarded energy fraction: with
  ``e_l(j) = sum_{i>j} s_i^2 / sum_i s_i^2``, every layer takes the smallest ``j`` with
  ``e_l(j) <= t``; ``t`` is the smallest threshold that fits.
* ``"lrank"`` (Idelbayev & Carreira-Perpinan, CVPR 2020) -- per layer
  ``j_l = argmin_{j in ranks + dense} sum_{i>j} s_i^2 + lam * cost_l(j)`` (dense: error
  0 at its dense cost); ``lam`` is the smallest multiplier that fits.
* ``"vbmf"`` (Nakajima et al. 2013; Kim et al. 2016) -- the analytic EVBMF rank
  ``r_l >= 1`` per layer, scaled by one global ``alpha``: ``j_l = clip(round(alpha r_l), 1, m)``
  with the largest ``alpha`` that fits.
* ``"pca"`` (Zhang et al. 2015; needs calibration data) -- eigenvalues ``lambda_i`` of
  the layer's output second moment ``W M W^T``; component ``i`` is kept iff
  ``(lambda_i / sum lambda) / c_l >= t`` with ``c_l`` the cost of one rank of layer ``l``;
  ``t`` is the smallest threshold that fits.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from .._util import single_thread
from ..layers import get_layer_handler
from ..vbmf import evbmf_rank, singular_values
from .base import AllocationContext, register_allocator
from .cache import tensor_digest
from .ranks import RankTable, bisect_sorted, bisect_threshold, check_floor, picked_indices, rank_tables, total_cost

__all__ = ["SPECTRUM_CACHE_KEY", "layer_spectrum", "tail_energy", "discarded_fraction", "svd_energy_allocation",
           "lrank_choice", "lrank_allocation", "vbmf_ranks", "vbmf_allocation", "pca_ratios", "pca_allocation"]

#: where :func:`layer_spectrum` keeps its results in ``ctx.cache``
SPECTRUM_CACHE_KEY = "autorank.baselines.spectrum"  # the value predates the move to autorank.allocators

LrankOptions = tuple[np.ndarray, np.ndarray, np.ndarray]


@torch.no_grad()
def layer_spectrum(ctx: AllocationContext, name: str) -> np.ndarray:
    r"""Descending spectrum ``s_1 >= ... >= s_m`` (``m = min(f, n)``, float64) of layer ``name``.

    Weight-only: the singular values of the ``f x n`` weight matrix ``W``.  With
    calibration moments for the layer: the singular values of ``W M^{1/2}``, i.e. the
    square roots of the eigenvalues of ``W M W^T`` (so ``s_i^2`` is the output energy
    ``E||u_i^T W x||^2`` of component ``i``).  Cached in ``ctx.cache`` under the layer
    name and a digest of its weight (and moment).
    """
    module = ctx.dense_model().get_submodule(name)
    w = get_layer_handler(module).weight_matrix(module).detach()
    moment = ctx.input_moment(name)
    h = tensor_digest(w)
    if moment is not None:
        tensor_digest(moment, h)
    key = (name, h.hexdigest())
    store = ctx.cache.setdefault(SPECTRUM_CACHE_KEY, {})
    if key in store:
        return store[key]
    f, n = w.shape
    if moment is None:
        s = singular_values(w)
    else:
        w64 = w.to(torch.float64)
        out = w64 @ moment.to(torch.float64) @ w64.T
        with single_thread(f):
            evals = torch.linalg.eigvalsh(0.5 * (out + out.T))
        s = evals.flip(0).clamp_min(0).sqrt().numpy()
    s = np.asarray(s, dtype=np.float64)[: min(f, n)]
    store[key] = s
    return s


# ---- svd_energy ---------------------------------------------------------------------------


def tail_energy(s: np.ndarray) -> np.ndarray:
    """``tail[j-1] = sum_{i>j} s_i^2`` for ``j = 1 .. m`` (float64, non-increasing, ``tail[m-1] = 0``)."""
    e2 = s.astype(np.float64) ** 2
    return np.concatenate([np.cumsum(e2[::-1])[::-1][1:], [0.0]])


def discarded_fraction(s: np.ndarray) -> np.ndarray:
    """``e[j-1] = sum_{i>j} s_i^2 / sum_i s_i^2`` for ``j = 1 .. m`` (non-increasing, ``e[m-1] = 0``)."""
    tail = tail_energy(s)
    total = float((s.astype(np.float64) ** 2).sum())
    return tail / total if total > 0 else np.zeros_like(tail)


def svd_energy_allocation(ctx: AllocationContext) -> dict[str, int]:
    r"""Equalise the discarded energy fraction across layers.

    ``e_l(j) = sum_{i>j} s_i^2 / sum_i s_i^2``; for a threshold ``t`` every layer takes the
    smallest rank with ``e_l(j) <= t`` (non-increasing total cost in ``t``), and ``t`` is the
    smallest value that fits, found exactly by bisection over the ``e_l(j)`` values.  So
    all compressed layers discard the same fraction to within one rank step:
    ``e_l(j_l) <= t < e_l(j_l - 1)``.
    """
    tables, dense = rank_tables(ctx)
    check_floor(ctx, tables, dense)
    fracs = {n: discarded_fraction(layer_spectrum(ctx, n)) for n in tables}

    def ranks(t: float) -> dict[str, int]:
        return {n: min(int(np.sum(e > t)) + 1, tables[n].full) for n, e in fracs.items()}

    values = np.concatenate([[0.0, 1.0], *fracs.values()])
    t = bisect_sorted(lambda t: total_cost(tables, ranks(t), dense), ctx.room, values, increasing=False)
    return picked_indices(ctx, tables, ranks(t))


# ---- lrank -------------------------------------------------------------------------------------


def lrank_options(s: np.ndarray, table: RankTable) -> LrankOptions:
    """``(ranks, tail energy, cost)`` of a layer's options: dense (rank 0 here) and every present rank."""
    top = table.top
    ranks = np.arange(0, top + 1)
    err = np.concatenate([[0.0], tail_energy(s)[:top]])
    return ranks, err, table.cost[: top + 1]


def lrank_ranks(opts: Mapping[str, LrankOptions], lam: float) -> dict[str, int]:
    """Per layer the rank minimising ``err + lam * cost`` among its options (ties: the cheaper one)."""
    out = {}
    for n, (ranks, err, cost) in opts.items():
        out[n] = int(ranks[np.lexsort((cost, err + lam * cost))[0]])
    return out


def lrank_choice(ctx: AllocationContext, lam: float) -> dict[str, int]:
    r"""L-Rank's choice at a fixed multiplier: ``argmin_j sum_{i>j} s_i^2 + lam * cost(j)`` per layer.

    The options are every present rank and dense (error 0, dense cost); ties go to the
    cheaper option.  The objective is separable, so this is also the minimiser of
    ``sum_l (error_l + lam * cost_l)`` over all layers together.  Returns candidate indices.
    """
    tables, _ = rank_tables(ctx)
    opts = {n: lrank_options(layer_spectrum(ctx, n), t) for n, t in tables.items()}
    return picked_indices(ctx, tables, lrank_ranks(opts, lam))


def lrank_allocation(ctx: AllocationContext) -> dict[str, int]:
    r"""L-Rank (Idelbayev & Carreira-Perpinan, CVPR 2020): a Lagrangian trade of tail energy for cost.

    Per layer ``j_l(lam) = argmin_{j in ranks + dense} sum_{i>j} s_i^2 + lam * cost_l(j)``
    (absolute tail energy; cost in the budget metric; dense has error 0 and its dense cost).
    The total cost does not increase with ``lam``; ``lam = 0`` is tried first, then the smallest
    ``lam`` that fits is found by geometric bisection over the 40 decades below a bound at which
    every layer is at rank 1 (``4 max_l sum_{i>1} s_i^2 / smallest cost difference``).  As in the
    paper, only choices on the lower convex hull of each layer's (cost, error) curve are
    reachable, so some budget may stay unused.
    """
    tables, dense = rank_tables(ctx)
    check_floor(ctx, tables, dense)
    opts = {n: lrank_options(layer_spectrum(ctx, n), t) for n, t in tables.items()}

    def total(lam: float) -> float:
        return total_cost(tables, lrank_ranks(opts, lam), dense)

    if total(0.0) <= ctx.room:
        return picked_indices(ctx, tables, lrank_ranks(opts, 0.0))
    energy = max((float(err.max()) for _, err, _ in opts.values()), default=0.0)
    gaps = [np.diff(np.unique(cost)) for _, _, cost in opts.values()]  # every positive cost difference
    step = min((float(g.min()) for g in gaps if len(g)), default=1.0)
    hi = max(4.0 * energy / step, 1e-300)  # above tail(1) / (cost gap): rank 1 beats every other option
    lo = hi * 1e-40
    lam = bisect_threshold(total, ctx.room, lo, hi, increasing=False, geometric=True)
    return picked_indices(ctx, tables, lrank_ranks(opts, lam))


# ---- vbmf ----------------------------------------------------------------------------------------


def vbmf_ranks(ctx: AllocationContext) -> dict[str, int]:
    """The analytic EVBMF rank (clipped to ``>= 1``) of every layer with plain-SVD candidates.

    On the ``f x n`` weight matrix, or with calibration moments on ``W M^{1/2}`` (same shape,
    the spectrum of :func:`layer_spectrum`).
    """
    tables, _ = rank_tables(ctx)
    out = {}
    for n, t in tables.items():
        info = ctx.curves[n].info
        s = layer_spectrum(ctx, n)
        r = evbmf_rank(svals=s, shape=(info.out_features, info.in_channels * info.taps))
        out[n] = int(min(max(r, 1), t.full))
    return out


def vbmf_allocation(ctx: AllocationContext, *, max_alpha: float | None = None) -> dict[str, int]:
    r"""EVBMF ranks scaled by one global factor to fit the budget.

    ``j_l(alpha) = clip(round(alpha * r_l), 1, m_l)`` with ``r_l`` from :func:`vbmf_ranks`
    (round half up); total cost is non-decreasing in ``alpha``, and ``alpha`` is the
    largest value in ``[0, max_alpha]`` that fits, by bisection.  Plain VBMF ignores
    budgets; here ``alpha < 1`` shrinks its ranks when they are over budget and, by
    default (``max_alpha=None``: up to every layer at full rank), ``alpha > 1`` also grows
    them when VBMF leaves budget unused, so the budget is used like the other
    allocators use it.  ``max_alpha=1.0`` keeps the VBMF ranks whenever they fit.
    """
    if max_alpha is not None:
        if isinstance(max_alpha, bool) or not isinstance(max_alpha, (int, float)):
            raise TypeError(f"vbmf: max_alpha must be a float or None, got {max_alpha!r}")
        if not (math.isfinite(max_alpha) and max_alpha > 0):
            raise ValueError(f"vbmf: max_alpha must be a positive finite number, got {max_alpha!r}")
    tables, dense = rank_tables(ctx)
    check_floor(ctx, tables, dense)
    base = vbmf_ranks(ctx)

    def ranks(alpha: float) -> dict[str, int]:
        return {n: int(min(max(math.floor(alpha * r + 0.5), 1), tables[n].full)) for n, r in base.items()}

    top = max((tables[n].full / r for n, r in base.items()), default=1.0)
    hi = top if max_alpha is None else float(max_alpha)
    alpha = bisect_threshold(lambda a: total_cost(tables, ranks(a), dense), ctx.room, 0.0, hi, increasing=True)
    return picked_indices(ctx, tables, ranks(alpha))


# ---- pca -----------------------------------------------------------------------------------------


def pca_ratios(s: np.ndarray, table: RankTable) -> np.ndarray:
    """``(lambda_i / sum_i lambda_i) / c`` with ``lambda_i = s_i^2`` and ``c`` the cost of one rank.

    ``c = cost(2) - cost(1)`` (the slope of the plain-SVD cost), ``cost(1)`` when only rank 1
    exists, 1 when no rank does.
    """
    lam = s ** 2
    total = float(lam.sum())
    frac = lam / total if total > 0 else np.zeros_like(lam)
    top = table.top
    unit = float(table.cost[2] - table.cost[1]) if top >= 2 else float(table.cost[1]) if top == 1 else 1.0
    return frac / max(unit, 1e-300)


def pca_allocation(ctx: AllocationContext) -> dict[str, int]:
    r"""PCA energy per unit cost (Zhang et al. 2015), one global threshold.

    ``lambda_i`` are the eigenvalues of the layer's (uncentred, bias-free) output second
    moment ``E[(W x)(W x)^T] = W M W^T`` from the calibration data; component ``i`` of layer
    ``l`` is kept iff ``(lambda_i / sum_i lambda_i) / c_l >= t``, where ``c_l`` is the cost of
    one rank of layer ``l`` in the budget metric (the slope of its plain-SVD cost).  The
    kept components are a prefix (rank ``j_l(t) >= 1``); total cost does not increase with
    ``t``, and the smallest ``t`` that fits is found exactly by bisection over the ratios.
    A layer the calibration never reached is scored on its weights (``M = I``).

    Raises:
        ValueError: the context has no calibration moments.
    """
    if not ctx.moments:
        raise ValueError("allocator 'pca' needs calibration data: pass calibration=... to optimize")
    tables, dense = rank_tables(ctx)
    check_floor(ctx, tables, dense)
    ratios = {n: pca_ratios(layer_spectrum(ctx, n), t) for n, t in tables.items()}

    def ranks(th: float) -> dict[str, int]:
        return {n: min(max(int(np.sum(r >= th)), 1), tables[n].full) for n, r in ratios.items()}

    values = np.concatenate([[0.0], *ratios.values()])
    th = bisect_sorted(lambda th: total_cost(tables, ranks(th), dense), ctx.room, values, increasing=False)
    return picked_indices(ctx, tables, ranks(th))


register_allocator("svd_energy", svd_energy_allocation)
register_allocator("lrank", lrank_allocation)
register_allocator("vbmf", vbmf_allocation)
register_allocator("pca", pca_allocation)
