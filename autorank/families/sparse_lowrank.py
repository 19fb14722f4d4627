r"""Sparse + low-rank layers (Yu et al., 2017) for Linear-like layers: ``W ~= A + B``.

``A`` is column-sparse (only ``s`` input features are used) and ``B`` has rank ``r``.

**Objective.**  With ``M = E[x x^T]`` the layer's input second moment (``M = I``
without calibration data, i.e. fit the weights),

    min_{A,B}  1/2 tr(R M R^T) + lam sum_j c_j ||A_{:,j}||_2 + mu ||B||_*,      R = W - A - B,

with ``c_j = sqrt(M_jj)`` (the RMS of input feature ``j``; 1 without data): the
``||.||_{2,1}`` group lasso weighted by each feature's scale, so that a column is not
preferred merely because its input is large.  The loss is the *linear* response
error ``||(W - A - B) X||_F^2 / (2N)``.  The paper fits the nonlinear responses
``r(W X)``; that would need the stored activations, not just their second moment, so
autorank fits the linear ones.

**ADMM** (:func:`admm_sparse_lowrank`), with copies ``C = A``, ``D = B`` and scaled
duals ``U_1, U_2``; every step has a closed form:

    D = [(W - Delta) M + rho (B - U_2)] (2M + rho I)^{-1},  Delta = (A - U_1) - (B - U_2)
    C = D + Delta
    A = group soft-threshold of the columns of C + U_1 at lam c_j / rho
    B = singular-value thresholding of D + U_2 at mu / rho
    U_1 += C - A,   U_2 += D - B.

**Hitting a target (s, r)** (:func:`sparse_lowrank_fit`), in three steps.

1. *ADMM path* (:func:`select_support`).  ``mu`` is a tenth of the geometric mean of
   the ``r``-th and ``(r+1)``-th singular values of the whitened ``W M^{1/2}`` (times
   ``sqrt(||M||_2)``): alone it would keep about rank ``r``; the factor leaves room for
   ``A`` (measured: with the full value ``B`` shrinks to 0 and the group lasso picks
   wrong columns; 0.1 recovered planted supports best).  ``lam`` follows a
   continuation path from ``lam_max = max_j ||((W - B_r) M)_{:,j}|| / c_j`` (``B_r``
   the best rank-``r`` fit; at ``lam_max`` ``A = 0``) down to ``lam_max / 100`` in
   ``STAGES`` geometric steps of ``ITERS_PER_STAGE`` warm-started iterations.  The
   path runs on the rescaled problem ``(W D, D^-1 M D^-1)``, ``D = diag(c)``: same
   supports, all ``c_j = 1``, and a nuclear norm of ``B D`` that does not change when
   an input feature is rescaled.  The support is the ``s`` columns of largest norm in
   ``A`` at the first stage with ``>= s`` active columns (or at the end, ranked by the
   norm in ``A``, then by the column norm of the gradient).
2. *Refinement* (:func:`refine_support`).  Convex group selection recovers a support
   only under incoherence, so the exact refit is alternated with re-choosing the
   ``s`` columns of largest single-column gain, keeping only improvements.
3. *Exact refit* (:func:`refit_sparse_lowrank`).  For a fixed support ``S`` the
   problem ``min tr(R M R^T)`` over ``A`` on ``S`` and rank-``r`` ``B`` has the closed form

       B = U_r U_r^T W,  U_r = top-r eigenvectors of W M' W^T,  M' = M - M_S M_SS^+ M_S^T,
       A_S = (W - B) M_S M_SS^+

   (``M_S`` the columns ``S`` of ``M``; for ``M = I``: ``B`` is the truncated SVD of
   ``W`` without the ``S`` columns and ``A_S = (W - B)[:, S]``).

The ADMM only selects the support; the reported error is that of the refitted
module.  Every step is deterministic and the path runs per rank, so ``realize``
rebuilds exactly the candidate's support.  Cost of the candidates: ``STAGES *
ITERS_PER_STAGE = 60`` singular-value thresholdings of ``W`` per rank on the grid,
plus a few refits (one eigendecomposition of an ``f x f`` matrix each) per candidate;
measured on one core, 28 s for the 23 candidates of a 300 x 784 layer, hence the
small rank grid (``rank_points``).

**Module** (:class:`SparseLowRankLinear`): ``y = A_S x[..., idx] + U (V x) + b`` with
the ``s`` kept column indices in an int64 *buffer* (not a parameter, not counted),
``A_S`` an ``f x s`` Linear, ``B = U V`` two Linears ``n -> r -> f``.

**Cost.**  Parameters ``f s + r (n + f)`` (+ ``f`` bias); MACs per row the same
(without the bias), times the output positions; the gather and the sums are free.

Candidates: ``columns`` in ``{0} + {n * max_column_fraction / 2^k, k < column_points}``
and ``rank`` on :func:`autorank.measures.rank_grid` with ``min(grid_points, rank_points)``
points (and ``rank = 0``, pure column selection, for ``columns > 0``).  Options
(``CurveConfig(options={"sparse_lowrank": {...}})``): ``max_column_fraction`` (float,
0.25, in (0, 1]), ``column_points`` (int, 3, >= 1), ``rank_points`` (int, 6, >= 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..config import CurveConfig
from ..graph import LayerInfo
from ..layers import LINEAR_KINDS, get_layer_handler
from ..linalg import gram_eigh, sym_eigh, sym_eigvalsh, weighted_gram
from ..measures import check_hyper, rank_grid, relative_errors
from ..modules import Factorized
from .base import CandidateColumns, Family, family_options, register_family, supports_kinds

__all__ = ["group_soft_threshold", "column_weights", "singular_value_threshold", "sparse_lowrank_objective",
           "ADMMResult", "admm_sparse_lowrank", "refit_sparse_lowrank", "select_support", "refine_support",
           "sparse_lowrank_fit", "sparse_lowrank_cost", "column_choices", "SparseLowRankLinear"]

DEFAULTS: dict[str, Any] = {"max_column_fraction": 0.25, "column_points": 3, "rank_points": 6}
STAGES = 6  # lam continuation stages, lam_max -> lam_max / 100
ITERS_PER_STAGE = 10
REFINE_ROUNDS = 3  # support refinement rounds (per start) after the ADMM path
MU_SCALE = 0.1  # mu = MU_SCALE * sqrt(sigma_r sigma_{r+1}) * sqrt(||M||_2)


def group_soft_threshold(x: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """Prox of ``sum_j tau_j ||x_j||`` over columns: column ``j`` scaled by ``max(0, 1 - tau_j / ||x_j||)``.

    ``tau``: a number or one threshold per column.
    """
    norms = x.norm(dim=0)
    return x * (1.0 - tau / norms.clamp_min(torch.finfo(x.dtype).tiny)).clamp_min(0.0)


def singular_value_threshold(x: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Prox of ``tau ||.||_*``: ``U max(S - tau, 0) V^T``; returns it and its (nonzero) singular values.

    Computed from the eigendecomposition of the smaller Gram matrix (``X = U S V^T``,
    ``X X^T = U S^2 U^T``, result ``U diag(max(1 - tau / s, 0)) U^T X``): about three
    times faster than an SVD, and exact up to rounding for every value kept.
    """
    if math.isinf(tau):
        return torch.zeros_like(x), torch.zeros(0, dtype=x.dtype)
    evals, vecs, left = gram_eigh(x, symmetrize=True, threads=True)
    s = evals.clamp_min(0).sqrt()
    scale = (1.0 - tau / s.clamp_min(torch.finfo(x.dtype).tiny)).clamp_min(0.0)
    keep = scale > 0
    vecs, scale, s = vecs[:, keep], scale[keep], s[keep]
    out = (vecs * scale) @ (vecs.T @ x) if left else (x @ vecs) * scale @ vecs.T
    return out, (s * scale).flip(0)


