r"""Spatial SVD of a 2-D convolution (Jaderberg et al., 2014; Tai et al., 2016).

**Maths.**  Reshape the kernel ``W`` (``f x c x kh x kw``) into the
``(c*kh) x (kw*f)`` matrix

    M[(c, i), (j, f)] = W[f, c, i, j]

and keep its rank-``K`` truncated SVD ``M ~= U_K S_K V_K^T`` (Eckart-Young optimal
for ``M``, not for the layer's matrix ``f x (c*kh*kw)``; the layer error of every rank
still has a closed form, :func:`spatial_svd_errors`).  With the singular values split evenly,

    V[k, c, i] = U[(c, i), k] sqrt(s_k)        (vertical filters, kh x 1)
    H[f, k, j] = sqrt(s_k) V[(j, f), k]         (horizontal filters, 1 x kw)

and ``W_hat[f, c, i, j] = sum_k H[f, k, j] V[k, c, i]``.  The layer becomes

* ``vertical``: ``c -> K``, kernel ``(kh, 1)``, stride ``(sh, 1)``, padding ``(ph, 0)``,
  dilation ``(dh, 1)``, no bias;
* ``horizontal``: ``K -> f``, kernel ``(1, kw)``, stride ``(1, sw)``, padding ``(0, pw)``,
  dilation ``(1, dw)``, with the original bias.

Padding commutes with the (bias-free) vertical conv, for every ``padding_mode``,
so the pair computes exactly the conv with weight ``W_hat``; at ``K = min(c*kh, kw*f)``
that is ``W``.

**Cost.**  Parameters ``K (c*kh + kw*f)`` (+ ``f`` bias).  Multiply-accumulates per
call on an ``N x c x H x W`` input with output ``Ho x Wo``:

    K*c*kh * N*Ho*W   (vertical, full input width)  +  f*K*kw * N*Ho*Wo   (horizontal)

**Candidates.**  ``K`` on :func:`autorank.measures.rank_grid` up to
``min(c*kh, kw*f)`` (those cheaper than the dense layer in parameters or MACs), all from
one SVD.  Weight-only, the error ``||W - W_hat||_2 / ||W||_2`` of every rank comes from
the tail sums of :func:`spatial_svd_errors` (no layer built; it equals the realised
layer's up to the rounding of the factors to the layer's dtype); with a calibration
moment the data-aware error is measured on the realised kernels
(:func:`autorank.measures.relative_errors`).  The factors are always fitted to the
weights.  No options.

The 2-D conv geometry helpers it shares with the other convolution families are in
:mod:`.conv`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from .._util import moved_names
from ..config import CurveConfig
from ..graph import LayerInfo
from ..linalg import FAST_EIGH_SIZE, gram_eigh, gram_eigh_fast
from ..measures import check_hyper, rank_grid, relative_errors
from ..modules import Factorized
from .base import CandidateColumns, Family, family_options, register_family
from .memo import memoized
from .conv import (Conv2dGeometry, as_pair, call_flops, conv2d_geometry, dense_conv, require_geometry,
                   top_eigen)

__all__ = ["spatial_matrix", "spatial_svd", "spatial_svd_factors", "spatial_svd_weight", "spatial_svd_cost",
           "spatial_svd_errors",
           "SpatialSVDConv", "SPATIAL_SVD"]

# the conv helpers moved to .conv; the ones not imported above are deprecated here
__getattr__ = moved_names(__name__, dict.fromkeys(("conv_out_size", "supports_multi_tap_conv"),
                                                  "autorank.families.conv"))

NAME = "spatial_svd"


# ---- maths ----------------------------------------------------------------------------------


def spatial_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The ``(c*kh) x (kw*f)`` matrix ``M[(c, i), (j, f)] = W[f, c, i, j]`` (float64)."""
    f, c, kh, kw = weight.shape
    return weight.detach().to(torch.float64).permute(1, 2, 3, 0).reshape(c * kh, kw * f)


