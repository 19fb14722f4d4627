r"""Tucker-2 decomposition of a 2-D convolution (Kim et al., 2016).

**Maths.**  The kernel ``W`` (``f x c x kh x kw``) is approximated along its two
channel modes only,

    W_hat = G x_out U_out x_in U_in,     W_hat[f, c, y, x] = sum_{a,b} U_out[f, a] G[a, b, y, x] U_in[c, b],

with orthonormal ``U_in`` (``c x R3``), ``U_out`` (``f x R4``) and the core
``G = W x_out U_out^T x_in U_in^T`` (``R4 x R3 x kh x kw``).

* **HOSVD** (:func:`hosvd`): ``U_in`` / ``U_out`` are the leading left singular
  vectors of the input-channel unfolding ``W_(in)`` (``c x f*kh*kw``) and of the
  output-channel unfolding ``W_(out)`` (``f x c*kh*kw``).
* **HOOI** (:func:`hooi`): alternately replace ``U_in`` by the leading left singular
  vectors of ``(W x_out U_out^T)_(in)`` and ``U_out`` by those of
  ``(W x_in U_in^T)_(out)``; each step maximises ``||G||_F`` given the other factor,
  so the Frobenius error ``||W - W_hat||_F`` never increases.

Leading singular vectors come from the eigendecomposition of the (small,
``c x c`` or ``f x f``) Gram matrix of the unfolding, in float64.

**Layer.**  A 1x1 conv ``c -> R3`` (weight ``U_in^T``, no bias), a ``kh x kw`` conv
``R3 -> R4`` (weight ``G``) with the original stride, padding, dilation and
padding mode (no bias), and a 1x1 conv ``R4 -> f`` (weight ``U_out``) with the bias.
Padding commutes with the bias-free 1x1 conv, so the three compute exactly the conv
with weight ``W_hat``; ``R3 = c, R4 = f`` is exact.

**Cost.**  Parameters ``c*R3 + kh*kw*R3*R4 + f*R4`` (+ ``f`` bias).
Multiply-accumulates per call on an ``N x c x H x W`` input with output ``Ho x Wo``:

    c*R3 * N*H*W  +  kh*kw*R3*R4 * N*Ho*Wo  +  f*R4 * N*Ho*Wo

**Candidates.**  ``R3`` and ``R4`` each on :func:`autorank.measures.rank_grid` (up to
``c`` and ``f``), keeping the pairs whose relative ranks ``R3/c`` and ``R4/f`` are
within a factor of 2 of each other; errors are measured on the realised kernel by
:func:`autorank.measures.relative_errors` (the factors are fitted to the weights).
Hyperparameters ``{"rank_in": R3, "rank_out": R4, "hooi_iters": n}``.

Options (``CurveConfig(options={"tucker2": {...}})``):

* ``hooi_iters`` (int, default 2): HOOI sweeps after the HOSVD; 0 is plain HOSVD.
* ``ranks`` (str, default ``"grid"``): ``"grid"`` (the pairs above), ``"vbmf"`` (only
  the pair of :func:`autorank.vbmf.evbmf_rank` on the two channel unfoldings, clipped
  to ``>= 1``, as in Kim et al.) or ``"grid+vbmf"`` (both).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..config import CurveConfig
from ..graph import LayerInfo
from ..linalg import FAST_EIGH_SIZE
from ..measures import check_hyper, rank_grid, relative_errors
from ..modules import Factorized
from ..vbmf import evbmf_rank
from .base import CandidateColumns, Family, family_options, register_family
from .conv import (Conv2dGeometry, as_pair, call_flops, channel_spectra, dense_conv, leading_left,
                   require_geometry, supports_multi_tap_conv, top_eigen, top_gram_eigen, unfold_in, unfold_out)

__all__ = ["hosvd", "hooi", "tucker2_core", "tucker2_factors", "tucker2_weight", "tucker2_cost",
           "tucker2_rankas_pairs", "hosvd_spectra", "tucker2_hosvd_errors", "tucker2_hosvd_frobenius",
           "tucker2_error_lower", "vbmf_ranks", "fit", "Tucker2Conv", "TUCKER2"]
NAME = "tucker2"
DEFAULTS: dict[str, Any] = {"hooi_iters": 2, "ranks": "grid"}
RANK_CHOICES = ("grid", "vbmf", "grid+vbmf")


# ---- maths ----------------------------------------------------------------------------------


def hosvd(weight: torch.Tensor, rank_in: int, rank_out: int,
          bases: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HOSVD factors ``(U_in, U_out)`` (``c x R3``, ``f x R4``) of a conv kernel.

    ``bases``: the full :func:`leading_left` bases of ``W_(in)`` and ``W_(out)`` (shared
    by every rank pair of a layer).
    """
    if bases is None:
        spectra = channel_spectra(weight)
        bases = (spectra[1], spectra[3])
    return bases[0][:, :rank_in], bases[1][:, :rank_out]