def _moment(n: int, moment: torch.Tensor | None) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64) if moment is None else moment.detach().to(torch.float64)


def column_weights(m: torch.Tensor) -> torch.Tensor:
    """``c_j = sqrt(M_jj)``, floored at ``1e-6`` of their mean (a feature the data never excites)."""
    c = m.diagonal().clamp_min(0).sqrt()
    return c.clamp_min(1e-6 * float(c.mean()) if float(c.mean()) > 0 else 1.0)


def sparse_lowrank_objective(weight: torch.Tensor, moment: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                             lam: float, mu: float) -> float:
    """``1/2 tr(R M R^T) + lam sum_j c_j ||A_j|| + mu ||B||_*``, ``R = W - A - B`` (``M = I`` when None)."""
    w = weight.detach().to(torch.float64)
    m = _moment(w.shape[1], moment)
    r = w - a - b
    val = 0.5 * float(((r @ m) * r).sum()) + lam * float((column_weights(m) * a.norm(dim=0)).sum())
    if mu > 0 and not math.isinf(mu):
        val += mu * float(torch.linalg.svdvals(b).sum())
    return val


@dataclass
class ADMMResult:
    """ADMM iterates ``a``, ``b`` (``f x n`` float64), the objective after every iteration, and the solver state."""

    a: torch.Tensor
    b: torch.Tensor
    objective: np.ndarray
    state: tuple[torch.Tensor, ...]