@torch.no_grad()
def spatial_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(U, s, V^T)`` of :func:`spatial_matrix` (float64), from which every rank is cut.

    From the eigenvectors of the smaller Gram matrix: in float64 (:func:`autorank.linalg.gram_eigh`)
    below a smaller side of :data:`autorank.linalg.FAST_EIGH_SIZE`, and from it on formed and decomposed in float32
    (:func:`autorank.linalg.gram_eigh_fast`: 0.47 s against 1.11 s in float64, and 2.3 s for an
    SVD, on a 1536 x 1536 kernel matrix on one thread).  The singular values are the norms of
    the projected other side in float64, ``s_l = ||M^T u_l||`` (or ``||M v_l||``); that side's
    vectors are ``M^T u_l / s_l`` (or ``M v_l / s_l``), and directions with ``s_l <= 1e-12 s_1``
    get ``s_l = 0`` and zero vectors (so a small rank-deficient kernel is exact past its rank
to rounding).  The float32 subspaces of the large kernels put a floor near ``1e-7 s_1``
    under the null directions and move the layer errors of :func:`spatial_svd_errors` (which
    are computed in float64 from these vectors, so they stay the errors of the kernels built)
    by at most ``5e-7`` against float64 on every ResNet-18 kernel: no more than the rounding
    of the factors to a float32 layer.  Kept in the active
    :mod:`autorank.families.memo` (read-only): the candidates and the build share it.
    """
    return memoized("spatial_svd", weight, lambda: _spatial_svd(weight))


def _spatial_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m = spatial_matrix(weight)
    # float32 eigenvectors from FAST_EIGH_SIZE on (s and the other side stay float64)
    _, evecs, left = (gram_eigh_fast if min(m.shape) >= FAST_EIGH_SIZE else gram_eigh)(m)
    side = evecs.T @ m if left else (m @ evecs).T  # (r, other side): u_l^T M, or (M v_l)^T
    s = side.norm(dim=1)
    s, order = s.sort(descending=True)
    evecs, side = evecs[:, order], side[order]
    keep = s > 1e-12 * s[0] if len(s) and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    other = side / torch.where(keep, s, torch.ones_like(s))[:, None]
    other[~keep] = 0.0
    s = torch.where(keep, s, torch.zeros_like(s))
    if left:  # M M^T = U S^2 U^T:  V^T = S^-1 U^T M
        return evecs, s, other
    return other.T, s, evecs.T  # M^T M = V S^2 V^T:  U = M V S^-1


@torch.no_grad()
def spatial_svd_factors(weight: torch.Tensor, rank: int,
                        svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` spatial SVD factors of a conv kernel ``weight`` (``f x c x kh x kw``).

    Returns float64 ``vertical`` (``K x c x kh x 1``) and ``horizontal`` (``f x K x 1 x kw``),
    the conv weights of :class:`SpatialSVDConv`.  ``svd``: the precomputed
    :func:`spatial_svd` of ``weight``.
    """
    f, c, kh, kw = weight.shape
    top = min(c * kh, kw * f)
    if not 1 <= rank <= top:
        raise ValueError(f"{NAME}: rank={rank} must be in [1, {top}] for a {c * kh}x{kw * f} kernel matrix")
    u, s, vh = spatial_svd(weight) if svd is None else svd
    root = s[:rank].sqrt()
    vertical = (u[:, :rank] * root).reshape(c, kh, rank).permute(2, 0, 1).unsqueeze(-1)
    horizontal = (root[:, None] * vh[:rank]).reshape(rank, kw, f).permute(2, 0, 1).unsqueeze(2)
    return vertical.contiguous(), horizontal.contiguous()


