r"""Analytic empirical variational Bayesian matrix factorisation (EVBMF) rank estimate.

Nakajima, Sugiyama, Babacan and Tomioka (JMLR 2013) solve fully observed VBMF
in closed form.  For ``Y`` of shape ``L x M`` (``L <= M``, ``alpha = L / M``) with
singular values ``gamma_h``, model ``Y = B A^T + E`` with Gaussian noise of
variance ``sigma^2``:

* a component is kept iff ``gamma_h > gamma_EVB = sqrt(M sigma^2 xi)``, with
  ``xi = (1 + tau_bar)(1 + alpha / tau_bar)`` and ``tau_bar ~= 2.5129 sqrt(alpha)``;
* ``sigma^2`` itself is estimated by minimising the free energy, which after the
  other variables are profiled out is, with ``x_h = gamma_h^2 / (M sigma^2)``,

      F(sigma^2) = sum_{x_h <= xi} (x_h - log x_h)
                 + sum_{x_h > xi} (x_h - tau(x_h) + log((tau(x_h) + 1) / x_h) + alpha log(tau(x_h)/alpha + 1))
                 + r / (M sigma^2) + (L - H) log sigma^2,

  where ``tau(x) = (x - (1 + alpha) + sqrt((x - (1 + alpha))^2 - 4 alpha)) / 2``,
  ``H`` components are modelled and ``r`` is the energy beyond them; the minimiser
  lies in ``[sigma_lo^2, sigma_hi^2]`` with ``sigma_hi^2 = ||Y||_F^2 / (L M)`` and
  ``sigma_lo^2 = max(gamma_{Hb+1}^2 / (M xi), mean_{h > Hb} gamma_h^2 / M)``,
  ``Hb = ceil(L / (1 + alpha)) - 1``.

Kim et al. (ICLR 2016) and MUSCO use it on the two channel unfoldings of a
convolution kernel to pick Tucker-2 ranks; autorank also offers it as a rank
allocator (:mod:`autorank.allocators`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import linalg

__all__ = ["evbmf_rank", "evbmf_threshold", "singular_values"]

TAU_BAR_COEF = 2.5129  # tau_bar / sqrt(alpha), the root of the EVB threshold equation (Nakajima 2013)


def singular_values(matrix: np.ndarray | torch.Tensor) -> np.ndarray:
    """Descending singular values of a 2-D array (float64), by :func:`autorank.linalg.singular_values`."""
    a = torch.as_tensor(np.asarray(matrix) if not isinstance(matrix, torch.Tensor) else matrix.detach())
    return linalg.singular_values(a.to(torch.float64), threads=True).numpy()


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    d = x - (1.0 + alpha)
    return 0.5 * (d + np.sqrt(np.maximum(d * d - 4.0 * alpha, 0.0)))


def _free_energy(sigma2: float, s2: np.ndarray, residual: float, L: int, M: int, xi: float) -> float:
    alpha = L / M
    x = s2 / (M * sigma2)
    small, big = x[x <= xi], x[x > xi]
    t = _tau(big, alpha)
    value = np.sum(small - np.log(np.maximum(small, 1e-300)))
    value += np.sum(big - t + np.log((t + 1.0) / big) + alpha * np.log(t / alpha + 1.0))
    value += residual / (M * sigma2) + (L - len(s2)) * math.log(sigma2)
    return float(value)


def evbmf_threshold(svals: np.ndarray, shape: tuple[int, int], residual: float = 0.0) -> tuple[float, float]:
    """``(gamma_EVB, sigma^2)``: the EVBMF singular-value threshold and the estimated noise variance.

    ``svals``: descending singular values of a matrix of ``shape``; ``residual``: the
    energy ``||Y||_F^2 - sum(svals^2)`` not covered by them (0 when all are given).
    """
    from scipy.optimize import minimize_scalar

    L, M = sorted(int(v) for v in shape)
    s = np.asarray(svals, dtype=np.float64)[:L]
    if s.size == 0 or s[0] <= 0:
        return 0.0, 0.0
    alpha = L / M
    tau_bar = TAU_BAR_COEF * math.sqrt(alpha)
    xi = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    s2 = s * s
    hi = (s2.sum() + residual) / (L * M)
    hb = min(int(math.ceil(L / (1.0 + alpha))) - 1, len(s)) - 1  # 0-based index of the last "signal" slot
    tail = s2[hb + 1:] if hb + 1 < len(s2) else s2[-1:]
    lo = max(tail[0] / (M * xi), float(np.mean(tail)) / M)
    lo = min(max(lo, hi * 1e-12), hi)
    if hi - lo <= 1e-15 * hi:
        sigma2 = hi
    else:
        res = minimize_scalar(_free_energy, args=(s2, residual, L, M, xi), bounds=(lo, hi), method="bounded",
                              options={"xatol": 1e-12 * hi})
        sigma2 = float(res.x)
    return math.sqrt(M * sigma2 * xi), sigma2


def evbmf_rank(matrix: np.ndarray | torch.Tensor | None = None, svals: np.ndarray | None = None,
               shape: tuple[int, int] | None = None) -> int:
    """The EVBMF rank of ``matrix`` (or of a matrix of ``shape`` with singular values ``svals``).

    Returns the number of singular values above the analytic EVB threshold (can be 0
    for pure noise).
    """
    if svals is None:
        if matrix is None:
            raise ValueError("evbmf_rank needs a matrix or its singular values and shape")
        svals = singular_values(matrix)
        shape = tuple(np.asarray(matrix.shape))
    elif shape is None:
        raise ValueError("evbmf_rank: pass the matrix shape with its singular values")
    threshold, _ = evbmf_threshold(np.asarray(svals), tuple(shape))
    return int(np.sum(np.asarray(svals) > threshold))
