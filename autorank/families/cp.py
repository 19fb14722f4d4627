r"""CP (canonical polyadic) decomposition of a 2-D convolution (Lebedev et al., 2015).

**Maths.**  The kernel ``W`` (``f x c x kh x kw``) is approximated by ``R`` rank-one terms,

    W_hat[f, c, y, x] = sum_r K_f[f, r] K_c[c, r] K_y[y, r] K_x[x, r].

The fit is ill-posed (the best rank-``R`` approximation need not exist, and ALS finds
a local optimum), so the error reported for a candidate is *measured* on the kernel
of the layer that is built (:func:`autorank.measures.relative_errors`).

**Fit** (:func:`cp_factors`), in float64 by alternating least squares (:func:`cp_als`):

1. compress the two channel modes to ``min(f, R)`` and ``min(c, R)`` by their leading
   singular vectors (HOSVD, as in CANDELINC / Tensorlab): any rank-``R`` CP lies in a
   subspace of that size, and this makes each ALS sweep cost ``O(R^4 kh kw)`` instead
   of ``O(R f c kh kw)``;
2. ALS on the compressed core from tensorly's ``"svd"`` initialisation (computed here:
   leading left singular vectors of each unfolding, the first scaled by the singular
   values, missing columns uniform from ``RandomState(seed)``), at most ``n_iter_max``
   sweeps, stopping when the relative error changes by less than ``tol``;
3. expand the channel factors back and balance the four factors' column norms.

The number of sweeps actually run is part of the hyperparameters (``iters``), and the
layer is rebuilt with exactly that many sweeps and no tolerance, so realising a
candidate reproduces the fitted factors bit for bit.  The iteration is tensorly's
``parafac`` (``solver="tensorly"`` runs that instead, and the tests check that the two
agree), in torch: on these small cores tensorly's backend dispatch cost ten times the
arithmetic.  With tensorly, its global backend is never changed (the numpy backend is
set for the calling thread only, if needed).

**Layer.**  A 1x1 conv ``c -> R`` (``K_c^T``, no bias), a depthwise ``kh x 1`` conv
(``K_y``, ``groups=R``) with the vertical stride, padding and dilation, a depthwise
``1 x kw`` conv (``K_x``) with the horizontal ones, and a 1x1 conv ``R -> f`` (``K_f``)
with the bias.

**Cost.**  Parameters ``R (c + kh + kw + f)`` (+ ``f`` bias).  Multiply-accumulates per
call on an ``N x c x H x W`` input with output ``Ho x Wo``:

    c*R * N*H*W  +  R*kh * N*Ho*W  +  R*kw * N*Ho*Wo  +  f*R * N*Ho*Wo

**Candidates.**  ``R`` on :func:`autorank.measures.rank_grid` up to
``min(max_rank, (f*c*kh*kw) / max(f, c, kh, kw))`` (the latter bounds any CP rank);
ranks whose fit fails or is not finite are left out (logged at debug level).

Options (``CurveConfig(options={"cp": {...}})``):

* ``max_rank`` (int, default 48): the largest rank tried.  One ALS sweep costs
  ``O(R^4 kh kw)``: on a 512x512x3x3 layer (one thread, a busy machine) a 100-sweep fit
  at rank 48 takes 0.10-0.17 s (tensorly's ``parafac``: 1.3-2.2 s).
* ``n_iter_max`` (int, default 100): most ALS sweeps per rank.
* ``tol`` (float, default 1e-7): stop when the relative reconstruction error of the
  core changes by less (0 disables).
* ``solver`` (str, default ``"als"``): :func:`cp_als`, or ``"tensorly"`` for tensorly's
  ``parafac`` (the ``decomp`` extra), the same iteration at many times the cost.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from .._util import require
from ..config import CurveConfig
from ..graph import LayerInfo
from ..measures import check_hyper, rank_grid, relative_errors
from ..modules import Factorized
from .base import CandidateColumns, Family, family_options, register_family
from .conv import (Conv2dGeometry, as_pair, call_flops, channel_spectra, dense_conv, require_geometry,
                   supports_multi_tap_conv, top_eigen)

__all__ = ["CPFactors", "cp_rank_limit", "cp_als", "cp_factors", "cp_chain", "cp_errors", "cp_weight", "cp_cost", "CPConv",
           "CP"]

log = logging.getLogger(__name__)

NAME = "cp"
# warm_iters > 0 (a warm-started chain across ranks) is faster, but measured worse than cold fits at the
# largest ranks of a 12x10x3x3 kernel (0.808 against 0.741 at rank 12, tests/test_families_conv.py): opt-in
DEFAULTS: dict[str, Any] = {"max_rank": 48, "n_iter_max": 100, "tol": 1e-7, "warm_iters": 0, "solver": "als"}
SOLVERS = ("als", "tensorly")
SEED = 0  # random_state of every fit (only the initial columns beyond a mode's size are random)


# ---- maths ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CPFactors:
    """Rank-``R`` CP factors of a conv kernel (float64): ``out`` ``f x R``, ``inp`` ``c x R``,
    ``vertical`` ``kh x R``, ``horizontal`` ``kw x R``; ``iters``: ALS sweeps run."""

    out: torch.Tensor
    inp: torch.Tensor
    vertical: torch.Tensor
    horizontal: torch.Tensor
    iters: int
    compressed: tuple[np.ndarray, ...] | None = field(default=None, repr=False, compare=False)
    """the ALS factors in the compressed channel bases (weights folded into the first), for a warm start"""

    @property
    def rank(self) -> int:
        return self.out.shape[1]


def cp_rank_limit(shape: Sequence[int]) -> int:
    """An upper bound on the CP rank of a tensor of ``shape``: the product of all sizes but the largest."""
    return int(np.prod(shape)) // max(shape)


@contextlib.contextmanager
def _numpy_backend() -> Iterator[None]:
    """tensorly's numpy backend for this thread only; the global (and other threads') backend is untouched."""
    tl = require("tensorly", f'CurveConfig(options={{"{NAME}": {{"solver": "tensorly"}}}})')

    old = tl.get_backend()
    if old == "numpy":
        yield
        return
    tl.set_backend("numpy", local_threadsafe=True)
    try:
        yield
    finally:
        tl.set_backend(old, local_threadsafe=True)


def _bases(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The full HOSVD bases ``(U_out, U_in)`` of the output- and input-channel unfoldings (memoised)."""
    spectra = channel_spectra(weight)
    return spectra[3], spectra[1]