@torch.no_grad()
def admm_sparse_lowrank(weight: torch.Tensor, moment: torch.Tensor | None, lam: float, mu: float,
                        iters: int = 50, rho: float | None = None,
                        state: tuple[torch.Tensor, ...] | None = None) -> ADMMResult:
    """ADMM for ``min 1/2 tr(R M R^T) + lam sum_j c_j ||A_j|| + mu ||B||_*`` (see the module docstring).

    ``rho`` defaults to ``||M||_2``; ``mu = inf`` forces ``B = 0``.  ``state`` (from a
    previous result) warm-starts ``(A, B, U_1, U_2)``.
    """
    w = weight.detach().to(torch.float64)
    f, n = w.shape
    m = _moment(n, moment)
    evals, q = sym_eigh(m, symmetrize=True, threads=True)
    evals = evals.clamp_min(0.0)
    if rho is None:
        rho = float(evals[-1]) if float(evals[-1]) > 0 else 1.0
    inv = (q / (2.0 * evals + rho)) @ q.T  # (2M + rho I)^{-1}
    if state is None:
        a, b, u1, u2 = (torch.zeros_like(w) for _ in range(4))
    else:
        a, b, u1, u2 = (t.clone() for t in state)
    wm = w @ m
    cw = column_weights(m)
    hist = []
    for _ in range(iters):
        delta = (a - u1) - (b - u2)
        d = (wm - delta @ m + rho * (b - u2)) @ inv
        c = d + delta
        a = group_soft_threshold(c + u1, lam * cw / rho)
        b, s = singular_value_threshold(d + u2, mu / rho)
        u1 += c - a
        u2 += d - b
        r = w - a - b
        obj = 0.5 * float(((r @ m) * r).sum()) + lam * float((cw * a.norm(dim=0)).sum())
        if len(s):
            obj += mu * float(s.sum())
        hist.append(obj)
    return ADMMResult(a=a, b=b, objective=np.asarray(hist), state=(a, b, u1, u2))


def _whitened_projector(w: torch.Tensor, m: torch.Tensor, rank: int) -> torch.Tensor:
    """``U_r`` (``f x r``): top eigenvectors of ``W M W^T`` (the optimal rank-r ``B = U_r U_r^T W`` under weight ``M``)."""
    _, u = sym_eigh(weighted_gram(w, m), symmetrize=True, threads=True)
    return u[:, -rank:].flip(-1) if rank else u[:, :0]


