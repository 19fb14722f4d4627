"""The local step: every candidate of every layer, with its error and cost (:class:`LayerCurves`).

For each compressible layer, every enabled decomposition family
(:mod:`autorank.families`) lists its candidates (:class:`CandidateColumns`: the
hyperparameters, the error in the shared measure of :mod:`autorank.measures`, and the
parameter and FLOP cost); those no cheaper than the dense layer are dropped, and
``dense`` (error 0) comes first.  The ALDS error curves ``eps(j, k)`` and their bounds
are in :mod:`autorank.families.alds`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from ._util import moved_names, parallel_map
from .config import CurveConfig
from .families.base import CandidateColumns, CostColumns, get_family, output_kwargs
from .graph import LayerGraph, LayerInfo

__all__ = [
    "CandidateColumns",
    "LayerCurves",
    "build_curves",
]

log = logging.getLogger(__name__)

# the ALDS maths moved to autorank.families.alds (deprecated here)
__getattr__ = moved_names(__name__, dict.fromkeys(
    ("group_singular_values", "grouped_error_curves", "alds_cost", "divisors_upto"), "autorank.families.alds"))


@dataclass
class LayerCurves(CostColumns):
    """Every candidate of one layer: ``dense`` (index 0) and all factorisations that save cost.

    Columns (``family``, ``row`` and the :class:`~autorank.families.base.CostColumns` ``error``,
    ``error_lower``, ``params``, ``flops``) are numpy arrays of equal length; ``family``
    indexes ``families``.
    """

    name: str
    info: LayerInfo
    families: tuple[str, ...]
    family: np.ndarray
    hyper: list[dict[str, np.ndarray]]  # per family: hyperparameter columns (row = index within family)
    row: np.ndarray  # row inside the family's hyper columns

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

    built = parallel_map(one, items, weight=lambda it: it[1].weight_params,
                         desc=f"error curves ({', '.join(config.families)})", progress=progress,
                         note=lambda it: it[0], unit="layer")
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