def _svd_init(core: np.ndarray, rank: int, seed: int) -> list[np.ndarray]:
    """tensorly's ``init="svd"`` for ``parafac``, without its warnings for modes smaller than ``rank``."""
    rng = np.random.RandomState(seed)
    factors = []
    for mode in range(core.ndim):
        unfolding = np.moveaxis(core, mode, 0).reshape(core.shape[mode], -1)
        u, s, _ = np.linalg.svd(unfolding, full_matrices=False)
        k = min(rank, len(s))
        u = u[:, :k] * s[:k] if mode == 0 else u[:, :k]
        if u.shape[1] < rank:
            u = np.concatenate([u, rng.random_sample((u.shape[0], rank - u.shape[1]))], axis=1)
        factors.append(u)
    return factors


def cp_als(tensor: torch.Tensor, factors: Sequence[torch.Tensor], n_iter_max: int,
           tol: float) -> tuple[list[torch.Tensor], list[float]]:
    r"""Alternating least squares for a CP model of ``tensor`` from ``factors``: ``(factors, errors)``, float64.

    One sweep updates every mode ``n`` in turn by the normal equations of its least-squares problem,

        F_n <- M_n V_n^{-1},   V_n = *_{j != n} F_j^T F_j  (Hadamard product, R x R),
        M_n = T_(n) (F_1 (.) ... (.) F_N, without F_n)    (the MTTKRP, I_n x R; (.) the Khatri-Rao product),

    then records the relative error ``||T - T_hat||_F / ||T||_F`` from the last mode's MTTKRP,
    ``||T - T_hat||^2 = ||T||^2 - 2 <M_N, F_N> + 1^T (V_N * F_N^T F_N) 1``, with no tensor rebuilt.
    It stops after ``n_iter_max`` sweeps, or once two consecutive errors differ by less than ``tol``
    (``0``: never); ``len(errors)`` is the number of sweeps run.  The same iteration, start and
    stopping rule as tensorly's ``parafac`` (``normalize_factors=False``, no line search; the
    tests check the two agree), written out in torch: tensorly's backend dispatch costs more than
    the arithmetic on the small compressed cores of a conv kernel, and torch ops keep to the one
    thread that :func:`autorank._util.parallel_map` gives each worker (numpy's BLAS threads do not,
    and slow down many times over beside another busy process).
    """
    t = torch.as_tensor(tensor, dtype=torch.float64)
    f = [torch.as_tensor(a, dtype=torch.float64).clone() for a in factors]
    order, rank = t.dim(), f[0].shape[1]
    unfolded = [t.movedim(n, 0).reshape(t.shape[n], -1) for n in range(order)]  # T_(n), other modes in order
    norm2 = float((t * t).sum())
    norm = math.sqrt(norm2)
    grams = [a.T @ a for a in f]
    errors: list[float] = []
    v = m = grams[0]
    for it in range(n_iter_max):
        for n in range(order):
            v = torch.ones(rank, rank, dtype=t.dtype)
            kr = torch.ones(1, rank, dtype=t.dtype)
            for j in range(order):
                if j != n:  # the Khatri-Rao product, rows in the order of T_(n)'s columns
                    v = v * grams[j]
                    kr = (kr[:, None, :] * f[j][None, :, :]).reshape(-1, rank)
            m = unfolded[n] @ kr
            f[n] = torch.linalg.solve(v, m.T).T
            grams[n] = f[n].T @ f[n]
        inner = float((m * f[-1]).sum())
        model2 = float((v * grams[-1]).sum())
        errors.append(math.sqrt(abs(norm2 - 2 * inner + model2)) / norm if norm > 0 else 0.0)
        if tol and it >= 1 and abs(errors[-2] - errors[-1]) < tol:
            break
    return f, errors


