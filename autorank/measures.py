r"""Measured errors of candidate approximations, shared by every decomposition family.

Every family reports the error of a candidate ``W_hat`` of a layer's weight
matrix ``W`` (``f x n``, ``n = c * K``; :meth:`LayerHandler.weight_matrix`) in
one of two measures, so that all families compete under one solver:

* **weight-only** (no calibration data): the relative operator-norm error

      eps = ||W - W_hat||_2 / ||W||_2 ,

  the quantity ALDS bounds (exactly for ``k = 1``; see :mod:`autorank.families.alds`).
  Families without a closed form (spatial SVD, Tucker-2, CP, Tensor-Train,
  sparse + low-rank) *measure* it on the approximation they would build.
* **data-aware** (``calibration=`` given): with ``M = E[x x^T]`` the second moment
  of the layer's inputs (im2col patches for a convolution),

      eps = ||(W - W_hat) X||_F / ||W X||_F
          = sqrt(tr(R M R^T) / tr(W M W^T)),      R = W - W_hat.

Both are computed in float64.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from .linalg import singular_values

__all__ = ["spectral_norm", "relative_spectral_error", "relative_data_error", "relative_errors", "rank_grid",
           "check_hyper"]


@torch.no_grad()
def spectral_norm(matrix: torch.Tensor) -> float:
    """``||A||_2`` (largest singular value) of a 2-D tensor, in float64.

    Computed as the square root of the largest eigenvalue of the smaller Gram
    matrix (:func:`autorank.linalg.singular_values`; exact up to float64 rounding, ~1e-8 relative).
    """
    a = matrix.detach().to(torch.float64)
    if a.numel() == 0:
        return 0.0
    return float(singular_values(a)[0])


def relative_spectral_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``||W - W_hat||_2 / ||W||_2`` (0 when ``W = 0``)."""
    w = weight.detach().to(torch.float64)
    norm = spectral_norm(w)
    if norm == 0.0:
        return 0.0
    return spectral_norm(w - approx.detach().to(torch.float64)) / norm


def relative_data_error(weight: torch.Tensor, approx: torch.Tensor, moment: torch.Tensor) -> float:
    """``sqrt(tr(R M R^T) / tr(W M W^T))`` with ``R = W - W_hat`` and ``M`` the input second moment.

    ``M`` is ``n x n``, or its diagonal ``(n,)`` when the inputs are one-hot (an embedding).
    """
    w = weight.detach().to(torch.float64)
    m = moment.to(torch.float64)
    r = w - approx.detach().to(torch.float64)
    if m.dim() == 1:  # a diagonal moment (one-hot inputs of an embedding)
        den, num = float((w * w * m).sum()), float((r * r * m).sum())
    else:
        den, num = float(((w @ m) * w).sum()), float(((r @ m) * r).sum())
    if den <= 0.0:
        return 0.0
    return float(np.sqrt(max(num, 0.0) / den))


def relative_errors(
    weight: torch.Tensor, approximations: Iterable[torch.Tensor], moment: torch.Tensor | None = None
) -> np.ndarray:
    """The error of each approximation of ``weight`` (``f x n`` each), in the measure of the module docstring.

    ``moment`` is the layer's input second moment ``M`` (``n x n``) in data-aware mode, else None.
    """
    w = weight.detach().to(torch.float64)
    norm = spectral_norm(w) if moment is None else 0.0  # ||W||_2 once for all candidates
    errs = []
    for approx in approximations:
        if approx.shape != weight.shape:
            raise ValueError(f"approximation of shape {tuple(approx.shape)} for a weight of shape {tuple(weight.shape)}")
        if moment is not None:
            errs.append(relative_data_error(w, approx, moment))
        else:
            errs.append(0.0 if norm == 0.0 else spectral_norm(w - approx.detach().to(torch.float64)) / norm)
    return np.asarray(errs, dtype=np.float64)


def rank_grid(max_rank: int, points: int, min_rank: int = 1) -> np.ndarray:
    """Up to ``points`` distinct ranks in ``[min_rank, max_rank]``, denser at small ranks.

    For families whose error is measured per candidate (one factorisation each),
    a grid keeps the cost bounded; families with a closed form use every rank.
    The grid is ``min_rank``, ``max_rank`` and a geometric progression between them.
    """
    if max_rank < min_rank:
        return np.zeros(0, dtype=np.int64)
    if max_rank - min_rank + 1 <= points:
        return np.arange(min_rank, max_rank + 1, dtype=np.int64)
    grid = np.unique(np.round(np.geomspace(min_rank, max_rank, points)).astype(np.int64))
    return grid


def check_hyper(family: str, hyper: dict, required: Sequence[str], low: int = 1) -> dict[str, int]:
    """Validate a candidate's hyperparameters: every ``required`` key, each an int ``>= low``."""
    if not isinstance(hyper, dict):
        raise TypeError(f"{family}: hyperparameters must be a dict, got {type(hyper).__name__}")
    out = {}
    for key in required:
        if key not in hyper:
            raise ValueError(f"{family}: missing hyperparameter {key!r} (got {sorted(hyper)})")
        val = hyper[key]
        if isinstance(val, (bool, float)) or not isinstance(val, (int, np.integer)):
            raise TypeError(f"{family}: hyperparameter {key}={val!r} must be an int")
        if int(val) < low:
            raise ValueError(f"{family}: hyperparameter {key}={val!r} must be >= {low}")
        out[key] = int(val)
    return out
