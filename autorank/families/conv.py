r"""What every convolution family shares: 2-D conv geometry, FLOP scaling, and kernel unfoldings.

A 2-D kernel ``W`` (``f x c x kh x kw``) has two channel unfoldings,

    W_(out) = W reshaped to f x (c*kh*kw),       W_(in) = W^T reshaped to c x (f*kh*kw),

whose leading left singular vectors (:func:`leading_left`, from the eigendecomposition
of ``A A^T`` in float64) start Tucker-2 and CP.  :class:`Conv2dGeometry` is the
geometry of an ``nn.Conv2d`` with ``groups = 1`` and integer padding, the layers the
spatial SVD, Tucker-2 and CP families factorise; :func:`call_flops` scales one call's
multiply-accumulates to the layer's example batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..linalg import sym_eigh
from .memo import memoized

if TYPE_CHECKING:  # pragma: no cover
    from ..graph import LayerInfo

__all__ = ["Conv2dGeometry", "conv2d_geometry", "conv_out_size", "call_flops", "dense_conv", "as_pair",
           "require_geometry", "supports_multi_tap_conv", "unfold_out", "unfold_in", "leading_left",
           "channel_spectra", "top_eigen", "top_gram_eigen"]


# ---- 2-D conv geometry ---------------------------------------------------------------------


@dataclass(frozen=True)
class Conv2dGeometry:
    """The geometry of an ``nn.Conv2d`` with ``groups = 1`` and integer padding."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    padding_mode: str
    bias: bool

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        """Output height and width for an ``h x w`` input."""
        return tuple(conv_out_size(s, k, st, p, d) for s, k, st, p, d in
                     zip((h, w), self.kernel, self.stride, self.padding, self.dilation))  # type: ignore[return-value]


def as_pair(v: int | Sequence[int]) -> tuple[int, int]:
    """``(v, v)`` for an int, else the first two entries as ints."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv2d_geometry(module: nn.Module) -> Conv2dGeometry | None:
    """The geometry of ``module``, or None if it is not an ``nn.Conv2d`` with ``groups = 1``.

    ``padding="valid"`` is read as 0 and ``padding="same"`` as ``d*(k-1)/2`` where that
    is an integer in both dimensions (otherwise the layer is not supported).
    """
    if not isinstance(module, nn.Conv2d) or module.groups != 1:
        return None
    kernel, stride, dilation = as_pair(module.kernel_size), as_pair(module.stride), as_pair(module.dilation)
    padding = module.padding
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        if any(t % 2 for t in total):
            return None
        padding = (total[0] // 2, total[1] // 2)
    elif isinstance(padding, str):
        return None
    return Conv2dGeometry(module.in_channels, module.out_channels, kernel, stride, as_pair(padding), dilation,
                          module.padding_mode, module.bias is not None)


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one dimension (PyTorch's formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _input_nhw(info: LayerInfo) -> tuple[int, int, int]:
    shape = tuple(info.in_shape)
    if len(shape) == 3:  # unbatched (c, H, W)
        return 1, shape[1], shape[2]
    return shape[0], shape[2], shape[3]


def call_flops(info: LayerInfo, geom: Conv2dGeometry, per_call) -> np.ndarray:
    """Scale multiply-accumulates of one call to the layer's example batch, as int64.

    ``per_call(n, h, w, ho, wo)`` returns the MACs (an int64 array) of one call on an
    ``n x c x h x w`` input (``info.in_shape``) whose dense output is ``ho x wo``.  The
    result is scaled by ``info.positions / (n*ho*wo)``, i.e. by ``info.calls`` when every
    call sees the first call's shape (exact), proportionally otherwise.
    """
    n, h, w = _input_nhw(info)
    ho, wo = geom.out_hw(h, w)
    macs = np.asarray(per_call(n, h, w, ho, wo), dtype=np.int64)
    out = n * ho * wo
    if out <= 0 or info.positions == out:
        return macs
    return (macs * int(info.positions) + out // 2) // out


def dense_conv(geom: Conv2dGeometry, weight: torch.Tensor, bias: torch.Tensor | None,
               like: torch.Tensor) -> nn.Conv2d:
    """The ``nn.Conv2d`` of ``geom`` with ``weight`` and ``bias``, on ``like``'s device and dtype."""
    out = nn.Conv2d(geom.in_channels, geom.out_channels, geom.kernel, stride=geom.stride, padding=geom.padding,
                    dilation=geom.dilation, bias=geom.bias, padding_mode=geom.padding_mode,
                    device=like.device, dtype=like.dtype)
    with torch.no_grad():
        out.weight.copy_(weight.to(out.weight.dtype))
        if bias is not None:
            out.bias.copy_(bias)
    return out


def require_geometry(family: str, module: nn.Module) -> Conv2dGeometry:
    """:func:`conv2d_geometry` of ``module``, or a TypeError naming ``family``."""
    geom = conv2d_geometry(module)
    if geom is None:
        raise TypeError(f"{family} factorises nn.Conv2d layers with groups=1 and integer padding, "
                        f"got {module!r}")
    return geom


