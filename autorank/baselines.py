r"""Baseline rank-selection allocators (the ones the ALDS reference ships beside ALDS).

Each chooses, per layer ``l``, a plain truncated-SVD rank ``j_l`` (the ALDS
candidate with ``groups = 1``) or keeps the layer dense (candidate 0), and meets the
budget ``sum_l cost_l(j_l) <= ctx.room``.  A rank whose candidate is absent from the
curves (not cheaper than dense) means dense; layers whose curves have no ``"alds"``
candidates stay dense.  Every rule has one global scalar knob, and the total cost is
monotone in it, so bisection finds the most generous setting that fits.  When even
every layer at rank 1 is over budget, they raise :class:`autorank.solver.Infeasible`.

Notation: ``s_1 >= s_2 >= ... >= s_m`` (``m = min(f, n)``) is the layer's spectrum --
the singular values of its ``f x n`` weight matrix ``W``, or, with calibration moments
``M = E[x x^T]``, the singular values of ``W M^{1/2}`` (square roots of the eigenvalues
of ``W M W^T``), whose truncation is the data-aware (whitened) one that autorank
realises (:mod:`autorank.calibration`).

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
* ``"sensitivity"`` (AIMET-style greedy selection) -- a score per layer and rank ratio,
  each layer compressed alone; one score threshold ``t``, every layer takes its cheapest
  ratio scoring ``>= t`` (dense if none); ``t`` is the largest threshold that fits.

Shared pieces: :func:`layer_spectrum` (cached in ``ctx.cache``), :func:`rank_tables`
(rank -> candidate index and cost), :func:`bisect_threshold` and :func:`bisect_sorted`
(the most generous setting of a monotone scalar knob).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from ._util import single_thread
from .allocators import AllocationContext, register_allocator
from .curves import LayerCurves
from .solver import Infeasible

__all__ = [
    "RankTable",
    "layer_spectrum",
    "rank_table",
    "rank_tables",
    "bisect_threshold",
    "bisect_sorted",
    "svd_energy_allocation",
    "lrank_choice",
    "lrank_allocation",
    "vbmf_ranks",
    "vbmf_allocation",
    "pca_allocation",
    "fidelity_score",
    "model_fingerprint",
    "sensitivity_table",
    "sensitivity_allocation",
    "output_gains",
    "alds_output_allocation",
    "DEFAULT_RATIOS",
]

log = logging.getLogger(__name__)

DEFAULT_RATIOS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_SPECTRUM_KEY = "autorank.baselines.spectrum"
_SENSITIVITY_KEY = "autorank.baselines.sensitivity"
_SENSITIVITY_VERSION = 1


# ---- shared helpers ---------------------------------------------------------------------


def _digest(tensor: torch.Tensor, h: Any = None) -> Any:
    """Feed ``tensor``'s dtype, shape and bytes into a hash (a new blake2b when ``h`` is None)."""
    h = h if h is not None else hashlib.blake2b(digest_size=16)
    t = tensor.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h


def _model_of(ctx: AllocationContext) -> nn.Module:
    if not isinstance(ctx.model, nn.Module):
        raise ValueError("the baseline allocators read the layer weights: the context needs the model "
                         "(optimize and allocate(..., model=...) pass it)")
    return ctx.model


def _moment(ctx: AllocationContext, name: str) -> torch.Tensor | None:
    mom = (ctx.moments or {}).get(name)
    return None if mom is None else mom.matrix


def _output_moment(ctx: AllocationContext, name: str) -> torch.Tensor | None:
    mom = (ctx.moments or {}).get(name)
    return None if mom is None else mom.output_matrix