@torch.no_grad()
def cp_factors(weight: torch.Tensor, rank: int, n_iter_max: int = 100, tol: float = 1e-7,
               seed: int = SEED, bases: tuple[torch.Tensor, torch.Tensor] | None = None,
               warm: CPFactors | None = None, solver: str = "als") -> CPFactors:
    """Rank-``rank`` CP factors of a conv kernel ``weight`` (``f x c x kh x kw``), see the module docstring.

    ``bases``: the full :func:`autorank.families.conv.leading_left` bases of the output- and
    input-channel unfoldings (shared by every rank of a layer).  ``warm``: a fit of a lower
    rank of the same kernel to start from (its components, zero-padded to the larger
    compressed bases, which are nested, then the ``svd`` initialisation's columns beyond its
    rank).  ``solver``: ``"als"`` (:func:`cp_als`) or ``"tensorly"`` (its ``parafac``, the same
    iteration; needs the ``decomp`` extra).  Raises ValueError for a bad rank or solver and
    FloatingPointError when the fit is not finite.
    """
    if solver not in SOLVERS:
        raise ValueError(f"{NAME}: solver={solver!r} is not one of {SOLVERS}")
    f, c, kh, kw = weight.shape
    top = cp_rank_limit(weight.shape)
    if not 1 <= rank <= top:
        raise ValueError(f"{NAME}: rank={rank} must be in [1, {top}] for a {tuple(weight.shape)} kernel")
    w = weight.detach().to(torch.float64)
    if bases is None:
        bases = _bases(w)
    u_out, u_in = bases[0][:, :min(f, rank)], bases[1][:, :min(c, rank)]
    core = torch.einsum("fcyx,fa,cb->abyx", w, u_out, u_in).cpu().numpy()
    with np.errstate(all="ignore"):
        start = _svd_init(core, rank, seed)
        if warm is not None and warm.compressed is not None and warm.rank < rank:
            start = [np.concatenate([np.pad(p, ((0, a.shape[0] - p.shape[0]), (0, 0))), a[:, p.shape[1]:]], axis=1)
                     for p, a in zip(warm.compressed, start)]
        if solver == "als":
            fitted, errors = cp_als(torch.from_numpy(core), [torch.from_numpy(a) for a in start], n_iter_max, tol)
            factors = [a.numpy() for a in fitted]
        else:
            require("tensorly", f'CurveConfig(options={{"{NAME}": {{"solver": "tensorly"}}}})')
            from tensorly.cp_tensor import CPTensor
            from tensorly.decomposition import parafac

            with _numpy_backend():
                (weights, factors), errors = parafac(core, rank, n_iter_max=n_iter_max,
                                                     init=CPTensor((np.ones(rank), start)), tol=tol,
                                                     random_state=seed, return_errors=True)
            factors = [np.asarray(a, dtype=np.float64) for a in factors]
            factors[0] = factors[0] * np.asarray(weights, dtype=np.float64)[None, :]
    if not all(np.all(np.isfinite(a)) for a in factors):
        raise FloatingPointError(f"{NAME}: the rank-{rank} ALS fit is not finite")
    compressed = tuple(a.copy() for a in factors)
    # balance: every factor's columns get the same norm, the geometric mean of the four
    norms = np.stack([np.linalg.norm(a, axis=0) for a in factors])  # (4, R)
    scale = np.prod(norms, axis=0) ** 0.25
    factors = [a * np.where(n > 0, scale / np.where(n > 0, n, 1.0), 1.0) for a, n in zip(factors, norms)]

    def as_t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(w.device)

    return CPFactors(out=u_out @ as_t(factors[0]), inp=u_in @ as_t(factors[1]), vertical=as_t(factors[2]),
                     horizontal=as_t(factors[3]), iters=len(errors), compressed=compressed)


