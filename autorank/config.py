"""Validated configuration dataclasses.  Every check raises ``ValueError`` / ``TypeError`` naming the bad value."""

from __future__ import annotations

import math
import os
from dataclasses import InitVar, asdict, dataclass, field, fields, replace
from typing import Any

from .registry import FAMILIES
from .validate import check_choice, check_count, check_int

__all__ = ["CurveConfig", "SolverConfig", "LatencyConfig", "Compression", "DataAware", "Retrain", "check_budget",
           "check_metric", "resolve_data_parts", "as_config", "rank_multiple", "METRICS", "HARDWARE_RANK_MULTIPLE"]

METRICS = ("params", "flops", "latency")

#: the default rank multiple under ``metric="latency"`` (``CurveConfig.rank_multiple=None``): measured on
#: the AVX-512 CPU of this project, a conv pair's time rises in steps of 16 ranks and a Linear pair's has
#: its minima at multiples of 8 and 16 (docs/latency.md, "Hardware-friendly ranks")
HARDWARE_RANK_MULTIPLE = 16
OBJECTIVES = ("max", "sum")
METHODS = ("auto", "bisect", "lagrangian", "dp")
ERROR_BOUNDS = ("upper", "max")


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
    rank_multiple:
        keep only candidates whose ranks (every hyperparameter named ``rank*``) are multiples of
        this ``m``, on any metric (kernels work in tiles, so such ranks are the fast ones).
        ``None`` (default): :data:`HARDWARE_RANK_MULTIPLE` under ``metric="latency"``, 1 otherwise
        (:func:`rank_multiple`).
    """

    families: tuple[str, ...] = ("alds",)
    max_groups: int = 8
    groups: tuple[int, ...] | None = None
    error_bound: str = "upper"
    grid_points: int = 16
    options: dict[str, dict[str, Any]] | None = None
    rank_multiple: int | None = None

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
        check_int("CurveConfig.max_groups", self.max_groups, low=1)
        if self.groups is not None:
            if not isinstance(self.groups, (tuple, list)) or not self.groups:
                raise ValueError(f"CurveConfig.groups must be a non-empty sequence of ints, got {self.groups!r}")
            for g in self.groups:
                check_int("CurveConfig.groups[...]", g, low=1)
            object.__setattr__(self, "groups", tuple(sorted(set(self.groups))))
        check_choice("CurveConfig.error_bound", self.error_bound, ERROR_BOUNDS)
        check_int("CurveConfig.grid_points", self.grid_points, low=2)
        check_int("CurveConfig.rank_multiple", self.rank_multiple, low=1, optional=True)
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
        check_choice("SolverConfig.objective", self.objective, OBJECTIVES)
        check_choice("SolverConfig.method", self.method, METHODS)
        if self.objective == "max" and self.method not in ("auto", "bisect"):
            raise ValueError(f"SolverConfig.method={self.method!r} applies to objective='sum' only")
        if self.objective == "sum" and self.method == "bisect":
            raise ValueError("SolverConfig.method='bisect' applies to objective='max' only")
        if not isinstance(self.fill, bool):
            raise TypeError(f"SolverConfig.fill must be a bool, got {self.fill!r}")
        check_int("SolverConfig.dp_bins", self.dp_bins, low=10)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rank_multiple(config: CurveConfig, metric: str) -> int:
    """The rank multiple that applies: ``config.rank_multiple``, else the metric's default."""
    if config.rank_multiple is not None:
        return config.rank_multiple
    return HARDWARE_RANK_MULTIPLE if metric == "latency" else 1