@torch.no_grad()
def layer_spectrum(ctx: AllocationContext, name: str) -> np.ndarray:
    r"""Descending spectrum ``s_1 >= ... >= s_m`` (``m = min(f, n)``, float64) of layer ``name``.

    Weight-only: the singular values of the ``f x n`` weight matrix ``W``.  With
    calibration moments for the layer: the singular values of ``W M^{1/2}``, i.e. the
    square roots of the eigenvalues of ``W M W^T`` (so ``s_i^2`` is the output energy
    ``E||u_i^T W x||^2`` of component ``i``).  Cached in ``ctx.cache`` under the layer
    name and a digest of its weight (and moment).
    """
    from .layers import get_layer_handler
    from .vbmf import singular_values

    module = _model_of(ctx).get_submodule(name)
    w = get_layer_handler(module).weight_matrix(module).detach()
    moment = _moment(ctx, name)
    h = _digest(w)
    if moment is not None:
        _digest(moment, h)
    key = (name, h.hexdigest())
    store = ctx.cache.setdefault(_SPECTRUM_KEY, {})
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


def _picked(ctx: AllocationContext, tables: Mapping[str, RankTable], ranks: Mapping[str, int]) -> dict[str, int]:
    """``{layer: candidate index}`` for every layer of the curves (missing ranks: dense)."""
    out = {name: 0 for name in ctx.curves}
    for name, j in ranks.items():
        out[name] = int(tables[name].index[j])
    return out


def _total(tables: Mapping[str, RankTable], ranks: Mapping[str, int], dense: float) -> float:
    return dense + sum(float(tables[n].cost[j]) for n, j in ranks.items())


def _check_floor(ctx: AllocationContext, tables: Mapping[str, RankTable], dense: float) -> None:
    """Raise :class:`Infeasible` when every layer at rank 1 (or dense where rank 1 is absent) is over budget."""
    lowest = _total(tables, {n: min(1, t.full) for n, t in tables.items()}, dense)
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


# ---- svd_energy ---------------------------------------------------------------------------


def _discarded_fraction(s: np.ndarray) -> np.ndarray:
    """``e[j-1] = sum_{i>j} s_i^2 / sum_i s_i^2`` for ``j = 1 .. m`` (non-increasing, ``e[m-1] = 0``)."""
    e2 = s.astype(np.float64) ** 2
    tail = np.concatenate([np.cumsum(e2[::-1])[::-1][1:], [0.0]])
    total = float(e2.sum())
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
    _check_floor(ctx, tables, dense)
    fracs = {n: _discarded_fraction(layer_spectrum(ctx, n)) for n in tables}

    def ranks(t: float) -> dict[str, int]:
        return {n: min(int(np.sum(e > t)) + 1, tables[n].full) for n, e in fracs.items()}

    values = np.concatenate([[0.0, 1.0], *fracs.values()])
    t = bisect_sorted(lambda t: _total(tables, ranks(t), dense), ctx.room, values, increasing=False)
    return _picked(ctx, tables, ranks(t))


# ---- lrank -------------------------------------------------------------------------------------


def _lrank_options(s: np.ndarray, table: RankTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ranks, tail energy, cost)`` of a layer's options: dense (rank 0 here) and every present rank."""
    top = table.top
    e2 = s.astype(np.float64) ** 2
    tail = np.concatenate([np.cumsum(e2[::-1])[::-1][1:], [0.0]])  # tail[j-1] = sum_{i>j} s_i^2
    ranks = np.arange(0, top + 1)
    err = np.concatenate([[0.0], tail[:top]])
    return ranks, err, table.cost[: top + 1]


def lrank_choice(ctx: AllocationContext, lam: float) -> dict[str, int]:
    r"""L-Rank's choice at a fixed multiplier: ``argmin_j sum_{i>j} s_i^2 + lam * cost(j)`` per layer.

    The options are every present rank and dense (error 0, dense cost); ties go to the
    cheaper option.  The objective is separable, so this is also the minimiser of
    ``sum_l (error_l + lam * cost_l)`` over all layers together.  Returns candidate indices.
    """
    tables, _ = rank_tables(ctx)
    opts = {n: _lrank_options(layer_spectrum(ctx, n), t) for n, t in tables.items()}
    return _picked(ctx, tables, _lrank_ranks(opts, lam))


