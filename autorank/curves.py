r"""The local step: error curves eps(j, k) and the cost of every candidate.

Notation: a layer's weight is the matrix ``W`` (``f x n``, ``n = c * K`` with ``K``
kernel taps).  Splitting the ``c`` input channels into ``k`` contiguous groups
gives column blocks ``W_1 ... W_k``; keeping rank ``j`` of each leaves the
residual ``R = [R_1 ... R_k]`` with ``||R_i||_2 = sigma_{j+1}(W_i)``.

Because ``R R^T = sum_i R_i R_i^T``,

    max_i ||R_i||_2  <=  ||R||_2  <=  sqrt(sum_i ||R_i||_2^2)  <=  sqrt(k) max_i ||R_i||_2,

so autorank's default error

    eps(j, k) = sqrt(sum_i sigma_{j+1}(W_i)^2) / sigma_1(W)

is a guaranteed upper bound on the relative operator-norm error
``||W - W_hat||_2 / ||W||_2`` of the realised layer, and equals it for ``k = 1``.
The reference implementation's ``max_i sigma_{j+1}(W_i) / sigma_1(W)`` is the
lower end of the same bracket; it is kept as ``error_lower`` (and used when
``CurveConfig(error_bound="max")``).

All ranks of one ``(layer, k)`` come from one set of singular values, obtained
as the square roots of the eigenvalues of the smaller Gram matrix of each
block in float64 (cheaper than an SVD of a wide block, and accurate to
``~1e-8 sigma_1``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from .config import CurveConfig
from .graph import LayerGraph, LayerInfo
from ._util import parallel_map, single_thread

__all__ = [
    "CandidateColumns",
    "LayerCurves",
    "group_singular_values",
    "grouped_error_curves",
    "alds_cost",
    "divisors_upto",
    "build_curves",
]

log = logging.getLogger(__name__)


def divisors_upto(c: int, limit: int) -> list[int]:
    """Divisors of ``c`` that are ``<= limit`` (always includes 1)."""
    return [d for d in range(1, min(c, limit) + 1) if c % d == 0]


@torch.no_grad()
def group_singular_values(weight_matrix: torch.Tensor, groups: int) -> torch.Tensor:
    """Singular values (descending) of the ``groups`` contiguous column blocks of ``weight_matrix``.

    Returns a float64 tensor of shape ``(groups, min(f, n/groups))``.
    """
    f, n = weight_matrix.shape
    if n % groups:
        raise ValueError(f"groups={groups} does not divide the {n} columns")
    w = weight_matrix.detach().to(torch.float64).reshape(f, groups, n // groups).transpose(0, 1)
    gram = w @ w.transpose(1, 2) if f <= n // groups else w.transpose(1, 2) @ w
    with single_thread(gram.shape[-1]):
        evals = torch.linalg.eigvalsh(gram)
    return evals.flip(-1).clamp_min(0).sqrt()


def grouped_error_curves(svals: np.ndarray, sigma1: float) -> tuple[np.ndarray, np.ndarray]:
    """Upper and lower relative-error bounds for ranks ``j = 1 .. m`` from per-group singular values.

    ``svals``: ``(k, m)`` descending singular values of each group.  Returns
    ``(upper, lower)``, each of length ``m``, where entry ``j-1`` is

        upper[j-1] = sqrt(sum_i sigma_{j+1}(W_i)^2) / sigma1,
        lower[j-1] = max_i sigma_{j+1}(W_i) / sigma1,

    with ``sigma_{m+1} = 0`` (full rank is exact).
    """
    k, m = svals.shape
    tail = np.zeros((k, m))
    tail[:, : m - 1] = svals[:, 1:]
    if sigma1 <= 0:
        return np.zeros(m), np.zeros(m)
    upper = np.sqrt((tail**2).sum(axis=0)) / sigma1
    lower = tail.max(axis=0) / sigma1
    return upper, lower


def alds_cost(rank: np.ndarray | int, f: int, c: int, taps: int, groups: int) -> np.ndarray | int:
    """Weights of a grouped low-rank layer: ``j * (c*K + k*f)`` (also its MACs per output position)."""
    return rank * (c * taps + groups * f)


@dataclass
class CandidateColumns:
    """Candidates of one family for one layer, as parallel columns.

    ``hyper`` holds the family's hyperparameter columns (for ALDS ``groups`` and ``rank``).
    """

    hyper: dict[str, np.ndarray]
    error: np.ndarray
    error_lower: np.ndarray
    params: np.ndarray
    flops: np.ndarray

    def __len__(self) -> int:
        return len(self.error)


@dataclass
class LayerCurves:
    """Every candidate of one layer: ``dense`` (index 0) and all factorisations that save cost.

    Columns are numpy arrays of equal length; ``family`` indexes ``families``.
    """

    name: str
    info: LayerInfo
    families: tuple[str, ...]
    family: np.ndarray
    hyper: list[dict[str, np.ndarray]]  # per family: hyperparameter columns (row = index within family)
    row: np.ndarray  # row inside the family's hyper columns
    error: np.ndarray
    error_lower: np.ndarray
    params: np.ndarray
    flops: np.ndarray

    def __len__(self) -> int:
        return len(self.error)

    def cost(self, metric: str) -> np.ndarray:
        return self.params if metric == "params" else self.flops

    def candidate(self, i: int) -> dict[str, Any]:
        """Candidate ``i`` as plain data."""
        fam = self.families[int(self.family[i])]
        hyper = {} if fam == "dense" else {
            key: int(col[self.row[i]]) for key, col in self.hyper[int(self.family[i])].items()
        }
        return {
            "family": fam,
            "hyper": hyper,
            "error": float(self.error[i]),
            "error_lower": float(self.error_lower[i]),
            "params": int(self.params[i]),
            "flops": int(self.flops[i]),
        }

    def find(self, family: str, **hyper: int) -> int | None:
        """Index of the candidate of ``family`` with exactly these hyperparameter values, or None."""
        if family == "dense":
            return 0
        if family not in self.families:
            return None
        f = self.families.index(family)
        idx = np.nonzero(self.family == f)[0]
        rows = self.row[idx]
        for key, val in hyper.items():
            col = self.hyper[f].get(key)
            if col is None:
                return None
            sel = col[rows] == val
            idx, rows = idx[sel], rows[sel]
        return int(idx[0]) if len(idx) else None

    def curve(self, family: str = "alds", **fixed: int) -> dict[str, np.ndarray]:
        """The candidates of one family, optionally with hyperparameters fixed (e.g. ``groups=1``)."""
        if family not in self.families:
            raise ValueError(f"layer {self.name!r} has no {family!r} candidates; it has {self.families}")
        f = self.families.index(family)
        idx = np.nonzero(self.family == f)[0]
        rows = self.row[idx]
        cols = self.hyper[f]
        for key, val in fixed.items():
            sel = cols[key][rows] == val
            idx, rows = idx[sel], rows[sel]
        out = {key: col[rows] for key, col in cols.items()}
        out.update(error=self.error[idx], error_lower=self.error_lower[idx],
                   params=self.params[idx], flops=self.flops[idx])
        return out


def build_layer_curves(
    module: nn.Module, info: LayerInfo, config: CurveConfig, metric: str = "params",
    moment: torch.Tensor | None = None,
    output: torch.Tensor | None = None,
) -> LayerCurves | str:
    """All candidates of one layer, or the reason why it has none.

    ``moment``: the layer's input second moment (data-aware errors), or None;
    ``output``: its output moment ``G`` (output-weighted errors, for the families
    with ``fits_output``), or None.
    """
    from .families import get_family, output_kwargs

    names: list[str] = ["dense"]
    hypers: list[dict[str, np.ndarray]] = [{}]
    cols = {"family": [np.zeros(1, np.int16)], "row": [np.zeros(1, np.int64)],
            "error": [np.zeros(1)], "error_lower": [np.zeros(1)],
            "params": [np.array([info.dense_params], np.int64)],
            "flops": [np.array([info.dense_flops], np.int64)]}
    dense_cost = info.dense_params if metric == "params" else info.dense_flops
    supported = False
    for fname in config.families:
        fam = get_family(fname)
        if not fam.supports(module, info):
            continue
        supported = True
        cand = fam.candidates(module, info, config, moment, **output_kwargs(fam, output))
        _check_columns(fname, cand)
        cost = cand.params if metric == "params" else cand.flops
        keep = np.nonzero(cost < dense_cost)[0]
        if len(keep) == 0:
            continue
        idx = len(names)
        names.append(fname)
        hypers.append(cand.hyper)
        cols["family"].append(np.full(len(keep), idx, np.int16))
        cols["row"].append(keep.astype(np.int64))
        cols["error"].append(cand.error[keep])
        cols["error_lower"].append(cand.error_lower[keep])
        cols["params"].append(cand.params[keep].astype(np.int64))
        cols["flops"].append(cand.flops[keep].astype(np.int64))
    if len(names) == 1:
        if not supported:
            return f"no enabled family ({', '.join(config.families)}) supports {type(module).__name__}"
        return f"no factorisation is cheaper than dense in {metric}"
    return LayerCurves(
        name=info.name, info=info, families=tuple(names), hyper=hypers,
        **{k: np.concatenate(v) for k, v in cols.items()},
    )


def _check_columns(family: str, cand: CandidateColumns) -> None:
    n = len(cand.error)
    for key, col in (("error_lower", cand.error_lower), ("params", cand.params), ("flops", cand.flops),
                     *cand.hyper.items()):
        if len(col) != n:
            raise ValueError(f"family {family!r} returned {len(col)} {key!r} values for {n} candidates")
    if n and (not np.all(np.isfinite(cand.error)) or np.any(cand.error < 0)):
        raise ValueError(f"family {family!r} returned a negative or non-finite error")


def build_curves(
    model: nn.Module,
    graph: LayerGraph,
    config: CurveConfig | None = None,
    metric: str = "params",
    progress: bool | None = None,
    moments: Mapping[str, Any] | None = None,
) -> tuple[dict[str, LayerCurves], dict[str, str]]:
    """Error curves of every compressible layer of ``graph``.

    ``moments``: ``{layer: Moments}`` from :func:`autorank.calibration.collect_moments`;
    the layers listed get data-aware errors (output-weighted where ``Moments.output`` is set).  Returns ``(curves, skipped)``: layers
    with no candidate cheaper than dense (in ``metric``), or that no enabled family
    supports, are in ``skipped`` with the reason.
    """
    config = config or CurveConfig()
    modules = dict(model.named_modules())
    items = list(graph.layers.items())
    moments = moments or {}

    def one(it):
        mom = moments.get(it[0])
        if mom is None:
            return build_layer_curves(modules[it[0]], it[1], config, metric)
        return build_layer_curves(modules[it[0]], it[1], config, metric, mom.matrix, mom.output_matrix)

    built = parallel_map(one, items,
                         weight=lambda it: it[1].weight_params, desc="error curves", progress=progress)
    curves: dict[str, LayerCurves] = {}
    skipped: dict[str, str] = {}
    for (name, _), lc in zip(items, built):
        if isinstance(lc, str):
            skipped[name] = lc
        else:
            curves[name] = lc
    return curves, skipped


def curves_table(curves: Mapping[str, LayerCurves]) -> list[dict[str, Any]]:
    """Flat rows (layer, family, hyperparameters, error, params, flops) for export and plots."""
    rows = []
    for name, lc in curves.items():
        for i in range(len(lc)):
            rows.append({"layer": name, **lc.candidate(i)})
    return rows