@torch.no_grad()
def refit_sparse_lowrank(weight: torch.Tensor, moment: torch.Tensor | None, support: Sequence[int],
                         rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The optimal ``A`` on the columns ``support`` and rank-``rank`` ``B`` for ``tr(R M R^T)`` (closed form).

    Returns ``(A_S, U, V)`` in float64 with ``A_S`` ``f x s``, ``B = U V``, ``U`` ``f x r``, ``V`` ``r x n``.
    """
    w = weight.detach().to(torch.float64)
    f, n = w.shape
    m = _moment(n, moment)
    idx = torch.as_tensor(list(support), dtype=torch.long)
    if len(idx):
        m_s = m[:, idx]
        pinv = torch.linalg.pinv(m_s[idx], hermitian=True)
        m_rest = m - m_s @ pinv @ m_s.T
    else:
        m_rest = m
    u = _whitened_projector(w, m_rest, rank)
    v = u.T @ w
    a_s = (w - u @ v) @ m_s @ pinv if len(idx) else w.new_zeros(f, 0)
    return a_s, u, v


def select_support(weight: torch.Tensor, moment: torch.Tensor | None, rank: int,
                   columns: Sequence[int]) -> dict[int, list[int]]:
    """The support (sorted column indices) for every target number of ``columns``, by the ADMM path at ``rank``."""
    w = weight.detach().to(torch.float64)
    f, n = w.shape
    targets = sorted({int(s) for s in columns if s > 0})
    out: dict[int, list[int]] = {0: []} if 0 in columns else {}
    if not targets:
        return out
    if max(targets) >= n:
        full = list(range(n))
        out.update({s: full for s in targets if s >= n})
        targets = [s for s in targets if s < n]
        if not targets:
            return out
    # run the path on the rescaled problem (W D, D^-1 M D^-1), D = diag(c): same supports, and the
    # nuclear norm of B D does not change when an input feature is rescaled
    c = column_weights(_moment(n, moment))
    w = w * c
    m = _moment(n, moment) / c[:, None] / c[None, :]
    moment = None if moment is None else m
    norm_m = float(sym_eigvalsh(m, symmetrize=True, threads=True)[-1])
    sig = sym_eigvalsh(weighted_gram(w, m), symmetrize=True, threads=True).flip(0).clamp_min(0).sqrt()
    if rank == 0:
        mu = math.inf
        b_r = torch.zeros_like(w)
    else:
        nxt = float(sig[rank]) if rank < len(sig) else 0.0
        mu = MU_SCALE * math.sqrt(float(sig[rank - 1]) * nxt) * math.sqrt(max(norm_m, 0.0))
        u = _whitened_projector(w, m, rank)
        b_r = u @ (u.T @ w)
    lam_max = float((((w - b_r) @ m).norm(dim=0) / column_weights(m)).max())
    if lam_max <= 0:  # W is (weighted) rank <= r already: any support is exact
        lam_max = 1.0
    state = None
    pending = list(targets)
    res = None
    for stage in range(STAGES):
        lam = lam_max * 0.01 ** (stage / (STAGES - 1))
        res = admm_sparse_lowrank(w, moment, lam, mu, ITERS_PER_STAGE, state=state)
        state = res.state
        norms = res.a.norm(dim=0)
        active = int((norms > 0).sum())
        while pending and pending[0] <= active:
            s = pending.pop(0)
            out[s] = sorted(torch.argsort(norms, descending=True, stable=True)[:s].tolist())
        if not pending:
            break
    if pending:  # never enough active columns: rank by |A| then by the gradient's column norm
        grad = ((w - res.a - res.b) @ m).norm(dim=0).numpy()
        order = np.lexsort((-grad, -res.a.norm(dim=0).numpy()))
        for s in pending:
            out[s] = sorted(order[:s].tolist())
    return out


def _residual_loss(w: torch.Tensor, m: torch.Tensor, support: Sequence[int], fit) -> float:
    a_s, u, v = fit
    r = w - u @ v
    if len(support):
        r[:, list(support)] -= a_s
    return float(((r @ m) * r).sum())


@torch.no_grad()
def refine_support(weight: torch.Tensor, moment: torch.Tensor | None, support: Sequence[int], rank: int,
                   rounds: int = REFINE_ROUNDS) -> tuple[list[int], tuple[torch.Tensor, ...]]:
    """Improve a support by alternating the exact refit with a re-selection of the columns.

    With ``B`` fixed, the loss decrease of giving column ``j`` its own free ``A_j`` is
    ``||((W - B) M)_{:,j}||^2 / M_jj``; the ``s`` best columns form the next support, which
    is kept only if its refit lowers ``tr(R M R^T)`` (so the loss never increases; for
    ``M = I`` every round is an exact block minimisation).  It runs from ``support`` and
    from the ``s`` columns of largest gain over the best rank-``r`` fit alone, and keeps
    the better.  Returns the support and its refit ``(A_S, U, V)``.
    """
    w = weight.detach().to(torch.float64)
    m = _moment(w.shape[1], moment)
    best = sorted(int(j) for j in support)
    fit = refit_sparse_lowrank(w, moment, best, rank)
    s = len(best)
    if s == 0 or s >= w.shape[1]:
        return best, fit
    diag = m.diagonal().clamp_min(torch.finfo(torch.float64).tiny)
    # second start: the s columns of largest gain over the best rank-r fit alone
    u0 = _whitened_projector(w, m, rank)
    gain0 = ((w - u0 @ (u0.T @ w)) @ m).pow(2).sum(0) / diag
    starts = [best, sorted(torch.argsort(gain0, descending=True, stable=True)[:s].tolist())]
    results = [_refine_from(w, m, moment, start, rank, rounds, diag) for start in starts]
    return min(results, key=lambda t: t[2])[:2]


def _refine_from(w: torch.Tensor, m: torch.Tensor, moment: torch.Tensor | None, support: list[int], rank: int,
                 rounds: int, diag: torch.Tensor) -> tuple[list[int], tuple[torch.Tensor, ...], float]:
    best = list(support)
    s = len(best)
    fit = refit_sparse_lowrank(w, moment, best, rank)
    loss = _residual_loss(w, m, best, fit)
    for _ in range(rounds):
        _, u, v = fit
        gain = ((w - u @ v) @ m).pow(2).sum(0) / diag
        cand = sorted(torch.argsort(gain, descending=True, stable=True)[:s].tolist())
        if cand == best:
            break
        cfit = refit_sparse_lowrank(w, moment, cand, rank)
        closs = _residual_loss(w, m, cand, cfit)
        if not closs < loss * (1 - 1e-12):
            break
        best, fit, loss = cand, cfit, closs
    return best, fit, loss


def sparse_lowrank_fit(weight: torch.Tensor, moment: torch.Tensor | None, columns: int,
                       rank: int) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support by the ADMM path, refined by :func:`refine_support`; ``(support, A_S, U, V)`` (float64)."""
    support = select_support(weight, moment, rank, [columns])[columns]
    support, fit = refine_support(weight, moment, support, rank)
    return (support, *fit)


def _approx(f: int, n: int, support: Sequence[int], a_s: torch.Tensor, u: torch.Tensor,
            v: torch.Tensor) -> torch.Tensor:
    out = u @ v if u.shape[1] else torch.zeros(f, n, dtype=a_s.dtype)
    if len(support):
        out[:, list(support)] += a_s
    return out


class SparseLowRankLinear(Factorized, nn.Module):
    """``y = A_S x[..., idx] + U (V x) + bias`` on inputs ``(..., n)``.

    ``index``: int64 buffer of the ``columns`` kept input features; ``sparse``: Linear
    ``columns -> f`` (None when ``columns = 0``); ``low_in`` / ``low_out``: Linears
    ``n -> rank -> f`` (None when ``rank = 0``).
    """

    def __init__(self, in_features: int, out_features: int, columns: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not 0 <= columns <= in_features or not 0 <= rank <= min(in_features, out_features):
            raise ValueError(f"SparseLowRankLinear: columns={columns} must be in [0, {in_features}] and "
                             f"rank={rank} in [0, {min(in_features, out_features)}]")
        if columns == 0 and rank == 0:
            raise ValueError("SparseLowRankLinear: columns and rank cannot both be 0")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.columns, self.rank = in_features, out_features, columns, rank
        self.register_buffer("index", torch.arange(columns, device=device, dtype=torch.int64))
        self.sparse = nn.Linear(columns, out_features, bias=False, **kw) if columns else None
        self.low_in = nn.Linear(in_features, rank, bias=False, **kw) if rank else None
        self.low_out = nn.Linear(rank, out_features, bias=False, **kw) if rank else None
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        if self.sparse is not None:
            y = self.sparse(x.index_select(-1, self.index))
        if self.low_in is not None:
            z = self.low_out(self.low_in(x))
            y = z if y is None else y + z
        return y + self.bias if self.bias is not None else y

    @classmethod
    def from_dense(cls, layer: nn.Module, columns: int, rank: int,
                   moment: torch.Tensor | None = None) -> "SparseLowRankLinear":
        """Fit ``layer`` (Linear-like) at ``(columns, rank)``; ``moment`` makes the fit data-aware."""
        w = get_layer_handler(layer).weight_matrix(layer)
        f, n = w.shape
        support, a_s, u, v = sparse_lowrank_fit(w, moment, columns, rank)
        bias = getattr(layer, "bias", None)
        new = cls(n, f, columns, rank, bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.index.copy_(torch.as_tensor(support, dtype=torch.int64))
            if columns:
                new.sparse.weight.copy_(a_s.to(w.dtype))
            if rank:
                new.low_in.weight.copy_(v.to(w.dtype))
                new.low_out.weight.copy_(u.to(w.dtype))
            if bias is not None:
                new.bias.copy_(bias.detach().reshape(-1))
        return new

    def weight_matrix(self) -> torch.Tensor:
        """``A + B`` as an ``f x n`` matrix."""
        ref = self.bias if self.bias is not None else next(self.parameters())
        w = torch.zeros(self.out_features, self.in_features, device=ref.device, dtype=ref.dtype)
        if self.low_in is not None:
            w = w + self.low_out.weight @ self.low_in.weight
        if self.sparse is not None:
            w = w.index_add(1, self.index, self.sparse.weight)
        return w

    def output_bias(self) -> torch.Tensor | None:
        """The bias added to the output (None without one)."""
        return self.bias

    def to_dense(self) -> nn.Linear:
        """The exactly equivalent ``nn.Linear``."""
        w = self.weight_matrix()
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, columns={self.columns}, rank={self.rank}"


def sparse_lowrank_cost(f: int, n: int, columns: int, rank: int) -> int:
    """Weights (and MACs per row) ``f s + r (n + f)``, without the bias."""
    return f * columns + rank * (n + f)


def column_choices(n: int, max_fraction: float, points: int) -> list[int]:
    """``0`` and ``round(n * max_fraction / 2^k)`` for ``k < points`` (each ``>= 1``, distinct)."""
    return sorted({0} | {max(1, min(n, round(n * max_fraction / 2 ** k))) for k in range(points)})


def _options(config: CurveConfig) -> dict[str, Any]:
    opts = family_options(config, "sparse_lowrank", DEFAULTS)
    if not 0.0 < opts["max_column_fraction"] <= 1.0:
        raise ValueError("CurveConfig.options['sparse_lowrank']['max_column_fraction'] must be in (0, 1], "
                         f"got {opts['max_column_fraction']!r}")
    if opts["column_points"] < 1:
        raise ValueError("CurveConfig.options['sparse_lowrank']['column_points'] must be >= 1, "
                         f"got {opts['column_points']!r}")
    if opts["rank_points"] < 2:
        raise ValueError("CurveConfig.options['sparse_lowrank']['rank_points'] must be >= 2, "
                         f"got {opts['rank_points']!r}")
    return opts


def _candidates(module: nn.Module, info: LayerInfo, config: CurveConfig,
                moment: torch.Tensor | None = None) -> CandidateColumns:
    opts = _options(config)
    w = get_layer_handler(module).weight_matrix(module).detach().to(torch.float64)
    f, n = w.shape
    bias = f if info.has_bias else 0
    cols = column_choices(n, opts["max_column_fraction"], opts["column_points"])
    ranks = [0, *rank_grid(min(f, n), min(config.grid_points, opts["rank_points"])).tolist()]
    ss, rs, approx, params = [], [], [], []
    for r in ranks:
        wanted = [s for s in cols if (s, r) != (0, 0)
                  and (sparse_lowrank_cost(f, n, s, r) + bias < info.dense_params
                       or sparse_lowrank_cost(f, n, s, r) * info.positions < info.dense_flops)]
        if not wanted:
            continue
        supports = select_support(w, moment, r, wanted)
        for s in wanted:
            support, (a_s, u, v) = refine_support(w, moment, supports[s], r)
            ss.append(s)
            rs.append(r)
            approx.append(_approx(f, n, support, a_s, u, v))
            params.append(sparse_lowrank_cost(f, n, s, r))
    error = relative_errors(w, approx, moment) if approx else np.zeros(0)
    weights = np.asarray(params, np.int64)
    return CandidateColumns(hyper={"rank": np.asarray(rs, np.int64), "columns": np.asarray(ss, np.int64)},
                            error=error, error_lower=error.copy(), params=weights + bias,
                            flops=weights * info.positions)


def build(module: nn.Module, hyper: dict[str, Any], moment: torch.Tensor | None = None,
          init: bool = True) -> SparseLowRankLinear:
    """The :class:`SparseLowRankLinear` for ``module`` at ``hyper = {"rank": r, "columns": s}``."""
    h = check_hyper("sparse_lowrank", hyper, ("rank", "columns"), low=0)
    handler = get_layer_handler(module)
    if handler is None or handler.kind not in LINEAR_KINDS:
        raise TypeError(f"sparse_lowrank cannot factorise a {type(module).__name__}")
    f, n, _ = handler.geometry(module)
    r, s = h["rank"], h["columns"]
    if r > min(f, n):
        raise ValueError(f"sparse_lowrank: rank={r} exceeds the largest rank {min(f, n)} of a {f}x{n} layer")
    if s > n:
        raise ValueError(f"sparse_lowrank: columns={s} exceeds the {n} input features")
    if r == 0 and s == 0:
        raise ValueError("sparse_lowrank: rank=0 and columns=0 leave nothing; at least one must be >= 1")
    if init:
        return SparseLowRankLinear.from_dense(module, s, r, moment)
    w = handler.weight_matrix(module)
    return SparseLowRankLinear(n, f, s, r, getattr(module, "bias", None) is not None,
                               device=w.device, dtype=w.dtype)


SPARSE_LOWRANK = register_family(
    Family.from_build(
        "sparse_lowrank", supports_kinds(LINEAR_KINDS), _candidates, build,
        description="column-sparse + low-rank (Yu et al. 2017), ADMM support selection and exact refit",
        fits_data=True,
    )
)