def _lrank_ranks(opts: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]], lam: float) -> dict[str, int]:
    out = {}
    for n, (ranks, err, cost) in opts.items():
        out[n] = int(ranks[np.lexsort((cost, err + lam * cost))[0]])
    return out


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
    _check_floor(ctx, tables, dense)
    opts = {n: _lrank_options(layer_spectrum(ctx, n), t) for n, t in tables.items()}

    def total(lam: float) -> float:
        return _total(tables, _lrank_ranks(opts, lam), dense)

    if total(0.0) <= ctx.room:
        return _picked(ctx, tables, _lrank_ranks(opts, 0.0))
    energy = max((float(err.max()) for _, err, _ in opts.values()), default=0.0)
    gaps = [np.diff(np.unique(cost)) for _, _, cost in opts.values()]  # every positive cost difference
    step = min((float(g.min()) for g in gaps if len(g)), default=1.0)
    hi = max(4.0 * energy / step, 1e-300)  # above tail(1) / (cost gap): rank 1 beats every other option
    lo = hi * 1e-40
    lam = bisect_threshold(total, ctx.room, lo, hi, increasing=False, geometric=True)
    return _picked(ctx, tables, _lrank_ranks(opts, lam))


# ---- vbmf ----------------------------------------------------------------------------------------


def vbmf_ranks(ctx: AllocationContext) -> dict[str, int]:
    """The analytic EVBMF rank (clipped to ``>= 1``) of every layer with plain-SVD candidates.

    On the ``f x n`` weight matrix, or with calibration moments on ``W M^{1/2}`` (same shape,
    the spectrum of :func:`layer_spectrum`).
    """
    from .vbmf import evbmf_rank

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
    _check_floor(ctx, tables, dense)
    base = vbmf_ranks(ctx)

    def ranks(alpha: float) -> dict[str, int]:
        return {n: int(min(max(math.floor(alpha * r + 0.5), 1), tables[n].full)) for n, r in base.items()}

    top = max((tables[n].full / r for n, r in base.items()), default=1.0)
    hi = top if max_alpha is None else float(max_alpha)
    alpha = bisect_threshold(lambda a: _total(tables, ranks(a), dense), ctx.room, 0.0, hi, increasing=True)
    return _picked(ctx, tables, ranks(alpha))


# ---- pca -----------------------------------------------------------------------------------------


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
    _check_floor(ctx, tables, dense)
    ratios = {}
    for n, t in tables.items():
        lam = layer_spectrum(ctx, n) ** 2
        total = float(lam.sum())
        frac = lam / total if total > 0 else np.zeros_like(lam)
        top = t.top
        unit = float(t.cost[2] - t.cost[1]) if top >= 2 else float(t.cost[1]) if top == 1 else 1.0
        ratios[n] = frac / max(unit, 1e-300)

    def ranks(th: float) -> dict[str, int]:
        return {n: min(max(int(np.sum(r >= th)), 1), tables[n].full) for n, r in ratios.items()}

    values = np.concatenate([[0.0], *ratios.values()])
    th = bisect_sorted(lambda th: _total(tables, ranks(th), dense), ctx.room, values, increasing=False)
    return _picked(ctx, tables, ranks(th))


# ---- sensitivity ---------------------------------------------------------------------------------


def _flat_output(out: Any) -> torch.Tensor:
    """Every floating tensor in a (nested) model output, flattened and concatenated (float64)."""
    parts: list[torch.Tensor] = []
    stack = [out]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            if o.is_floating_point() or o.is_complex():
                parts.append(o.detach().reshape(-1).to(torch.float64))
        elif isinstance(o, Mapping):
            stack.extend(reversed(list(o.values())))
        elif isinstance(o, (tuple, list)):
            stack.extend(reversed(list(o)))
        elif hasattr(o, "to_tuple"):  # Hugging Face ModelOutput
            stack.extend(reversed(list(o.to_tuple())))
    if not parts:
        raise ValueError("the model output holds no floating-point tensor to score")
    return torch.cat(parts)