def cp_chain(weight: torch.Tensor, ranks: Sequence[int], first_iters: int, tol: float, warm_iters: int,
             bases: tuple[torch.Tensor, torch.Tensor] | None = None, solver: str = "als") -> list[CPFactors | None]:
    """Warm-started fits at ascending ``ranks``; ``None`` where a fit failed (then the next starts from the last good one).

    The first rank is fitted cold (at most ``first_iters`` sweeps, stopping at ``tol``), each
    later one from the previous fit with exactly ``warm_iters`` sweeps, so the whole chain is
    reproduced from ``(ranks, iters of the first fit, warm_iters)``.
    """
    w = weight.detach().to(torch.float64)
    if bases is None:
        bases = _bases(w)
    out: list[CPFactors | None] = []
    prev = None
    for i, r in enumerate(ranks):
        try:
            if prev is None:
                fac = cp_factors(w, int(r), first_iters, tol if i == 0 else 0.0, bases=bases, solver=solver) \
                    if i == 0 else cp_factors(w, int(r), warm_iters, 0.0, bases=bases, solver=solver)
            else:
                fac = cp_factors(w, int(r), warm_iters, 0.0, bases=bases, warm=prev, solver=solver)
        except (FloatingPointError, np.linalg.LinAlgError, ValueError) as exc:
            log.debug("cp: rank %d of a %s kernel skipped: %s", r, tuple(w.shape), exc)
            out.append(None)
            continue
        out.append(fac)
        prev = fac
    return out


