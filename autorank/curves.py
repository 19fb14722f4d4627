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
from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from ._util import moved_names, parallel_map, progress_bar
from .config import CurveConfig, LatencyConfig, rank_multiple
from .families.base import CandidateColumns, CostColumns, get_family, output_kwargs
from .graph import LayerGraph, LayerInfo
from .latency import LatencyCache, latency_column, layer_io, split_latency

__all__ = [
    "CandidateColumns",
    "LayerCurves",
    "build_curves",
    "attach_latency",
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
    indexes ``families``.  ``latency``: measured seconds per forward pass of each candidate
    (:func:`attach_latency`, under ``metric="latency"``), else None.
    """

    name: str
    info: LayerInfo
    families: tuple[str, ...]
    family: np.ndarray
    hyper: list[dict[str, np.ndarray]]  # per family: hyperparameter columns (row = index within family)
    row: np.ndarray  # row inside the family's hyper columns
    latency: np.ndarray | None = None

    def cost(self, metric: str) -> np.ndarray:
        """The cost column of ``metric``: ``params``, ``flops`` or the measured ``latency`` (seconds)."""
        if metric == "latency":
            if self.latency is None:
                raise ValueError(f"layer {self.name!r} has no measured latency column (see curves.attach_latency)")
            return self.latency
        return self.params if metric == "params" else self.flops

    def select(self, keep: np.ndarray) -> "LayerCurves":
        """The curves of the candidates where ``keep`` (a boolean mask) is True; dense is always kept."""
        keep = np.asarray(keep, bool).copy()
        keep[0] = True
        return replace(self, family=self.family[keep], row=self.row[keep], error=self.error[keep],
                       error_lower=self.error_lower[keep], params=self.params[keep], flops=self.flops[keep],
                       latency=None if self.latency is None else self.latency[keep])

    def candidate(self, i: int) -> dict[str, Any]:
        """Candidate ``i`` as plain data."""
        fam = self.families[int(self.family[i])]
        hyper = {} if fam == "dense" else {
            key: int(col[self.row[i]]) for key, col in self.hyper[int(self.family[i])].items()
        }
        out = {
            "family": fam,
            "hyper": hyper,
            "error": float(self.error[i]),
            "error_lower": float(self.error_lower[i]),
            "params": int(self.params[i]),
            "flops": int(self.flops[i]),
        }
        if self.latency is not None:
            out["latency_s"] = float(self.latency[i])
        return out

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
        if self.latency is not None:
            out["latency"] = self.latency[idx]
        return out


def build_layer_curves(
    module: nn.Module, info: LayerInfo, config: CurveConfig, metric: str = "params",
    moment: torch.Tensor | None = None,
    output: torch.Tensor | None = None,
) -> LayerCurves | str:
    """All candidates of one layer, or the reason why it has none.

    Candidates are kept when they are cheaper than dense in ``metric`` (in MACs for
    ``"latency"``: the measured times come later, :func:`attach_latency`) and, with a rank
    multiple ``m`` (:func:`autorank.config.rank_multiple`), when every ``rank*``
    hyperparameter is a multiple of ``m`` or below ``m`` (a rank inside the first tile: for a
    layer only a few tiles wide, those are the only candidates cheaper than dense).  ``moment``: the layer's input second moment (data-aware errors), or None;
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
    multiple = rank_multiple(config, metric)
    supported = False
    for fname in config.families:
        fam = get_family(fname)
        if not fam.supports(module, info):
            continue
        supported = True
        cand = fam.candidates(module, info, config, moment, **output_kwargs(fam, output))
        _check_columns(fname, cand)
        cost = cand.params if metric == "params" else cand.flops
        ok = cost < dense_cost
        if multiple > 1:  # ranks below one tile stay: for a narrow layer they are the only cheaper ones
            for key, col in cand.hyper.items():
                if key.startswith("rank"):
                    col = np.asarray(col)
                    ok &= (col % multiple == 0) | (col < multiple)
        keep = np.nonzero(ok)[0]
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
        if multiple > 1:
            return (f"no factorisation with ranks that are multiples of {multiple} is cheaper than dense in "
                    f"{'flops' if metric == 'latency' else metric}")
        return f"no factorisation is cheaper than dense in {'flops' if metric == 'latency' else metric}"
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


def attach_latency(
    model: nn.Module,
    curves: Mapping[str, LayerCurves],
    example_inputs: Any,
    config: LatencyConfig | None = None,
    progress: bool | None = None,
) -> tuple[dict[str, LayerCurves], dict[str, str], dict[str, Any]]:
    """Measure the ``latency`` column of every layer's curves on the input it sees in ``model``.

    Each candidate is timed as its family's skeleton (:func:`autorank.latency.latency_column`:
    a grid of ranks, interpolated upwards, cached on disk), times the layer's number of calls.
    Candidates that measure no faster than dense are dropped; a layer left with dense only
    is returned in ``skipped``.  Then :func:`autorank.latency.split_latency` measures the
    whole model and everything but the layers with curves.

    Returns ``(curves, skipped, split)``: ``split`` holds ``whole_s`` and ``whole_iqr_s``
    (median and IQR of the whole model), ``whole_min_s``, ``rest_s`` (the time of everything
    not compressed, best of the rounds like the candidate times), ``layers_s`` (sum of the
    dense layers' times), ``predicted_s = rest_s + layers_s`` and the timing counts.
    """
    config = config or LatencyConfig()
    cache = LatencyCache(config.cache)
    names = list(curves)
    inputs, _ = layer_io(model, names, example_inputs)
    modules = dict(model.named_modules())
    out: dict[str, LayerCurves] = {}
    skipped: dict[str, str] = {}
    counts = {"timed": 0, "cached": 0, "interpolated": 0}
    layers_s = 0.0
    for name in progress_bar(names, "latency tables", progress):
        lc = curves[name]
        module = modules[name]
        if name not in inputs:
            skipped[name] = "not called with a tensor input on example_inputs; its latency cannot be measured"
            continue
        cands = [(c["family"], c["hyper"]) for c in (lc.candidate(i) for i in range(len(lc)))]
        seconds, stats = latency_column(
            module, inputs[name], cands, lambda fam, hyper: get_family(fam).skeleton(module, hyper),
            threads=config.threads, repeats=config.repeats, warmup=config.warmup, min_time_s=config.min_time_s,
            grid_linear=config.grid_linear, grid_ratio=config.grid_ratio, cache=cache, clock=config.clock)
        for k in counts:
            counts[k] += stats[k]
        seconds = seconds * max(lc.info.calls, 1)
        layers_s += float(seconds[0])
        timed = replace(lc, latency=seconds)
        faster = seconds < seconds[0]
        if not faster[1:].any():
            skipped[name] = "no factorisation measures faster than dense"
            continue
        out[name] = timed.select(faster)
    split = split_latency(model, names, example_inputs, config.repeats, config.warmup, config.threads,
                          config.min_time_s, config.clock)
    info = {"whole_s": split["whole"]["median_s"], "whole_iqr_s": split["whole"]["iqr_s"],
            "whole_min_s": split["whole"]["min_s"], "rest_s": split["rest"]["min_s"], "layers_s": layers_s,
            "predicted_s": split["rest"]["min_s"] + layers_s, "threads": config.threads, **counts}
    log.info("latency: whole model %.3f ms; everything not compressed %.3f ms + dense layers %.3f ms = %.3f ms; "
             "%d candidates timed, %d cached, %d interpolated", info["whole_s"] * 1e3, info["rest_s"] * 1e3,
             layers_s * 1e3, info["predicted_s"] * 1e3, counts["timed"], counts["cached"], counts["interpolated"])
    return out, skipped, info


def curves_table(curves: Mapping[str, LayerCurves]) -> list[dict[str, Any]]:
    """Flat rows (layer, family, hyperparameters, error, params, flops) for export and plots."""
    rows = []
    for name, lc in curves.items():
        for i in range(len(lc)):
            rows.append({"layer": name, **lc.candidate(i)})
    return rows