@dataclass(frozen=True)
class LatencyConfig:
    """How latency is measured for ``metric="latency"`` (see docs/latency.md).

    threads:       ``torch.set_num_threads`` while timing (restored afterwards).
    repeats:       interleaved timing rounds per candidate (the median is kept).
    warmup:        untimed rounds first.
    min_time_s:    each timed sample repeats a call until it lasts at least this long (tiny layers).
    grid_ratio:    ranks are timed on a grid: the first ``grid_linear`` candidate ranks, then each
                   next one at least ``grid_ratio`` times the last; the rest are interpolated upwards.
    grid_linear:   see ``grid_ratio``.
    final_repeats: passes of the realised model that are timed at the end.
    clock:         ``"auto"`` (the thread's CPU time on a CPU with ``threads=1``, where it is the
                   latency on an unloaded core; wall-clock time otherwise), ``"wall"`` or ``"cpu"``.
    cache:         a directory for the measured tables (keyed by device, dtype, threads, layer
                   geometry and input shape); ``True`` (default): ``latency/`` in the user cache
                   folder (:func:`autorank._util.user_cache_dir`, ``$AUTORANK_CACHE`` overrides
                   it), so runs from any working directory share it; None (or False): no cache.
    corrections:   when the realised model measures over the budget by more than the measurement
                   spread (the layers' times, taken one layer at a time, can add up to less than
                   the whole model's), re-plan at ``predicted * budget / measured`` and rebuild, at
                   most this many times (0: never; docs/latency.md, "The closed loop").  The plan's
                   totals record ``latency_target`` and ``latency_corrections``.
    """

    threads: int = 1
    repeats: int = 7
    warmup: int = 1
    min_time_s: float = 1e-3
    grid_ratio: float = 1.25
    grid_linear: int = 8
    final_repeats: int = 20
    clock: str = "auto"
    cache: Any = True
    corrections: int = 2

    def __post_init__(self) -> None:
        check_count("LatencyConfig.threads", self.threads)
        check_count("LatencyConfig.corrections", self.corrections, low=0)
        check_count("LatencyConfig.repeats", self.repeats)
        check_count("LatencyConfig.warmup", self.warmup, low=0)
        check_count("LatencyConfig.grid_linear", self.grid_linear)
        check_count("LatencyConfig.final_repeats", self.final_repeats)
        check_choice("LatencyConfig.clock", self.clock, ("auto", "wall", "cpu"))
        if isinstance(self.min_time_s, bool) or not isinstance(self.min_time_s, (int, float)) \
                or not 0 <= self.min_time_s < math.inf:
            raise ValueError(f"LatencyConfig.min_time_s must be a finite number >= 0, got {self.min_time_s!r}")
        if isinstance(self.grid_ratio, bool) or not isinstance(self.grid_ratio, (int, float)) \
                or not 1 < self.grid_ratio < math.inf:
            raise ValueError(f"LatencyConfig.grid_ratio must be a number > 1, got {self.grid_ratio!r}")
        if self.cache is False:  # as the other cache switches (TOML has no None)
            object.__setattr__(self, "cache", None)
        if self.cache is not None and self.cache is not True:
            if not isinstance(self.cache, (str, os.PathLike)):
                raise TypeError(f"LatencyConfig.cache must be a directory path, True or None, got {self.cache!r}")
            object.__setattr__(self, "cache", os.fspath(self.cache))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- the grouped settings of optimize ------------------------------------------------------------

def _from_dict(cls: type, data: Any, nested: dict[str, type] | None = None) -> Any:
    """``cls(**data)`` with unknown keys rejected by name and ``nested`` fields built from their dicts."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}.from_dict needs a dict, got {type(data).__name__}")
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known - {"version"})
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; known: {sorted(known)}")
    version = data.get("version", 1)
    if version != 1:
        raise ValueError(f"{cls.__name__}: version {version!r} is not one this autorank reads (1)")
    kw = {k: v for k, v in data.items() if k != "version"}
    for key, sub in (nested or {}).items():
        if isinstance(kw.get(key), dict):
            kw[key] = sub(**kw[key])
    return cls(**kw)


def callable_name(fn: Any) -> str:
    """A string as is; else the name of a function (of the function inside a ``functools.partial``)."""
    if isinstance(fn, str):
        return fn
    func = getattr(fn, "func", fn)
    return getattr(func, "__name__", type(func).__name__)


def as_config(value: Any, cls: type, name: str) -> Any:
    """``value`` as a ``cls``: None gives the defaults, a dict its fields; anything else is a TypeError."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise TypeError(f"{name} must be a {cls.__name__} (autorank.{cls.__name__}), a dict of its fields or None, "
                    f"got {type(value).__name__}")