@torch.no_grad()
def spatial_svd_errors(weight: torch.Tensor, ranks: Sequence[int] | np.ndarray,
                       svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> np.ndarray:
    r"""``||W - W_hat_K||_2 / ||W||_2`` (of the ``f x c*kh*kw`` weight matrix) at every rank ``K``, with none built.

    The rank-``K`` truncation keeps the leading ``K`` left singular vectors ``u_r`` of
    :func:`spatial_matrix`: ``W_hat = W Q_K`` with ``Q_K = sum_{r<K} u_r u_r^T (x) I_kw``, an
    orthogonal projection of the columns ``(c, i, j)`` of the weight matrix.  So
    ``E = W (I - Q_K)`` and

        E E^T = sum_{r >= K} s_r^2 B_r,     B_r[f, g] = sum_j V_r[j, f] V_r[j, g],

    with ``V_r`` the ``r``-th right singular vector reshaped to ``kw x f``: the tail sums,
    accumulated from the last rank down (no cancellation), then ``lambda_max`` by
    :func:`autorank.families.conv.top_eigen`.
    """
    f, c, kh, kw = weight.shape
    k = np.asarray(ranks, dtype=np.int64)
    top = min(c * kh, kw * f)
    if np.any(k < 1) or np.any(k > top):
        raise ValueError(f"{NAME}: ranks must be in [1, {top}] for a {c * kh}x{kw * f} kernel matrix")
    _, s, vh = spatial_svd(weight) if svd is None else svd
    y = (s[:, None] * vh).reshape(len(s), kw, f)  # s_r V_r
    tail = torch.zeros(f, f, dtype=torch.float64)
    norm2, _ = top_eigen(torch.einsum("rjf,rjg->fg", y, y))
    errors = np.zeros(len(k), dtype=np.float64)
    if norm2 <= 0.0:
        return errors
    done, start = len(s), None
    for i in np.argsort(-k, kind="stable"):
        r = int(k[i])
        if r < done:
            blk = y[r:done].reshape(-1, f)
            tail += blk.T @ blk
            done = r
        lam, start = top_eigen(tail, start)
        errors[i] = np.sqrt(max(lam, 0.0) / norm2)
    return errors


def spatial_svd_weight(vertical: torch.Tensor, horizontal: torch.Tensor) -> torch.Tensor:
    """The kernel ``W_hat[f, c, i, j] = sum_k H[f, k, 0, j] V[k, c, i, 0]`` of the pair (in float64)."""
    v, h = vertical.to(torch.float64)[..., 0], horizontal.to(torch.float64)[:, :, 0, :]
    return torch.einsum("kci,fkj->fcij", v, h)


def spatial_svd_cost(rank: np.ndarray | int, geom: Conv2dGeometry) -> np.ndarray | int:
    """Weights ``K (c*kh + kw*f)`` of the factor pair (without the bias)."""
    kh, kw = geom.kernel
    return rank * (geom.in_channels * kh + kw * geom.out_channels)


# ---- module ---------------------------------------------------------------------------------


class SpatialSVDConv(Factorized, nn.Sequential):
    """A vertical ``kh x 1`` conv ``c -> K`` then a horizontal ``1 x kw`` conv ``K -> f`` (spatial SVD)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int], rank: int,
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, bias: bool = True, padding_mode: str = "zeros",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (as_pair(v) for v in (kernel_size, stride, padding, dilation))
        kw_ = {"device": device, "dtype": dtype}
        super().__init__()
        self.add_module("vertical", nn.Conv2d(in_channels, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0),
                                              dilation=(dh, 1), bias=False, padding_mode=padding_mode, **kw_))
        self.add_module("horizontal", nn.Conv2d(rank, out_channels, (1, kw), stride=(1, sw), padding=(0, pw),
                                                dilation=(1, dw), bias=bias, padding_mode=padding_mode, **kw_))
        self.rank = rank
        self.geometry = Conv2dGeometry(in_channels, out_channels, (kh, kw), (sh, sw), (ph, pw), (dh, dw),
                                       padding_mode, bias)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, rank: int,
                   factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> "SpatialSVDConv":
        """Factorise ``conv`` by the rank-``rank`` spatial SVD (``factors``: precomputed ``(V, H)``)."""
        geom = require_geometry(NAME, conv)
        w = conv.weight
        new = cls(geom.in_channels, geom.out_channels, geom.kernel, rank, geom.stride, geom.padding,
                  geom.dilation, geom.bias, geom.padding_mode, device=w.device, dtype=w.dtype)
        v, h = factors if factors is not None else spatial_svd_factors(w, rank)
        with torch.no_grad():
            new.vertical.weight.copy_(v.to(w.dtype))
            new.horizontal.weight.copy_(h.to(w.dtype))
            if conv.bias is not None:
                new.horizontal.bias.copy_(conv.bias)
        return new

    def to_dense(self) -> nn.Conv2d:
        """The ``nn.Conv2d`` (original geometry) with weight ``W_hat`` and the bias."""
        w = spatial_svd_weight(self.vertical.weight.detach(), self.horizontal.weight.detach())
        return dense_conv(self.geometry, w, self.horizontal.bias, like=self.vertical.weight)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


# ---- family ---------------------------------------------------------------------------------


def _supports(module: nn.Module, info: LayerInfo) -> bool:
    geom = conv2d_geometry(module)
    return geom is not None and geom.kernel[0] > 1 and geom.kernel[1] > 1


def _check_rank(geom: Conv2dGeometry, hyper: dict[str, Any]) -> int:
    rank = check_hyper(NAME, hyper, ("rank",))["rank"]
    kh, kw = geom.kernel
    top = min(geom.in_channels * kh, kw * geom.out_channels)
    if rank > top:
        raise ValueError(f"{NAME}: hyperparameter rank={rank} exceeds the largest rank {top} "
                         f"of the {geom.in_channels * kh}x{kw * geom.out_channels} kernel matrix")
    return rank


def _candidates(module: nn.Module, info: LayerInfo, config: CurveConfig,
                moment: torch.Tensor | None = None) -> CandidateColumns:
    geom = require_geometry(NAME, module)
    family_options(config, NAME, {})  # no options: reject any given
    f, c, (kh, kw) = geom.out_channels, geom.in_channels, geom.kernel
    w = module.weight.detach()
    ranks = rank_grid(min(c * kh, kw * f), config.grid_points)

    def flops_of(k: np.ndarray) -> np.ndarray:
        return call_flops(info, geom, lambda n, h, w_, ho, wo: k * (c * kh * n * ho * w_ + f * kw * n * ho * wo))

    params = np.asarray(spatial_svd_cost(ranks, geom), dtype=np.int64) + (f if geom.bias else 0)
    keep = (params < info.dense_params) | (flops_of(ranks) < info.dense_flops)  # the others are never kept
    ranks, params = ranks[keep], params[keep]
    svd = spatial_svd(w)
    if moment is None:  # closed form: no factor is built
        error = spatial_svd_errors(w, ranks, svd)
    else:  # data-aware: measured on the realised kernels
        approx = (spatial_svd_weight(*(t.to(w.dtype) for t in spatial_svd_factors(w, int(k), svd))).reshape(f, -1)
                  for k in ranks)
        error = relative_errors(w.reshape(f, -1), approx, moment)
    return CandidateColumns(hyper={"rank": ranks}, error=error, error_lower=error.copy(),
                            params=params, flops=flops_of(ranks))


def build(module: nn.Module, hyper: dict[str, Any], moment: torch.Tensor | None = None,
          init: bool = True) -> SpatialSVDConv:
    """The :class:`SpatialSVDConv` of ``module`` at ``hyper = {"rank": K}`` (``init=False``: structure only).

    ``moment`` is accepted for the family interface; the factors are fitted to the weights.
    """
    geom = require_geometry(NAME, module)
    rank = _check_rank(geom, hyper)
    if init:
        return SpatialSVDConv.from_dense(module, rank)
    w = module.weight
    return SpatialSVDConv(geom.in_channels, geom.out_channels, geom.kernel, rank, geom.stride, geom.padding,
                          geom.dilation, geom.bias, geom.padding_mode, device=w.device, dtype=w.dtype)


SPATIAL_SVD = register_family(
    Family.from_build(
        NAME, _supports, _candidates, build,
        description="spatial SVD: a kh x 1 conv then a 1 x kw conv (Jaderberg 2014, Tai 2016)",
    )
)
