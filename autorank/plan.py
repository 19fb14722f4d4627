"""A plan is data: per layer, the chosen family, hyperparameters, error and cost.

Plans are versioned, JSON-serialisable and printable as a table.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LayerPlan", "Plan", "PLAN_VERSION", "describe", "HYPER_FORMATS"]

PLAN_VERSION = 1


@dataclass
class LayerPlan:
    """The decision for one compressible layer (``family == "dense"`` keeps it as it is)."""

    name: str
    kind: str  # "linear", "conv1d", "conv2d", ...
    shape: list[int]  # weight shape
    family: str
    hyper: dict[str, int]  # e.g. {"groups": k, "rank": j} for ALDS
    error: float  # predicted relative operator-norm error (see docs/concepts.md)
    error_lower: float  # the reference's lower bound max_i sigma_{j+1}(W_i) / sigma_1(W)
    dense_params: int
    params: int
    dense_flops: int
    flops: int

    @property
    def compressed(self) -> bool:
        return self.family != "dense"


@dataclass
class Plan:
    """What :func:`autorank.optimize` chose.

    ``totals`` holds the measured figures of the realised model (``params``,
    ``flops``, ``params_before``, ``flops_before``) once it has been built.
    ``attention`` names the ``nn.MultiheadAttention`` modules that the realised model holds
    as :class:`autorank.families.attention.UnfusedMultiheadAttention` (their projections are
    the layers ``<name>.q_proj``, ``.k_proj``, ``.v_proj``, ``.out_proj``);
    :func:`autorank.realize` unfuses them first.
    ``weights`` is set in a saved ``plan.json`` only: the weights file it goes with, its
    size and sha256 (checked by :func:`autorank.load`), and the non-persistent buffers
    stored in it (:func:`autorank.save`).
    """

    metric: str
    budget: float
    objective: str
    layers: dict[str, LayerPlan]
    skipped: dict[str, str] = field(default_factory=dict)
    max_error: float = 0.0
    network_bound: float = 0.0
    totals: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION
    attention: list[str] = field(default_factory=list)

    # ---- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(lp) for lp in self.layers.values()]
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        if not isinstance(data, dict):
            raise TypeError(f"a plan must be a dict, got {type(data).__name__}")
        version = data.get("version")
        if version != PLAN_VERSION:
            raise ValueError(f"unsupported plan version {version!r}; this autorank reads version {PLAN_VERSION}")
        d = dict(data)
        d["layers"] = {lp["name"]: LayerPlan(**lp) for lp in d["layers"]}
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    # ---- views ---------------------------------------------------------------------
    @property
    def ranks(self) -> dict[str, dict[str, int]]:
        """``{layer: hyperparameters}`` of the compressed layers."""
        return {n: dict(lp.hyper) for n, lp in self.layers.items() if lp.compressed}

    def summary(self, max_rows: int | None = None, error_against: str | None = None) -> str:
        """A per-layer table and the totals (measured on the realised model when available).

        ``error_against`` names what the layer errors are relative to when it is not the
        original model (e.g. the previous step of a cascade); the header and a note say so.
        """
        err_head = "error" if error_against is None else f"error vs {error_against}"
        head = ("layer", "type", "shape", "decomposition", err_head, "params", "MACs")
        rows = []
        for lp in self.layers.values():
            rows.append((
                lp.name, lp.kind, "x".join(map(str, lp.shape)), describe(lp.family, lp.hyper),
                f"{lp.error:.4f}", f"{_si(lp.dense_params)} -> {_si(lp.params)}",
                f"{_si(lp.dense_flops)} -> {_si(lp.flops)}",
            ))
        shown = rows if max_rows is None or len(rows) <= max_rows else rows[:max_rows]
        widths = [max(len(h), *(len(r[i]) for r in shown)) if shown else len(h) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in shown]
        if len(shown) < len(rows):
            lines.append(f"... {len(rows) - len(shown)} more layers")
        n_comp = sum(lp.compressed for lp in self.layers.values())
        lines.append("")
        lines.append(f"compressed {n_comp} of {len(self.layers)} candidate layers; "
                     f"objective={self.objective}, largest layer error={self.max_error:.4f}")
        if error_against is not None:
            lines.append(f"(errors are relative to {error_against}, the weights this step compressed; "
                         "params and MACs are against the original layer)")
        if 0.0 < self.network_bound < 1.0:  # above 1 the bound says nothing about the output
            lines.append(f"network bound prod(1+eps)-1 = {self.network_bound:.4f}: the largest relative change "
                         "of the output if every layer's error compounded in the worst way")
        t = self.totals
        if t:
            for key, label in (("params", "params"), ("flops", "MACs")):
                before, after = t.get(f"{key}_before"), t.get(key)
                if before:
                    mark = "  <- budget metric" if key == self.metric else ""
                    lines.append(f"{label:>6}: {before:,} -> {after:,}  ({after / before:.4f} of original)"
                                 f"{mark}")
            if t.get("latency_before"):
                lines.append(f"latency: {t['latency_before'] * 1e3:.3f} ms -> {t['latency'] * 1e3:.3f} ms "
                             f"(IQR {t.get('latency_iqr', 0.0) * 1e3:.3f} ms; {t['latency'] / t['latency_before']:.4f}"
                             f" of original; predicted {t.get('latency_predicted', 0.0) * 1e3:.3f} ms)")
                if t.get("latency_corrections"):
                    lines.append(f"         planned at {t['latency_target']:.4f} of the predicted original after "
                                 f"{t['latency_corrections']} re-plan(s): the first build measured over the budget")
            before = t.get(f"{self.metric}_before")
            if before:
                ratio = t[self.metric] / before
                ok = "within" if ratio <= self.budget + 1e-12 else "OVER"
                lines.append(f"budget: {self.budget:.4f} of {self.metric}; achieved {ratio:.4f} ({ok} budget, "
                             "measured on the realised model)")
        if self.skipped:
            lines.append("")
            lines.append(f"left dense ({len(self.skipped)}):")
            for n, why in self.skipped.items():
                lines.append(f"  {n}: {why}")
        return "\n".join(line.rstrip() for line in lines)


# How each built-in family's hyperparameters read in a table (others: ``name (key value, ...)``);
# keys not named here (solver settings such as ``iters``, ``hooi_iters``, ``seed``) are not shown.
HYPER_FORMATS: dict[str, tuple[tuple[str, str], ...]] = {
    "alds": (("groups", "k={}"), ("rank", "rank {}")),
    "tucker2": (("rank_in", "in {}"), ("rank_out", "out {}")),
    "cp": (("rank", "rank {}"),),
    "spatial_svd": (("rank", "rank {}"),),
    "tt": (("d", "d={}"), ("rank", "rank {}")),
    "sparse_lowrank": (("rank", "rank {}"), ("columns", "+ {} sparse cols")),
    "alrf": (("rank", "rank {}"), ("variant", "variant {}")),
}


def describe(family: str, hyper: dict[str, Any]) -> str:
    """A layer's decomposition in words: ``"dense"``, ``"alds (k=2, rank 16)"``, ``"tucker2 (in 21, out 37)"``."""
    if family == "dense":
        return "dense"
    formats = HYPER_FORMATS.get(family)
    if formats is None:
        parts = [f"{k} {v}" for k, v in hyper.items()]
    else:
        parts = [fmt.format(hyper[k]) for k, fmt in formats if k in hyper]
    return f"{family} ({', '.join(parts)})" if parts else family


def _si(x: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return str(x)