@dataclass(frozen=True)
class Compression:
    """What to compress, how its candidates are made and how they are chosen.

    curves:     the local step (:class:`CurveConfig`): families, candidate groups, error bound.
    families:   shorthand for ``curves=CurveConfig(families=...)`` (it replaces ``curves.families``).
    solver:     the global step (:class:`SolverConfig`).
    allocator:  the rank-selection rule: a name from ``autorank.available_allocators()`` or a
                callable of an ``AllocationContext`` (a callable is recorded by its name and does
                not round-trip through JSON).  With calibration data and the default ``"alds"``,
                :class:`DataAware` may switch it to ``"alds_output"``.
    exclude:    ``fnmatch`` patterns of qualified module names to keep dense.
    embeddings: also factorise ``nn.Embedding`` tables (not tied ones).
    latency:    how latency is measured under ``metric="latency"`` (:class:`LatencyConfig`).
    """

    curves: CurveConfig = field(default_factory=CurveConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    allocator: Any = "alds"
    exclude: tuple[str, ...] = ()
    embeddings: bool = False
    families: InitVar[Any] = None
    version: int = field(default=1, init=False)

    def __post_init__(self, families: Any) -> None:
        object.__setattr__(self, "curves", as_config(self.curves, CurveConfig, "Compression.curves"))
        object.__setattr__(self, "solver", as_config(self.solver, SolverConfig, "Compression.solver"))
        object.__setattr__(self, "latency", as_config(self.latency, LatencyConfig, "Compression.latency"))
        if families is not None:
            object.__setattr__(self, "curves", replace(self.curves, families=families))
        if not (isinstance(self.allocator, str) or callable(self.allocator)):
            raise TypeError(f"Compression.allocator must be a name or a callable, got {self.allocator!r}")
        exclude = (self.exclude,) if isinstance(self.exclude, str) else self.exclude
        try:
            exclude = tuple(exclude)
        except TypeError:
            raise TypeError(f"Compression.exclude must be a sequence of name patterns, got {self.exclude!r}") from None
        if not all(isinstance(p, str) for p in exclude):
            raise TypeError(f"Compression.exclude must hold name patterns (strings), got {self.exclude!r}")
        object.__setattr__(self, "exclude", exclude)
        if not isinstance(self.embeddings, bool):
            raise TypeError(f"Compression.embeddings must be a bool, got {self.embeddings!r}")

    @property
    def allocator_name(self) -> str:
        """The allocator's registered name (a callable's name)."""
        return callable_name(self.allocator)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "curves": self.curves.to_dict(), "solver": self.solver.to_dict(),
                "allocator": self.allocator_name, "exclude": list(self.exclude), "embeddings": self.embeddings,
                "latency": self.latency.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Compression":
        return _from_dict(cls, data, {"curves": CurveConfig, "solver": SolverConfig, "latency": LatencyConfig})


#: the parts of the data-aware recipe, in the order they act (see docs/data_aware.md)
DATA_PARTS = ("output_weighting", "output_allocation", "sequential", "streaming")


@dataclass(frozen=True)
class DataAware:
    """How calibration data is used (``optimize(..., calibration=batches)``).

    Each part is ``None`` (the default: decided by :func:`resolve_data_parts`), ``True``
    (required: an error without calibration data) or ``False`` (off, e.g. for ablations or speed).

    output_weighting:  two-sided whitened errors and factors, each layer's output error
                       weighted by its output Gauss-Newton moment (:mod:`autorank.calibration`).
    output_allocation: with the default allocator ``"alds"``, allocate with ``"alds_output"``,
                       which weighs each layer by how much its error moves the model's output.
    sequential:        refit the factorised layers in execution order to the original layers'
                       outputs on the compressed model's own inputs (:mod:`autorank.sequential`).
    streaming:         calibrate and build block by block on a model that is a chain of blocks
                       (a transformer), one block's moments in memory at a time
                       (:mod:`autorank.stream`); by default whenever the chain is found and checks
                       out, ``True`` makes a model without one an error.
    output:            ``fn(model_output) -> Tensor``: the output the output-aware parts measure
                       (default: the primary output tensor); not recorded in JSON.
    """

    output_weighting: bool | None = None
    output_allocation: bool | None = None
    sequential: bool | None = None
    streaming: bool | None = None
    output: Any = None
    version: int = field(default=1, init=False)

    def __post_init__(self) -> None:
        for name in DATA_PARTS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"DataAware.{name} must be a bool or None, got {value!r}")
        if self.output is not None and not callable(self.output):
            raise TypeError(f"DataAware.output must be a callable fn(model_output) -> Tensor or None, "
                            f"got {self.output!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, **{name: getattr(self, name) for name in DATA_PARTS}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataAware":
        return _from_dict(cls, data)


#: the default of each data-aware part when calibration data is given and the part is None
DATA_DEFAULTS = {"output_weighting": True, "output_allocation": True, "sequential": True, "streaming": True}

#: the parts that need the output moments of every layer at once (``8 f^2`` bytes per layer): by default
#: they are off on a model where those would take more than :data:`OUTPUT_MOMENTS_LIMIT` bytes and more
#: than half the model's own bytes (see :func:`resolve_data_parts`)
OUTPUT_PARTS = ("output_weighting", "output_allocation")
OUTPUT_MOMENTS_LIMIT = 512 * 2 ** 20


def resolve_data_parts(data: DataAware, calibrated: bool, heavy: bool = False) -> dict[str, bool]:
    """Which parts of the data-aware recipe run: the explicit choices, else :data:`DATA_DEFAULTS`.

    Without calibration data every part is off, and asking for one is a ``ValueError``.
    ``heavy``: the output moments would not fit (:data:`OUTPUT_PARTS`); the output-aware
    parts left at ``None`` are then off.
    """
    if not calibrated:
        asked = [name for name in DATA_PARTS if getattr(data, name) is True]
        if asked:
            raise ValueError(f"DataAware.{asked[0]}=True uses calibration data: pass calibration=...")
        return {name: False for name in DATA_PARTS}
    return {name: (DATA_DEFAULTS[name] and not (heavy and name in OUTPUT_PARTS)) if getattr(data, name) is None
            else getattr(data, name) for name in DATA_PARTS}


SCHEDULE_NAMES = ("one-shot", "linear", "geometric")
MODES = ("cascade", "one-shot")


@dataclass(frozen=True)
class Retrain:
    """How the compress -> fine-tune schedule runs (with ``optimize(..., finetune=..., steps=n)``).

    schedule:   ``"one-shot"``, ``"linear"``, ``"geometric"`` or an explicit list of strictly
                decreasing budgets ending at the target (see :mod:`autorank.retrain`).
    mode:       ``"cascade"`` compresses the fine-tuned model further at each step;
                ``"one-shot"`` compresses the original model each time.
    min_metric: stop early once ``evaluate`` falls below this value (the result is then the last
                step that met it, at a larger budget than asked).
    checkpoint: a directory where every finished step is saved; a re-run resumes from it.
    """

    schedule: Any = "geometric"
    mode: str = "cascade"
    min_metric: float | None = None
    checkpoint: Any = None
    version: int = field(default=1, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.schedule, str):
            if self.schedule not in SCHEDULE_NAMES:
                raise ValueError(f"schedule must be one of {SCHEDULE_NAMES} or a list of budgets, "
                                 f"got {self.schedule!r}")
        elif isinstance(self.schedule, (list, tuple)):
            budgets = tuple(check_budget(b) for b in self.schedule)
            if not budgets:
                raise ValueError("schedule: an explicit list of budgets must not be empty")
            if any(b2 >= b1 for b1, b2 in zip(budgets, budgets[1:])):
                raise ValueError(f"schedule: budgets must decrease strictly, got {list(self.schedule)}")
            object.__setattr__(self, "schedule", budgets)
        else:
            raise TypeError(f"schedule must be a name or a list of budgets, got {type(self.schedule).__name__}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        m = self.min_metric
        if m is not None:
            if isinstance(m, bool) or not isinstance(m, (int, float)) or math.isnan(m):
                raise TypeError(f"min_metric must be a number, got {m!r}")
            object.__setattr__(self, "min_metric", float(m))
        if self.checkpoint is not None and not isinstance(self.checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a directory path, got {type(self.checkpoint).__name__}")
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", os.fspath(self.checkpoint))

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version,
                "schedule": self.schedule if isinstance(self.schedule, str) else list(self.schedule),
                "mode": self.mode, "min_metric": self.min_metric,
                "checkpoint": None if self.checkpoint is None else os.fspath(self.checkpoint)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Retrain":
        return _from_dict(cls, data)