@torch.no_grad()
def fidelity_score(model: nn.Module, example_inputs: Any, reference: torch.Tensor) -> float:
    """``1 - ||y_hat - y|| / ||y||``: how well ``model``'s output on ``example_inputs`` matches ``reference``.

    ``y`` is the dense model's output (all floating tensors of it, flattened); 1 is a
    perfect match, and the score falls as the output drifts.
    """
    from .graph import run_model

    y_hat = _flat_output(run_model(model, example_inputs))
    if y_hat.shape != reference.shape:
        raise ValueError(f"output of {y_hat.numel()} values does not match the reference's {reference.numel()}")
    scale = float(reference.norm())
    return 1.0 - float((y_hat - reference).norm()) / (scale if scale > 0 else 1.0)


def model_fingerprint(model: nn.Module, *extra: Any) -> str:
    """A hex digest of every parameter and buffer of ``model`` (names, dtypes, shapes, values) and ``extra``."""
    h = hashlib.blake2b(digest_size=20)
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _digest(t, h)
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _check_ratios(ratios: Any) -> tuple[float, ...]:
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence):
        raise TypeError(f"sensitivity: ratios must be a sequence of floats in (0, 1], got {ratios!r}")
    out = []
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float, np.floating, np.integer)):
            raise TypeError(f"sensitivity: every ratio must be a number, got {r!r}")
        if not (0.0 < float(r) <= 1.0):
            raise ValueError(f"sensitivity: every ratio must be in (0, 1], got {r!r}")
        out.append(float(r))
    if not out:
        raise ValueError("sensitivity: ratios must hold at least one rank ratio")
    return tuple(sorted(set(out)))


def _check_cache_path(cache_path: Any) -> Path | None:
    if cache_path is None:
        return None
    if not isinstance(cache_path, (str, os.PathLike)):
        raise TypeError(f"sensitivity: cache_path must be a path (str or os.PathLike) or None, got {cache_path!r}")
    path = Path(cache_path)
    if path.is_dir():
        raise ValueError(f"sensitivity: cache_path {str(path)!r} is a directory; name a JSON file")
    return path


def _ratio_rank(ratio: float, full: int) -> int:
    return max(1, min(full, int(math.floor(ratio * full + 1e-9))))


def _load_table(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("sensitivity: ignoring unreadable cache %s (%s); recomputing", path, exc)
        return None
    if not isinstance(data, dict) or data.get("version") != _SENSITIVITY_VERSION:
        log.warning("sensitivity: ignoring cache %s of another format; recomputing", path)
        return None
    if data.get("fingerprint") != fingerprint:
        log.warning("sensitivity: cache %s was made for another model, layer set, ratios or scorer; "
                    "recomputing and overwriting it", path)
        return None
    return data


def _save_table(path: Path, table: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=1))
    os.replace(tmp, path)


