"""Validated configuration dataclasses.  Every check raises ``ValueError`` / ``TypeError`` naming the bad value."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .registry import FAMILIES

__all__ = ["CurveConfig", "SolverConfig", "check_budget", "check_metric", "METRICS"]

METRICS = ("params", "flops")
OBJECTIVES = ("max", "sum")
METHODS = ("auto", "bisect", "lagrangian", "dp")
ERROR_BOUNDS = ("upper", "max")


def _check_int(owner: str, name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{owner}.{name} must be >= {low}, got {value!r}")


def _check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {choices}, got {value!r}")


def check_budget(budget: Any) -> float:
    """A budget is the fraction of the model's parameters (or FLOPs) that may remain: a number in (0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a number in (0, 1], got {budget!r} ({type(budget).__name__})")
    b = float(budget)
    if not math.isfinite(b) or not 0.0 < b <= 1.0:
        raise ValueError(f"budget must be a fraction in (0, 1] of the original size, got {budget!r}")
    return b


def check_metric(metric: Any) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


@dataclass(frozen=True)
class CurveConfig:
    """Settings of the local step (error curves).

    families:
        decomposition families that compete for every layer (see ``available_families()``).
    max_groups:
        default candidate numbers of channel groups ``k`` are the divisors of the
        layer's input channels that are ``<= max_groups`` (``k = 1`` is plain SVD).
    groups:
        explicit candidate ``k`` values instead (those that do not divide a layer's
        input channels are skipped for that layer; ``k = 1`` is always kept).
    error_bound:
        ``"upper"`` (default): ``sqrt(sum_i sigma_{j+1}(W_i)^2) / sigma_1(W)``, a
        guaranteed upper bound on ``||W - W_hat||_2 / ||W||_2``;
        ``"max"``: the reference's ``max_i sigma_{j+1}(W_i) / sigma_1(W)``, a lower
        bound.  Both are exact for ``k = 1``.  (With calibration data every error
        is the exact data-aware one and this setting does not apply.)
    grid_points:
        families whose error is measured on the factorisation itself (spatial SVD,
        Tucker-2, CP, Tensor-Train, sparse + low-rank) try at most this many ranks
        per layer (see :func:`autorank.measures.rank_grid`).
    options:
        per-family settings, ``{family: {option: value}}`` (e.g.
        ``{"tucker2": {"hooi_iters": 5}}``); each family documents and validates its own.
    """

    families: tuple[str, ...] = ("alds",)
    max_groups: int = 8
    groups: tuple[int, ...] | None = None
    error_bound: str = "upper"
    grid_points: int = 16
    options: dict[str, dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        fams = self.families
        if isinstance(fams, str):
            fams = (fams,)
        if not isinstance(fams, (tuple, list)) or not fams:
            raise ValueError(f"CurveConfig.families must be a non-empty sequence of names, got {self.families!r}")
        for f in fams:
            if f not in FAMILIES:
                raise ValueError(
                    f"CurveConfig.families: unknown family {f!r}; available: {FAMILIES.names()}"
                )
        object.__setattr__(self, "families", tuple(fams))
        _check_int("CurveConfig", "max_groups", self.max_groups, 1)
        if self.groups is not None:
            if not isinstance(self.groups, (tuple, list)) or not self.groups:
                raise ValueError(f"CurveConfig.groups must be a non-empty sequence of ints, got {self.groups!r}")
            for g in self.groups:
                _check_int("CurveConfig", "groups[...]", g, 1)
            object.__setattr__(self, "groups", tuple(sorted(set(self.groups))))
        _check_choice("CurveConfig", "error_bound", self.error_bound, ERROR_BOUNDS)
        _check_int("CurveConfig", "grid_points", self.grid_points, 2)
        if self.options is not None:
            if not isinstance(self.options, dict):
                raise TypeError(f"CurveConfig.options must be a dict {{family: {{option: value}}}}, got {self.options!r}")
            for fam, opts in self.options.items():
                if fam not in FAMILIES:
                    raise ValueError(f"CurveConfig.options: unknown family {fam!r}; available: {FAMILIES.names()}")
                if not isinstance(opts, dict):
                    raise TypeError(f"CurveConfig.options[{fam!r}] must be a dict of options, got {opts!r}")

    def family_options(self, family: str) -> dict[str, Any]:
        """The options given for ``family`` (empty when none)."""
        return dict((self.options or {}).get(family, {}))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["families"] = list(self.families)
        d["groups"] = None if self.groups is None else list(self.groups)
        return d


@dataclass(frozen=True)
class SolverConfig:
    """Settings of the global step.

    objective:
        ``"max"`` (ALDS): minimise the largest layer error ``max_l eps_l``, solved
        exactly by bisection on the error threshold;
        ``"sum"``: minimise ``sum_l log(1 + eps_l)``, i.e. the network bound
        ``prod_l (1 + eps_l) - 1``, a multiple-choice knapsack.
    method:
        ``"auto"``: ``"bisect"`` for ``"max"``, ``"lagrangian"`` for ``"sum"``;
        ``"lagrangian"``: bisection on the multiplier, then a greedy fill of the
        remaining budget; ``"dp"``: dynamic programming over costs rounded up to
        ``dp_bins`` bins of the budget (never over budget).
    fill:
        for ``"max"``: after the optimal threshold is found, spend the budget that
        is left on the sum objective without raising the largest error.
    """

    objective: str = "max"
    method: str = "auto"
    fill: bool = True
    dp_bins: int = 2000

    def __post_init__(self) -> None:
        _check_choice("SolverConfig", "objective", self.objective, OBJECTIVES)
        _check_choice("SolverConfig", "method", self.method, METHODS)
        if self.objective == "max" and self.method not in ("auto", "bisect"):
            raise ValueError(f"SolverConfig.method={self.method!r} applies to objective='sum' only")
        if self.objective == "sum" and self.method == "bisect":
            raise ValueError("SolverConfig.method='bisect' applies to objective='max' only")
        if not isinstance(self.fill, bool):
            raise TypeError(f"SolverConfig.fill must be a bool, got {self.fill!r}")
        _check_int("SolverConfig", "dp_bins", self.dp_bins, 10)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