@torch.no_grad()
def cp_errors(weight: torch.Tensor, fits: Sequence[CPFactors], bases: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    r"""``||W - W_hat||_2 / ||W||_2`` of each fit, without building the ``f x c*kh*kw`` residual.

    A fit lies in the compressed bases: ``W_hat = U_out[:, :p] D U_in[:, :q]^T`` along the two
    channel modes.  In the full bases ``W`` is its rotated core ``T`` (same norm) and only the
    block ``H_p = T[:p, :q*K]`` of the residual changes, to ``R = H_p - D``; with ``H = T[:, :q*K]``,

        E E^T = T T^T + [[R R^T - H_p H_p^T, -D H_r^T], [-H_r D^T, 0]],

    ``H_r`` the rows of ``H`` below ``p``; then ``lambda_max`` by :func:`top_eigen`.  ``O(f p q K)``
    per fit instead of ``O(f^2 c K)`` and an eigendecomposition.
    """
    w = weight.detach().to(torch.float64)
    f, c = w.shape[:2]
    u_out, u_in = bases
    t = torch.einsum("ack,cb->abk", (u_out.T @ w.reshape(f, -1)).reshape(f, c, -1), u_in)  # f x c x K
    taps = t.shape[2]
    gram = t.reshape(f, -1) @ t.reshape(f, -1).T
    norm2, _ = top_eigen(gram)
    errors = np.zeros(len(fits), dtype=np.float64)
    if norm2 <= 0.0:
        return errors
    start = None
    for i, fac in enumerate(fits):
        a, b, ky, kx = (torch.from_numpy(np.ascontiguousarray(x)).to(t) for x in fac.compressed)
        p, q = a.shape[0], b.shape[0]
        d = torch.einsum("ar,br,yr,xr->abyx", a, b, ky, kx).reshape(p, q * taps)
        h = t[:, :q].reshape(f, q * taps)
        hp, hr = h[:p], h[p:]
        res = hp - d
        e = gram.clone()
        e[:p, :p] += res @ res.T - hp @ hp.T
        cross = -(d @ hr.T)
        e[:p, p:] += cross
        e[p:, :p] += cross.T
        lam, start = top_eigen(e, start)
        errors[i] = np.sqrt(max(lam, 0.0) / norm2)
    return errors


def cp_weight(out: torch.Tensor, inp: torch.Tensor, vertical: torch.Tensor, horizontal: torch.Tensor) -> torch.Tensor:
    """The kernel ``sum_r K_f[:, r] o K_c[:, r] o K_y[:, r] o K_x[:, r]`` (``f x c x kh x kw``), float64."""
    d = torch.float64
    return torch.einsum("fr,cr,yr,xr->fcyx", out.to(d), inp.to(d), vertical.to(d), horizontal.to(d))


def cp_cost(rank: np.ndarray | int, geom: Conv2dGeometry) -> np.ndarray | int:
    """Weights ``R (c + kh + kw + f)`` (without the bias)."""
    kh, kw = geom.kernel
    return rank * (geom.in_channels + kh + kw + geom.out_channels)


# ---- module ---------------------------------------------------------------------------------


class CPConv(Factorized, nn.Sequential):
    """1x1 conv ``c -> R``, depthwise ``kh x 1`` and ``1 x kw`` convs, 1x1 conv ``R -> f`` (CP)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int], rank: int,
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, bias: bool = True, padding_mode: str = "zeros",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (as_pair(v) for v in (kernel_size, stride, padding, dilation))
        kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.add_module("first", nn.Conv2d(in_channels, rank, 1, bias=False, **kwargs))
        self.add_module("vertical", nn.Conv2d(rank, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0),
                                              dilation=(dh, 1), groups=rank, bias=False,
                                              padding_mode=padding_mode, **kwargs))
        self.add_module("horizontal", nn.Conv2d(rank, rank, (1, kw), stride=(1, sw), padding=(0, pw),
                                                dilation=(1, dw), groups=rank, bias=False,
                                                padding_mode=padding_mode, **kwargs))
        self.add_module("last", nn.Conv2d(rank, out_channels, 1, bias=bias, **kwargs))
        self.rank = rank
        self.geometry = Conv2dGeometry(in_channels, out_channels, (kh, kw), (sh, sw), (ph, pw), (dh, dw),
                                       padding_mode, bias)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, rank: int, n_iter_max: int = DEFAULTS["n_iter_max"],
                   tol: float = DEFAULTS["tol"], factors: CPFactors | None = None,
                   solver: str = DEFAULTS["solver"]) -> "CPConv":
        """Factorise ``conv`` by a rank-``rank`` CP fit (:func:`cp_factors`), or with the given ``factors``."""
        geom = require_geometry(NAME, conv)
        w = conv.weight
        new = cls(geom.in_channels, geom.out_channels, geom.kernel, rank, geom.stride, geom.padding,
                  geom.dilation, geom.bias, geom.padding_mode, device=w.device, dtype=w.dtype)
        fac = factors if factors is not None else cp_factors(w, rank, n_iter_max, tol, solver=solver)
        with torch.no_grad():
            new.first.weight.copy_(fac.inp.T.reshape(new.first.weight.shape).to(w.dtype))
            new.vertical.weight.copy_(fac.vertical.T.reshape(new.vertical.weight.shape).to(w.dtype))
            new.horizontal.weight.copy_(fac.horizontal.T.reshape(new.horizontal.weight.shape).to(w.dtype))
            new.last.weight.copy_(fac.out.reshape(new.last.weight.shape).to(w.dtype))
            if conv.bias is not None:
                new.last.bias.copy_(conv.bias)
        return new

    def to_dense(self) -> nn.Conv2d:
        """The ``nn.Conv2d`` (original geometry) with weight ``W_hat`` and the bias."""
        r = self.rank
        w = cp_weight(self.last.weight.detach().reshape(-1, r), self.first.weight.detach().reshape(r, -1).T,
                      self.vertical.weight.detach().reshape(r, -1).T, self.horizontal.weight.detach().reshape(r, -1).T)
        return dense_conv(self.geometry, w, self.last.bias, like=self.first.weight)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


# ---- family ---------------------------------------------------------------------------------


def _options(config: CurveConfig) -> dict[str, Any]:
    opts = family_options(config, NAME, DEFAULTS)
    if opts["warm_iters"] < 0:
        raise ValueError(f"CurveConfig.options['{NAME}']['warm_iters'] must be >= 0, got {opts['warm_iters']!r}")
    for key in ("max_rank", "n_iter_max"):
        if opts[key] < 1:
            raise ValueError(f"CurveConfig.options['{NAME}']['{key}'] must be >= 1, got {opts[key]!r}")
    if opts["solver"] not in SOLVERS:
        raise ValueError(f"CurveConfig.options['{NAME}']['solver'] must be one of {SOLVERS}, got {opts['solver']!r}")
    if not np.isfinite(opts["tol"]) or opts["tol"] < 0:
        raise ValueError(f"CurveConfig.options['{NAME}']['tol'] must be a finite number >= 0, got {opts['tol']!r}")
    return opts


def _check(module: nn.Module, hyper: dict[str, Any]) -> tuple[int, int | None]:
    """``(rank, iters or None)`` from ``hyper``; ``iters`` is optional."""
    rank = check_hyper(NAME, hyper, ("rank",))["rank"]
    top = cp_rank_limit(module.weight.shape)
    if rank > top:
        raise ValueError(f"{NAME}: hyperparameter rank={rank} exceeds {top}, a bound on the CP rank of a "
                         f"{tuple(module.weight.shape)} kernel")
    iters = check_hyper(NAME, hyper, ("iters",))["iters"] if "iters" in hyper else None
    return rank, iters


def _candidates(module: nn.Module, info: LayerInfo, config: CurveConfig,
                moment: torch.Tensor | None = None) -> CandidateColumns:
    geom = require_geometry(NAME, module)
    opts = _options(config)
    f, c, (kh, kw) = geom.out_channels, geom.in_channels, geom.kernel
    w = module.weight.detach()
    top = min(opts["max_rank"], cp_rank_limit(w.shape))
    grid = rank_grid(top, config.grid_points)

    def flops_of(rank: np.ndarray) -> np.ndarray:
        return call_flops(info, geom, lambda n, h, w_, ho, wo: rank * (c * n * h * w_ + kh * n * ho * w_
                                                                        + (kw + f) * n * ho * wo))

    params = np.asarray(cp_cost(grid, geom), dtype=np.int64) + (f if geom.bias else 0)
    grid = grid[(params < info.dense_params) | (flops_of(grid) < info.dense_flops)]  # the others are never kept
    bases = _bases(w)
    warm, solver = opts["warm_iters"], opts["solver"]
    if warm > 0:
        fits = cp_chain(w, grid, opts["n_iter_max"], opts["tol"], warm, bases, solver)
    else:
        fits = []
        for r in grid:
            try:
                fits.append(cp_factors(w, int(r), opts["n_iter_max"], opts["tol"], bases=bases, solver=solver))
            except (FloatingPointError, np.linalg.LinAlgError, ValueError) as exc:
                log.debug("cp: rank %d of a %s kernel skipped: %s", r, tuple(w.shape), exc)
                fits.append(None)
    ok = [i for i, fac in enumerate(fits) if fac is not None]
    good = [fits[i] for i in ok]
    rank = grid[ok].astype(np.int64)
    if moment is None:
        error = cp_errors(w, good, bases)
    else:  # data-aware: measured on the realised kernels (factors rounded to the layer's dtype)
        approx = (cp_weight(*(t.to(w.dtype) for t in (fac.out, fac.inp, fac.vertical, fac.horizontal)))
                  .reshape(f, -1) for fac in good)
        error = relative_errors(w.reshape(f, -1), approx, moment)
    first = fits[0].iters if warm > 0 and fits and fits[0] is not None else 0
    iters = (np.full(len(rank), first, np.int64) if warm > 0
             else np.asarray([fac.iters for fac in good], dtype=np.int64))
    hyper = {"rank": rank, "iters": iters}
    if solver != DEFAULTS["solver"]:
        hyper["tensorly"] = np.ones(len(rank), np.int64)  # build refits with the same solver
    if warm > 0:
        hyper.update(warm_iters=np.full(len(rank), warm, np.int64), chain_top=np.full(len(rank), top, np.int64),
                     chain_points=np.full(len(rank), config.grid_points, np.int64))
    params = np.asarray(cp_cost(rank, geom), dtype=np.int64) + (f if geom.bias else 0)
    return CandidateColumns(hyper=hyper, error=error, error_lower=error.copy(), params=params,
                            flops=flops_of(rank))


def build(module: nn.Module, hyper: dict[str, Any], moment: torch.Tensor | None = None,
          init: bool = True) -> CPConv:
    """The :class:`CPConv` of ``module`` at ``hyper = {"rank": R, "iters": n}``.

    With ``iters`` (as every candidate has) exactly ``n`` ALS sweeps are run, without a
    tolerance, reproducing the candidate's fit; without it, the default ``n_iter_max``
    and ``tol``.  ``init=False`` builds the structure only;
    ``moment`` is accepted for the family interface (the factors are fitted to the weights).
    """
    geom = require_geometry(NAME, module)
    rank, iters = _check(module, hyper)
    if not init:
        w = module.weight
        return CPConv(geom.in_channels, geom.out_channels, geom.kernel, rank, geom.stride, geom.padding,
                      geom.dilation, geom.bias, geom.padding_mode, device=w.device, dtype=w.dtype)
    solver = "tensorly" if hyper.get("tensorly") else "als"
    if iters is None:
        return CPConv.from_dense(module, rank, solver=solver)
    if "warm_iters" not in hyper:
        return CPConv.from_dense(module, rank, n_iter_max=iters, tol=0.0, solver=solver)
    chain = check_hyper(NAME, hyper, ("warm_iters", "chain_top", "chain_points"))
    ranks = rank_grid(chain["chain_top"], chain["chain_points"])
    if rank not in ranks:
        raise ValueError(f"{NAME}: hyperparameter rank={rank} is not on the warm-start chain "
                         f"rank_grid({chain['chain_top']}, {chain['chain_points']})")
    ranks = ranks[ranks <= rank]
    # the first fit ran `iters` sweeps (tol-stopped); rerun exactly that many, then the warm sweeps
    fits = cp_chain(module.weight, ranks, iters, 0.0, chain["warm_iters"], solver=solver)
    if fits[-1] is None:
        raise FloatingPointError(f"{NAME}: the rank-{rank} ALS fit is not finite")
    return CPConv.from_dense(module, rank, factors=fits[-1])


CP = register_family(
    Family.from_build(
        NAME, supports_multi_tap_conv, _candidates, build,
        description="CP: 1x1, depthwise kh x 1, depthwise 1 x kw, 1x1 conv (Lebedev 2015; ALS)",
    )
)