def supports_multi_tap_conv(module: nn.Module, info: LayerInfo) -> bool:
    """The ``supports`` of the families that factorise a 2-D convolution's kernel (Tucker-2, CP):
    a ``groups=1`` Conv2d with more than one tap."""
    geom = conv2d_geometry(module)
    return geom is not None and geom.taps > 1


# ---- kernel unfoldings ---------------------------------------------------------------------


def unfold_out(weight: torch.Tensor) -> torch.Tensor:
    """Output-channel unfolding ``W_(out)``: ``f x (c*kh*kw)``, float64."""
    return weight.detach().to(torch.float64).reshape(weight.shape[0], -1)


def unfold_in(weight: torch.Tensor) -> torch.Tensor:
    """Input-channel unfolding ``W_(in)``: ``c x (f*kh*kw)``, float64."""
    return weight.detach().to(torch.float64).transpose(0, 1).reshape(weight.shape[1], -1)


@torch.no_grad()
def channel_spectra(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lam_in, U_in, lam_out, U_out)``: eigenvalues (descending, ``>= 0``) and eigenvectors of the
    Gram matrices ``W_(in) W_(in)^T`` (``c x c``) and ``W_(out) W_(out)^T`` (``f x f``), float64.

    ``U_in`` / ``U_out`` are :func:`leading_left` of the two unfoldings, the HOSVD bases that
    Tucker-2 and CP both cut; kept in the active :mod:`autorank.families.memo` (read-only), so the
    candidates of both families and the build of the chosen one share one pair of eigendecompositions.
    """
    def compute() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out = []
        for unfolding in (unfold_in(weight), unfold_out(weight)):
            vals, vecs = sym_eigh(unfolding @ unfolding.T)
            out += [vals.flip(-1).clamp_min(0), vecs.flip(-1)]
        return out[0], out[1], out[2], out[3]

    return memoized("channel_spectra", weight, compute)


@torch.no_grad()
def leading_left(matrix: torch.Tensor, rank: int | None = None, fast: bool = False) -> torch.Tensor:
    """The ``rank`` leading left singular vectors of ``matrix`` (all when None), descending, float64.

    From the eigendecomposition of ``A A^T`` (formed and decomposed in float32 when ``fast``);
    the columns are orthonormal to that precision's rounding.
    """
    a = matrix.to(torch.float32 if fast else torch.float64)
    _, vecs = sym_eigh(a @ a.T)
    vecs = vecs.to(torch.float64)
    vecs = vecs.flip(-1)
    return vecs if rank is None else vecs[:, :rank]


def _lanczos_top(matvec: Callable[[torch.Tensor], torch.Tensor], diag: torch.Tensor, like: torch.Tensor,
                 start: torch.Tensor | None, tol: float, steps: int,
                 restarts: int) -> tuple[float, torch.Tensor] | None:
    """Lanczos for the largest eigenvalue of the symmetric PSD operator ``matvec`` (float64).

    ``diag``: the operator's diagonal (length ``n``).  Full reorthogonalisation (classical
    Gram-Schmidt against the whole basis, repeated when it removed most of the vector's norm), up to
    ``steps`` Krylov vectors, then restarted, until ``|beta_j s_j| <= tol * theta`` (the
    residual ``||A v - theta v||``) with ``theta >= (1 - 1e-9) max(diag)``: a Ritz value below the largest
    diagonal entry (a lower bound of ``lambda_max``) means the start missed the top
    eigenvector, and the run restarts with that coordinate vector added.  A warm ``start`` is
    mixed with the fixed default start (1 % of its norm), so no direction is exactly absent.
    ``None`` when ``restarts`` runs do not converge.
    """
    from scipy.linalg import eigh_tridiagonal

    n = diag.shape[0]
    m = min(steps, n)
    base = torch.ones(n, dtype=like.dtype, device=like.device) + torch.arange(n, dtype=like.dtype,
                                                                               device=like.device) / n
    base = base / base.norm()
    v = start.to(like) if start is not None and start.shape == (n,) and bool(torch.isfinite(start).all()) else None
    v = base if v is None or float(v.norm()) == 0.0 else v / v.norm() + 0.01 * base
    floor, top = float(diag.max()), int(diag.argmax())
    for _ in range(restarts):
        q = torch.zeros(m + 1, n, dtype=like.dtype, device=like.device)
        torch.div(v, v.norm(), out=q[0])
        alpha, beta = np.zeros(m), np.zeros(m)
        theta, s, k, amax = 0.0, np.ones(1), 0, 0.0
        for j in range(m):
            z = matvec(q[j])
            before = float(z.norm())
            basis = q[:j + 1]
            h = basis @ z  # h[j] = q_j^T A q_j = alpha_j
            z = torch.addmv(z, basis.T, h, alpha=-1.0)
            alpha[j] = float(h[j])
            beta[j] = float(z.norm())
            if beta[j] < 0.7071 * before:  # most of A q_j was in the basis: once more (Daniel-Gragg-Kaufman-Stewart)
                h = basis @ z
                z = torch.addmv(z, basis.T, h, alpha=-1.0)
                alpha[j] += float(h[j])
                beta[j] = float(z.norm())
            k = j + 1
            amax = max(amax, abs(alpha[j]))
            invariant = beta[j] <= 1e-14 * max(amax, 1e-300)
            if not invariant:
                torch.div(z, beta[j], out=q[k])
            if invariant or k == m or k % 10 == 0:
                if k == 1:
                    vals, vecs = alpha[:1], np.ones((1, 1))
                else:  # the top Ritz pair only
                    vals, vecs = eigh_tridiagonal(alpha[:k], beta[:k - 1], select="i", select_range=(k - 1, k - 1))
                theta, s = float(vals[-1]), vecs[:, -1]
                if invariant or abs(beta[j] * s[-1]) <= tol * max(abs(theta), 1e-300):
                    break
        v = q[:k].T @ torch.from_numpy(np.ascontiguousarray(s)).to(like)
        v = v / v.norm()
        converged = invariant or abs(beta[k - 1] * s[-1]) <= tol * max(abs(theta), 1e-300)
        if converged and theta >= floor * (1 - 1e-9):  # within 1e-9 of a lower bound: as good as exact
            return theta, v
        if converged:  # a lower eigenvalue, from a start deficient in the top eigenvector
            v = v.clone()
            v[top] += 1.0
    return None


@torch.no_grad()
def top_eigen(sym: torch.Tensor, start: torch.Tensor | None = None, tol: float = 1e-6,
              steps: int = 120, restarts: int = 5) -> tuple[float, torch.Tensor]:
    """``(lambda_max, v)``: the largest eigenvalue of a symmetric PSD matrix and a unit eigenvector, float64.

    Lanczos with full reorthogonalisation (up to ``steps`` Krylov vectors, then restarted
    from the Ritz vector), started from ``start`` when given (e.g. the eigenvector of a
    neighbouring candidate, mixed with a fixed vector), until the residual
    ``r = ||A v - theta v|| <= tol * theta`` and ``theta >= max(diag A)``.  Some eigenvalue then
    lies within ``r`` of the Ritz value ``theta``; when that is ``lambda_max`` (a start
    deficient in the top eigenvector can converge to a lower one: the diagonal test catches the
    cases where ``theta`` falls below a diagonal entry), ``lambda_max - theta`` is at most ``r``
    and at most ``r^2 / delta`` when the rest of the spectrum is ``delta`` below (Kato-Temple).
    So the eigenvalue is far more accurate than the vector (see docs/families.md for the
    measured effect of ``tol``).  LAPACK (:func:`autorank.linalg.sym_eigh`) up to ``64 x 64``,
    or when Lanczos does not converge.  A family that measures ``||E||_2`` of many residuals
    ``E`` through their ``E E^T`` pays ``O(n^2)`` per step instead of an ``O(n^3)``
    eigendecomposition each.
    """
    a = sym.detach().to(torch.float64)
    n = a.shape[0]
    if n > 64:
        found = _lanczos_top(lambda v: a @ v, a.diagonal(), a, start, tol, steps, restarts)
        if found is not None:
            return found
    vals, vecs = sym_eigh(a)
    return float(vals[-1]), vecs[:, -1]


@torch.no_grad()
def top_gram_eigen(rows: torch.Tensor, tol: float = 1e-6, steps: int = 120, restarts: int = 5) -> float:
    """``lambda_max(R R^T) = ||R||_2^2`` of an ``f x n`` matrix ``R`` without forming its Gram matrix.

    Lanczos (:func:`top_eigen`'s, same ``tol`` and diagonal test; the diagonal is the squared
    row norms) on ``v -> R (R^T v)`` (or ``R^T (R v)`` when ``n < f``, the smaller side), ``4 f n``
    flops a step against ``f^2 n`` for ``R R^T``: the error of one realised kernel
    (``R = W - W_hat``) costs a few dozen matrix-vector products.  LAPACK on the smaller Gram up
    to ``64`` on that side, or when Lanczos does not converge; 0 for an empty matrix.
    """
    r = rows.detach().to(torch.float64)
    if r.dim() != 2:
        raise ValueError(f"top_gram_eigen needs a 2-D matrix, got shape {tuple(r.shape)}")
    if r.numel() == 0:
        return 0.0
    wide = r.shape[0] <= r.shape[1]
    if min(r.shape) > 64:
        op = (lambda v: r @ (r.T @ v)) if wide else (lambda v: r.T @ (r @ v))
        found = _lanczos_top(op, (r * r).sum(1 if wide else 0), r, None, tol, steps, restarts)
        if found is not None:
            return found[0]
    return float(sym_eigh(r @ r.T if wide else r.T @ r)[0][-1])