def sensitivity_table(
    ctx: AllocationContext,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    cache_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Score every (layer, rank ratio), each layer compressed alone; cached.

    For each layer with plain-SVD candidates and each distinct rank
    ``j = max(1, floor(ratio * m))`` (rank 1 is always scored too, so every budget that
    all-rank-1 meets stays reachable) whose candidate exists, that one layer of ONE deep
    copy of the model is swapped for its truncated SVD (whitened with the layer's
    calibration moment when there is one, as ``optimize`` realises it), the copy is
    scored, and the dense layer is swapped back.  The score is ``ctx.evaluate(model)``
    (higher is better) or, without it, :func:`fidelity_score` on ``ctx.example_inputs``
    (the copy in eval mode); a NaN or infinite score counts as the worst, ``-inf``.

    The table is kept in ``ctx.cache`` and, with ``cache_path``, in a JSON file, both
    under a fingerprint of the model's weights, the layers, the ratios, the calibration
    moments and the scorer (a different ``evaluate`` function of the same name is not
    detected: delete the file).  A file with another fingerprint is recomputed and
    overwritten.  Returns ``{"version", "fingerprint", "ratios", "scores": {layer:
    [[rank, score], ...]}}`` (ranks ascending).
    """
    from .families import get_family, output_kwargs
    from .graph import run_model
    from .realize import replace_module

    ratios = _check_ratios(ratios)
    path = _check_cache_path(cache_path)
    model = _model_of(ctx)
    tables, _ = rank_tables(ctx)
    if ctx.evaluate is None and ctx.example_inputs is None:
        raise ValueError("allocator 'sensitivity' needs evaluate=... or example inputs to score the model")
    if ctx.evaluate is not None:
        scorer = ["evaluate", getattr(ctx.evaluate, "__qualname__", type(ctx.evaluate).__name__)]
    else:
        h = hashlib.blake2b(digest_size=16)
        for t in _inputs_tensors(ctx.example_inputs):
            _digest(t, h)
        scorer = ["fidelity", h.hexdigest()]
    moments = {n: _digest(m).hexdigest() for n in sorted(tables) if (m := _moment(ctx, n)) is not None}
    outputs = {n: _digest(g).hexdigest() for n in sorted(tables) if (g := _output_moment(ctx, n)) is not None}
    if outputs:
        moments["<output>"] = outputs
    fingerprint = model_fingerprint(model, "sensitivity", _SENSITIVITY_VERSION, list(ratios), sorted(tables),
                                    moments, scorer)
    store = ctx.cache.setdefault(_SENSITIVITY_KEY, {})
    if fingerprint in store:
        return store[fingerprint]
    table = _load_table(path, fingerprint) if path is not None else None
    if table is None:
        work = copy.deepcopy(model)
        if ctx.evaluate is None:
            work.eval()
            with torch.no_grad():
                reference = _flat_output(run_model(work, ctx.example_inputs))

            def score(m: nn.Module) -> float:
                return fidelity_score(m, ctx.example_inputs, reference)
        else:
            score = ctx.evaluate
        alds = get_family("alds")
        scores: dict[str, list[list[float]]] = {}
        for name, t in tables.items():
            old = work.get_submodule(name)
            wanted = sorted({1} | {_ratio_rank(r, t.full) for r in ratios})
            rows = []
            for j in wanted:
                if not t.index[j]:
                    continue  # not cheaper than dense: taken as dense
                new = alds.realize(old, {"groups": 1, "rank": int(j)}, _moment(ctx, name),
                                   **output_kwargs(alds, _output_moment(ctx, name)))
                new.train(old.training)
                replace_module(work, name, new)
                try:
                    q = float(score(work))
                finally:
                    replace_module(work, name, old)
                rows.append([int(j), q if math.isfinite(q) else -math.inf])  # NaN scores count as the worst
            scores[name] = rows
        table = {"version": _SENSITIVITY_VERSION, "fingerprint": fingerprint, "ratios": list(ratios),
                 "scores": scores}
        if path is not None:
            _save_table(path, table)
    store[fingerprint] = table
    return table


def _inputs_tensors(inputs: Any) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return [t for k in sorted(inputs) for t in _inputs_tensors(inputs[k])]
    if isinstance(inputs, (tuple, list)):
        return [t for v in inputs for t in _inputs_tensors(v)]
    return []


def sensitivity_allocation(
    ctx: AllocationContext,
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    cache_path: str | os.PathLike | None = None,
) -> dict[str, int]:
    r"""Greedy per-layer sensitivity (AIMET style): one common score threshold.

    With the table of :func:`sensitivity_table` (score ``q_l(j)`` of the model with only
    layer ``l`` at rank ``j``), a threshold ``t`` gives every layer its cheapest scored rank
    with ``q_l(j) >= t``, or dense if none; total cost does not decrease with ``t``, and the
    largest ``t`` that fits is found exactly by bisection over the scores.

    Options (pass them with ``functools.partial``): ``ratios`` -- rank fractions of each
    layer's full rank to score (default 0.1 .. 0.9); ``cache_path`` -- a JSON file that keeps
    the table between runs (validated by the model's fingerprint).
    """
    ratios = _check_ratios(ratios)
    _check_cache_path(cache_path)
    tables, dense = rank_tables(ctx)
    _check_floor(ctx, tables, dense)
    table = sensitivity_table(ctx, ratios, cache_path)
    rows = {n: (np.array([r[0] for r in table["scores"].get(n, [])], np.int64),
                np.array([r[1] for r in table["scores"].get(n, [])], np.float64)) for n in tables}

    def ranks(th: float) -> dict[str, int]:
        out = {}
        for n, (js, qs) in rows.items():
            ok = np.nonzero(qs >= th)[0]
            out[n] = int(js[ok[0]]) if len(ok) else 0  # ranks ascending: the first is the cheapest
        return out

    values = np.concatenate([[-np.inf], *(qs for _, qs in rows.values())])
    th = bisect_sorted(lambda th: _total(tables, ranks(th), dense), ctx.room, values, increasing=True)
    return _picked(ctx, tables, ranks(th))


def output_gains(ctx: AllocationContext, probes: Sequence[float] = (0.25, 0.5),
                 cache_path: str | os.PathLike | None = None) -> dict[str, float]:
    r"""Measured output gain ``g_l`` of every layer: output error per unit of layer error.

    For each layer, at the plain-SVD ranks ``j = floor(p * m)`` of ``probes``, the model
    with only that layer compressed is scored (the :func:`sensitivity_table` machinery,
    so it is cached the same way), and

        g_l = median_j  (q_0 - q_l(j)) / eps_l(j),

    where ``q`` is ``ctx.evaluate`` (``q_0`` of the dense model) or the output fidelity
    ``1 - ||y_hat - y|| / ||y||`` (``q_0 = 1``), and ``eps_l(j)`` is the layer's own error
    from its curves.  A layer whose probes change nothing gets ``g_l = 0``.
    """
    table = sensitivity_table(ctx, probes, cache_path)
    if ctx.evaluate is not None:
        base = float(ctx.evaluate(_model_of(ctx)))
    else:
        base = 1.0
    gains = {}
    for name, lc in ctx.curves.items():
        ratios = []
        for j, q in table["scores"].get(name, []):
            idx = lc.find("alds", groups=1, rank=int(j))
            eps = float(lc.error[idx]) if idx is not None else 0.0
            if eps > 1e-12 and math.isfinite(q):
                ratios.append(max(base - q, 0.0) / eps)
        gains[name] = float(np.median(ratios)) if ratios else 0.0
    return gains


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
    from dataclasses import replace

    from .api import solve_curves
    from .config import SolverConfig

    probes = _check_ratios(probes)
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0.25 <= float(power) <= 8:
        raise ValueError(f"alds_output: power must be a number in [0.25, 8], got {power!r}")
    gains = output_gains(ctx, probes, cache_path)
    scaled = {n: replace(lc, error=(gains[n] * lc.error) ** float(power)) for n, lc in ctx.curves.items()}
    solver = SolverConfig(objective="sum", method=ctx.solver.method if ctx.solver.objective == "sum" else "auto",
                          dp_bins=ctx.solver.dp_bins)
    log.info("alds_output: gains %s", {n: round(g, 3) for n, g in gains.items()})
    return solve_curves(scaled, ctx.budget, ctx.metric, ctx.total, ctx.fixed, solver)


register_allocator("svd_energy", svd_energy_allocation)
register_allocator("alds_output", alds_output_allocation)
register_allocator("lrank", lrank_allocation)
register_allocator("vbmf", vbmf_allocation)
register_allocator("pca", pca_allocation)
register_allocator("sensitivity", sensitivity_allocation)