def hooi(weight: torch.Tensor, u_in: torch.Tensor, u_out: torch.Tensor,
         iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``iters`` HOOI sweeps from ``(U_in, U_out)``: first ``U_in`` given ``U_out``, then ``U_out`` given ``U_in``.

    Kernels with ``FAST_EIGH_SIZE`` or more channels on a side sweep in float32 (the factors
    become float32 weights, and :func:`fit` measures HOOI's error in float64 against the
    HOSVD's, keeping the better): 0.57 s -> 0.3 s on a 512 x 512 x 3 x 3 kernel.  Returns float64.
    """
    f, c = weight.shape[:2]
    fast = max(f, c) >= FAST_EIGH_SIZE
    dt = torch.float32 if fast else torch.float64
    w = weight.detach().to(dt)
    r3, r4 = u_in.shape[1], u_out.shape[1]
    u_in, u_out = u_in.to(dt), u_out.to(dt)
    for _ in range(iters):
        part = torch.einsum("fcyx,fa->cayx", w, u_out).reshape(c, -1)  # (W x_out U_out^T)_(in)
        u_in = leading_left(part, r3, fast).to(dt)
        part = torch.einsum("fcyx,cb->fbyx", w, u_in).reshape(f, -1)  # (W x_in U_in^T)_(out)
        u_out = leading_left(part, r4, fast).to(dt)
    return u_in.to(torch.float64), u_out.to(torch.float64)


def tucker2_core(weight: torch.Tensor, u_in: torch.Tensor, u_out: torch.Tensor) -> torch.Tensor:
    """The core ``G = W x_out U_out^T x_in U_in^T`` (``R4 x R3 x kh x kw``), float64."""
    return torch.einsum("fcyx,fa,cb->abyx", weight.detach().to(torch.float64), u_out, u_in)


def tucker2_weight(u_in: torch.Tensor, core: torch.Tensor, u_out: torch.Tensor) -> torch.Tensor:
    """The kernel ``W_hat = G x_out U_out x_in U_in`` (``f x c x kh x kw``), float64."""
    return torch.einsum("abyx,fa,cb->fcyx", core.to(torch.float64), u_out.to(torch.float64),
                        u_in.to(torch.float64))


@torch.no_grad()
def tucker2_factors(weight: torch.Tensor, rank_in: int, rank_out: int, hooi_iters: int = 2,
                    bases: tuple[torch.Tensor, torch.Tensor] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 factors ``(U_in, G, U_out)`` of a conv kernel: HOSVD, then ``hooi_iters`` HOOI sweeps."""
    f, c = weight.shape[:2]
    if not 1 <= rank_in <= c or not 1 <= rank_out <= f:
        raise ValueError(f"{NAME}: ranks (rank_in={rank_in}, rank_out={rank_out}) must be in [1, {c}] x [1, {f}]")
    u_in, u_out = hosvd(weight, rank_in, rank_out, bases)
    u_in, u_out = hooi(weight, u_in, u_out, hooi_iters)
    return u_in, tucker2_core(weight, u_in, u_out), u_out


def tucker2_cost(rank_in: np.ndarray | int, rank_out: np.ndarray | int,
                 geom: Conv2dGeometry) -> np.ndarray | int:
    """Weights ``c*R3 + kh*kw*R3*R4 + f*R4`` (without the bias)."""
    return geom.in_channels * rank_in + geom.taps * rank_in * rank_out + geom.out_channels * rank_out


def tucker2_rankas_pairs(c: int, f: int, points: int) -> tuple[np.ndarray, np.ndarray]:
    """``(R3, R4)`` pairs from the two rank grids with ``R3/c`` and ``R4/f`` within a factor of 2."""
    r3, r4 = np.meshgrid(rank_grid(c, points), rank_grid(f, points), indexing="ij")
    ratio = (r3 * f) / (r4 * c)
    keep = (ratio <= 2.0) & (ratio >= 0.5)
    return r3[keep].astype(np.int64), r4[keep].astype(np.int64)


def hosvd_spectra(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lam_in, U_in, lam_out, U_out)``: eigenvalues (descending, ``>= 0``) and eigenvectors of the
    Gram matrices ``W_(in) W_(in)^T`` (``c x c``) and ``W_(out) W_(out)^T`` (``f x f``), float64.

    ``U_in`` / ``U_out`` are the full HOSVD bases (:func:`hosvd` cuts them); ``lam_out`` are the
    squared singular values of ``W_(out)``, the ``f x c*kh*kw`` weight matrix.  This is
    :func:`autorank.families.conv.channel_spectra` (memoised per compression).
    """
    return channel_spectra(weight)


def _rotated(weight: torch.Tensor, bases: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The full HOSVD core ``T = W x_out U_out^T x_in U_in^T`` as an ``f x (c*kh*kw)`` matrix, columns ``(b, y, x)``."""
    u_in, u_out = bases
    w = weight.detach().to(torch.float64)
    f, c = w.shape[:2]
    t = (u_out.T @ w.reshape(f, -1)).reshape(f, c, -1)
    return torch.einsum("ack,cb->abk", t, u_in).reshape(f, -1)


@torch.no_grad()
def tucker2_hosvd_errors(weight: torch.Tensor, rank_in: Sequence[int] | np.ndarray,
                         rank_out: Sequence[int] | np.ndarray,
                         bases: tuple[torch.Tensor, torch.Tensor] | None = None) -> np.ndarray:
    r"""``||W - W_hat||_2 / ||W||_2`` of the truncated HOSVD at every ``(R3, R4)`` pair, with no pair fitted.

    In the full HOSVD bases the kernel is its core ``T`` (``f x c*K``; orthogonal changes of
    the rows and of the channel blocks of the columns keep ``||.||_2``), and the truncation
    keeps the block ``A = T[:R4, :R3*K]``, so the residual is ``T`` with ``A`` zeroed and

        E E^T = T T^T - S(R3)   with its ``[R4:, R4:]`` block restored to ``(T T^T)[R4:, R4:]``,
        S(R3) = T[:, :R3*K] T[:, :R3*K]^T,

    ``S`` accumulated over the sorted ``R3`` (one Gram matrix for all pairs), then
    ``lambda_max(E E^T)`` by :func:`top_eigen`.  ``T T^T = U_out^T W_(out) W_(out)^T U_out`` is
    diagonal (``U_out`` are the eigenvectors of ``W_(out) W_(out)^T``), so it is taken as the
    diagonal of squared row norms of ``T``, and ``||W||_2^2`` as its largest entry.
    ``bases``: the full ``(U_in, U_out)`` of :func:`hosvd_spectra` (square, orthogonal).
    """
    w = weight.detach()
    f, c = w.shape[:2]
    r3 = np.asarray(rank_in, dtype=np.int64)
    r4 = np.asarray(rank_out, dtype=np.int64)
    if r3.shape != r4.shape or np.any(r3 < 1) or np.any(r3 > c) or np.any(r4 < 1) or np.any(r4 > f):
        raise ValueError(f"{NAME}: rank pairs must be in [1, {c}] x [1, {f}] and of one length")
    if bases is None:
        spectra = hosvd_spectra(w)
        bases = (spectra[1], spectra[3])
    t = _rotated(w, bases)
    taps = t.shape[1] // c
    # T T^T = U_out^T W_(out) W_(out)^T U_out = diag(lam_out): U_out diagonalises it (to rounding)
    gram = torch.diag((t * t).sum(1))
    norm2 = float(gram.diagonal().max()) if f else 0.0
    errors = np.zeros(len(r3), dtype=np.float64)
    if norm2 <= 0.0:
        return errors
    s = torch.zeros_like(gram)
    done, start = 0, None
    for i in np.lexsort((r4, r3)):
        a, b = int(r3[i]), int(r4[i])
        if a > done:
            blk = t[:, done * taps:a * taps]
            s += blk @ blk.T
            done = a
        e = gram - s
        e[b:, b:] = gram[b:, b:]
        lam, start = top_eigen(e, start)
        errors[i] = np.sqrt(max(lam, 0.0) / norm2)
    return errors


@torch.no_grad()
def tucker2_hosvd_frobenius(weight: torch.Tensor, rank_in: Sequence[int] | np.ndarray,
                            rank_out: Sequence[int] | np.ndarray,
                            bases: tuple[torch.Tensor, torch.Tensor] | None = None) -> np.ndarray:
    """``||W - W_hat||_F / ||W||_F = sqrt(1 - ||T[:R4, :R3]||_F^2 / ||W||_F^2)`` of the truncated HOSVD.

    The truncation is the orthogonal projection ``W_hat = P_out W (P_in x I)``, so
    ``||W - W_hat||_F^2 = ||W||_F^2 - ||W_hat||_F^2`` and ``||W_hat||_F = ||G||_F``.
    """
    w = weight.detach()
    if bases is None:
        spectra = hosvd_spectra(w)
        bases = (spectra[1], spectra[3])
    t = _rotated(w, bases)
    f, c = w.shape[:2]
    t = t.reshape(f, c, -1)
    energy = (t * t).sum(-1)  # f x c
    cum = energy.cumsum(0).cumsum(1)  # cum[a-1, b-1] = ||T[:a, :b]||_F^2
    total = float(energy.sum())
    if total <= 0.0:
        return np.zeros(len(np.asarray(rank_in)), dtype=np.float64)
    kept = cum[np.asarray(rank_out) - 1, np.asarray(rank_in) - 1].numpy()
    return np.sqrt(np.clip(1.0 - kept / total, 0.0, None))


def tucker2_error_lower(lam_out: torch.Tensor, rank_out: np.ndarray) -> np.ndarray:
    """``sigma_{R4+1}(W_(out)) / sigma_1``: no rank-``R4``-output Tucker-2 (nor HOOI) does better (Eckart-Young)."""
    lam = lam_out.numpy()
    if len(lam) == 0 or lam[0] <= 0:
        return np.zeros(len(rank_out))
    padded = np.append(lam, 0.0)
    return np.sqrt(padded[np.minimum(rank_out, len(lam))] / lam[0])


def vbmf_ranks(weight: torch.Tensor) -> tuple[int, int]:
    """``(R3, R4)`` from EVBMF on ``W_(in)`` and ``W_(out)`` (Kim et al., 2016), each clipped to ``>= 1``."""
    return max(1, evbmf_rank(unfold_in(weight))), max(1, evbmf_rank(unfold_out(weight)))


# ---- module ---------------------------------------------------------------------------------


class Tucker2Conv(Factorized, nn.Sequential):
    """1x1 conv ``c -> R3``, ``kh x kw`` conv ``R3 -> R4`` (original geometry), 1x1 conv ``R4 -> f`` (Tucker-2)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int], rank_in: int,
                 rank_out: int, stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, bias: bool = True, padding_mode: str = "zeros",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        kernel, stride, padding, dilation = (as_pair(v) for v in (kernel_size, stride, padding, dilation))
        kw = {"device": device, "dtype": dtype}
        super().__init__()
        self.add_module("first", nn.Conv2d(in_channels, rank_in, 1, bias=False, **kw))
        self.add_module("core", nn.Conv2d(rank_in, rank_out, kernel, stride=stride, padding=padding,
                                          dilation=dilation, bias=False, padding_mode=padding_mode, **kw))
        self.add_module("last", nn.Conv2d(rank_out, out_channels, 1, bias=bias, **kw))
        self.rank_in, self.rank_out = rank_in, rank_out
        self.geometry = Conv2dGeometry(in_channels, out_channels, kernel, stride, padding, dilation,
                                       padding_mode, bias)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, rank_in: int, rank_out: int, hooi_iters: int = DEFAULTS["hooi_iters"],
                   factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> "Tucker2Conv":
        """Factorise ``conv`` by Tucker-2 (HOSVD + ``hooi_iters`` HOOI sweeps, or the given ``(U_in, G, U_out)``)."""
        geom = require_geometry(NAME, conv)
        w = conv.weight
        new = cls(geom.in_channels, geom.out_channels, geom.kernel, rank_in, rank_out, geom.stride,
                  geom.padding, geom.dilation, geom.bias, geom.padding_mode, device=w.device, dtype=w.dtype)
        u_in, core, u_out = factors if factors is not None else tucker2_factors(w, rank_in, rank_out, hooi_iters)
        with torch.no_grad():
            new.first.weight.copy_(u_in.T.reshape(new.first.weight.shape).to(w.dtype))
            new.core.weight.copy_(core.to(w.dtype))
            new.last.weight.copy_(u_out.reshape(new.last.weight.shape).to(w.dtype))
            if conv.bias is not None:
                new.last.bias.copy_(conv.bias)
        return new

    def to_dense(self) -> nn.Conv2d:
        """The ``nn.Conv2d`` (original geometry) with weight ``W_hat`` and the bias."""
        u_in = self.first.weight.detach()[:, :, 0, 0].T
        u_out = self.last.weight.detach()[:, :, 0, 0]
        return dense_conv(self.geometry, tucker2_weight(u_in, self.core.weight.detach(), u_out), self.last.bias,
                          like=self.core.weight)

    def extra_repr(self) -> str:
        return f"rank_in={self.rank_in}, rank_out={self.rank_out}"


# ---- family ---------------------------------------------------------------------------------


def _options(config: CurveConfig) -> dict[str, Any]:
    opts = family_options(config, NAME, DEFAULTS)
    if opts["hooi_iters"] < 0:
        raise ValueError(f"CurveConfig.options['{NAME}']['hooi_iters'] must be >= 0, got {opts['hooi_iters']!r}")
    if opts["ranks"] not in RANK_CHOICES:
        raise ValueError(f"CurveConfig.options['{NAME}']['ranks'] must be one of {RANK_CHOICES}, "
                         f"got {opts['ranks']!r}")
    return opts


def _check(geom: Conv2dGeometry, hyper: dict[str, Any]) -> tuple[int, int, int]:
    h = check_hyper(NAME, hyper, ("rank_in", "rank_out"))
    iters = check_hyper(NAME, {"hooi_iters": hyper.get("hooi_iters", DEFAULTS["hooi_iters"])},
                        ("hooi_iters",), low=0)["hooi_iters"]
    for key, top, what in (("rank_in", geom.in_channels, "input"), ("rank_out", geom.out_channels, "output")):
        if h[key] > top:
            raise ValueError(f"{NAME}: hyperparameter {key}={h[key]} exceeds the {top} {what} channels")
    return h["rank_in"], h["rank_out"], iters


def _useful(params: np.ndarray, flops: np.ndarray, info: LayerInfo) -> np.ndarray:
    """Candidates cheaper than the dense layer in parameters or in MACs (the others are never kept)."""
    return (params < info.dense_params) | (flops < info.dense_flops)


def _candidates(module: nn.Module, info: LayerInfo, config: CurveConfig,
                moment: torch.Tensor | None = None) -> CandidateColumns:
    geom = require_geometry(NAME, module)
    opts = _options(config)
    f, c, taps = geom.out_channels, geom.in_channels, geom.taps
    w = module.weight.detach()
    r3 = r4 = np.zeros(0, dtype=np.int64)
    if "grid" in opts["ranks"]:
        r3, r4 = tucker2_rankas_pairs(c, f, config.grid_points)
    if "vbmf" in opts["ranks"]:
        v3, v4 = vbmf_ranks(w)
        if not np.any((r3 == v3) & (r4 == v4)):
            r3, r4 = np.append(r3, v3).astype(np.int64), np.append(r4, v4).astype(np.int64)

    def flops_of(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return call_flops(info, geom, lambda n, h, w_, ho, wo: c * a * n * h * w_ + (taps * a + f) * b * n * ho * wo)

    params = np.asarray(tucker2_cost(r3, r4, geom), dtype=np.int64) + (f if geom.bias else 0)
    keep = _useful(params, flops_of(r3, r4), info)
    r3, r4, params = r3[keep], r4[keep], params[keep]
    flops = flops_of(r3, r4)
    spectra = hosvd_spectra(w)
    bases = (spectra[1], spectra[3])
    if moment is None:  # closed form: no factor is built
        error = tucker2_hosvd_errors(w, r3, r4, bases)
    else:  # data-aware: measured on the realised HOSVD kernels
        approx = (tucker2_weight(*(t.to(w.dtype) for t in tucker2_factors(w, int(a), int(b), 0, bases)))
                  .reshape(f, -1) for a, b in zip(r3, r4))
        error = relative_errors(w.reshape(f, -1), approx, moment)
    lower = np.zeros_like(error) if moment is not None else tucker2_error_lower(spectra[2], r4)
    iters = opts["hooi_iters"]
    return CandidateColumns(hyper={"rank_in": r3, "rank_out": r4, "hooi_iters": np.full(len(r3), iters, np.int64)},
                            error=error, error_lower=np.minimum(lower, error), params=params, flops=flops)


def _spectral_errors(weight: torch.Tensor, approximations: Sequence[torch.Tensor],
                     norm2: float | None = None) -> np.ndarray:
    """``||W - W_hat||_2 / ||W||_2`` of each ``f x n`` approximation, by :func:`top_gram_eigen` of ``E = W - W_hat``.

    ``norm2``: ``||W||_2^2`` when known (e.g. the top eigenvalue of :func:`hosvd_spectra`).
    """
    w = weight.detach().to(torch.float64)
    if norm2 is None:
        norm2 = top_gram_eigen(w)
    out = []
    for approx in approximations:
        lam = top_gram_eigen(w - approx.to(torch.float64))
        out.append(0.0 if norm2 <= 0 else float(np.sqrt(max(lam, 0.0) / norm2)))
    return np.asarray(out, dtype=np.float64)


@torch.no_grad()
def fit(module: nn.Module, rank_in: int, rank_out: int, hooi_iters: int,
        moment: torch.Tensor | None = None) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], float, bool]:
    """The factors the family builds, their measured error and whether HOOI was kept.

    The truncated HOSVD, and when ``hooi_iters > 0`` the HOOI refinement from it; HOOI raises
    ``||G||_F`` (lowers the Frobenius error) but need not lower the family's error measure
    (:mod:`autorank.measures`: operator norm, or the data-aware error with ``moment``), so
    both realised kernels are measured and the better kept.  The error returned is that of
    the kernel built (factors rounded to the layer's dtype, product in float64), at most the
    candidate's closed-form HOSVD error.
    """
    w = module.weight.detach()
    f = w.shape[0]
    spectra = channel_spectra(w)
    bases = (spectra[1], spectra[3])
    fits = [tucker2_factors(w, rank_in, rank_out, 0, bases)]
    if hooi_iters > 0:
        fits.append(tucker2_factors(w, rank_in, rank_out, hooi_iters, bases))
    approx = [tucker2_weight(*(t.to(w.dtype) for t in fac)).reshape(f, -1) for fac in fits]
    if moment is None:
        errs = _spectral_errors(w.reshape(f, -1), approx, float(spectra[2][0]) if len(spectra[2]) else None)
    else:
        errs = relative_errors(w.reshape(f, -1), approx, moment)
    best = int(np.argmin(errs))
    return fits[best], float(errs[best]), best == 1


def build(module: nn.Module, hyper: dict[str, Any], moment: torch.Tensor | None = None,
          init: bool = True) -> Tucker2Conv:
    """The :class:`Tucker2Conv` of ``module`` at ``hyper = {"rank_in": R3, "rank_out": R4, "hooi_iters": n}``.

    ``hooi_iters`` may be left out (default 2): the HOOI sweeps tried from the HOSVD, kept
    only where they lower the error (:func:`fit`).  The module carries the measured error
    of its kernel as ``fit_error`` (the plan reports it).  ``init=False`` builds the
    structure only; ``moment``: the data-aware measure that decides between HOSVD and HOOI
    (the factors are fitted to the weights).
    """
    geom = require_geometry(NAME, module)
    r3, r4, iters = _check(geom, hyper)
    if init:
        factors, err, _ = fit(module, r3, r4, iters, moment)
        new = Tucker2Conv.from_dense(module, r3, r4, iters, factors=factors)
        new.fit_error = err
        return new
    w = module.weight
    return Tucker2Conv(geom.in_channels, geom.out_channels, geom.kernel, r3, r4, geom.stride, geom.padding,
                       geom.dilation, geom.bias, geom.padding_mode, device=w.device, dtype=w.dtype)


TUCKER2 = register_family(
    Family.from_build(
        NAME, supports_multi_tap_conv, _candidates, build,
        description="Tucker-2 over the channel modes: 1x1, kh x kw core, 1x1 conv (Kim 2016; HOSVD + HOOI)",
    )
)
