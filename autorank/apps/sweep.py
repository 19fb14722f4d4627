"""Budget sweeps: compress one model at many budgets with several methods, and tabulate.

A sweep is described by a TOML file (see ``docs/sweeps.md`` and
``budgets/mnist_cnn.toml``) parsed into a validated :class:`SweepConfig`.
:func:`run_sweep` analyses the model and builds its error curves **once**
(per distinct curve setting), then, for every ``method x budget`` row,
allocates, realises, optionally fine-tunes and evaluates, and appends the row
to ``results.json`` / ``results.csv`` as soon as it is finished, so an
interrupted sweep resumes where it stopped.

Models are named by a spec string resolved by :func:`autorank.apps.models.load_model`
(re-exported here with :class:`ModelSpec`, :func:`register_model` and :func:`available_models`).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..allocators import available_allocators
from ..config import METRICS, Compression, CurveConfig, DataAware, SolverConfig, check_budget, resolve_data_parts
from ..finetune import Finetune
from ..graph import analyze
from ..latency import layer_latencies, measure_latency
from ..pipeline import CompressStep, Settings
from ..progress import Progress, progress_scope, stage
from .models import ModelSpec, available_models, load_model, register_model

__all__ = [
    "ModelSpec", "MethodSpec", "FinetuneSpec", "SweepConfig", "register_model", "available_models",
    "load_model", "load_config", "run_sweep", "RESULTS_JSON", "RESULTS_CSV", "CSV_COLUMNS",
]

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
RESULTS_VERSION = 1
DATASETS = ("mnist",)
CSV_COLUMNS = (
    "method", "allocator", "budget", "status", "params", "flops", "params_frac", "flops_frac",
    "latency_ms", "latency_iqr_ms", "speedup", "speedup_low", "speedup_high", "speedup_noisy", "metric_before",
    "metric_after", "max_error", "network_bound", "slower_layers", "wall_s",
)


# ---- config ------------------------------------------------------------------------------

def _unknown(owner: str, data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    bad = sorted(set(data) - set(allowed))
    if bad:
        raise ValueError(f"{owner}: unknown key(s) {', '.join(map(repr, bad))}; allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class MethodSpec:
    """One compression method of a sweep: an allocator plus curve and solver settings.

    name: the label in tables and plots (unique within a sweep).
    allocator: a name from ``autorank.available_allocators()``.
    families: decomposition families competing per layer (``CurveConfig.families``).
    curves / solver: further ``CurveConfig`` / ``SolverConfig`` fields, e.g. ``{objective = "sum"}``.
    data_aware: ``DataAware`` fields for a sweep with calibration data, e.g. ``{sequential = false}``.
    """

    name: str
    allocator: str = "alds"
    families: tuple[str, ...] | None = None
    curves: dict[str, Any] = field(default_factory=dict)
    solver: dict[str, Any] = field(default_factory=dict)
    data_aware: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"methods: name must be a non-empty string, got {self.name!r}")
        where = f"methods[{self.name!r}]"
        if self.allocator not in available_allocators():
            raise ValueError(f"{where}.allocator: unknown allocator {self.allocator!r}; "
                             f"available: {available_allocators()}")
        if self.families is not None:
            fams = (self.families,) if isinstance(self.families, str) else self.families
            if not isinstance(fams, (list, tuple)):
                raise ValueError(f"{where}.families must be a list of names, got {self.families!r}")
            object.__setattr__(self, "families", tuple(fams))
        for key in ("curves", "solver", "data_aware"):
            if not isinstance(getattr(self, key), Mapping):
                raise ValueError(f"{where}.{key} must be a table, got {getattr(self, key)!r}")
        try:
            self.settings("params")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None

    def curve_config(self) -> CurveConfig:
        kw = dict(self.curves)
        if self.families is not None:
            kw["families"] = self.families
        return CurveConfig(**kw)

    def solver_config(self) -> SolverConfig:
        return SolverConfig(**self.solver)

    def settings(self, metric: str) -> Settings:
        """The pipeline settings of this method."""
        return Settings(metric, Compression(curves=self.curve_config(), solver=self.solver_config(),
                                            allocator=self.allocator), DataAware(**self.data_aware))

    @classmethod
    def from_dict(cls, data: Any) -> "MethodSpec":
        if not isinstance(data, Mapping):
            raise ValueError(f"methods: each method must be a table, got {data!r}")
        _unknown(f"methods[{data.get('name', '?')!r}]", data, ("name", "allocator", "families", "curves", "solver",
                                                                 "data_aware"))
        if "name" not in data:
            raise ValueError(f"methods: a method has no name: {dict(data)!r}")
        return cls(**data)


@dataclass(frozen=True)
class FinetuneSpec:
    """Fine-tuning after each compression (the built-in :class:`autorank.Finetune` loop)."""

    epochs: float = 1.0
    lr: float = 1e-3
    distill: bool = True
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("epochs", "lr"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"finetune.{key} must be a positive number, got {v!r}")
        if not isinstance(self.distill, bool):
            raise ValueError(f"finetune.distill must be true or false, got {self.distill!r}")
        for key in ("batch_size", "seed"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "batch_size" else 0):
                raise ValueError(f"finetune.{key} must be a {'positive' if key == 'batch_size' else 'non-negative'} "
                                 f"int, got {v!r}")


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep (see ``docs/sweeps.md`` for the TOML keys).

    model:        model spec string (see :func:`load_model`).
    checkpoint:   optional weights for the model (safetensors or state_dict file).
    input_shape:  optional example-input shape (overrides the model's own example).
    data:         ``"mnist"`` (accuracy on the held-out digits, fine-tuning on the train split) or None.
    metric:       ``"params"`` or ``"flops"``: what the budgets are fractions of.
    budgets:      fractions in (0, 1].
    methods:      :class:`MethodSpec` list (unique names).
    finetune:     :class:`FinetuneSpec` or None (no fine-tuning; needs ``data``).
    calibration:  the number of training samples (the first ones of the ``data`` train split, in
                  batches of 64) given to every method as calibration data, or None (weight-only).
    latency_repeats / latency_threads: settings of :func:`autorank.latency.measure_latency`.
    """

    model: str
    budgets: tuple[float, ...]
    methods: tuple[MethodSpec, ...]
    metric: str = "params"
    data: str | None = None
    checkpoint: str | None = None
    input_shape: tuple[int, ...] | None = None
    finetune: FinetuneSpec | None = None
    latency_repeats: int = 20
    latency_threads: int | None = None
    calibration: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty spec string, got {self.model!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.data is not None and self.data not in DATASETS:
            raise ValueError(f"data must be one of {DATASETS} or absent, got {self.data!r}")
        if not isinstance(self.budgets, (list, tuple)) or not self.budgets:
            raise ValueError(f"budgets must be a non-empty list of fractions in (0, 1], got {self.budgets!r}")
        budgets = []
        for b in self.budgets:
            try:
                budgets.append(check_budget(b))
            except (TypeError, ValueError):
                raise ValueError(f"budgets: {b!r} is not a fraction in (0, 1]") from None
        if len(set(budgets)) != len(budgets):
            raise ValueError(f"budgets: duplicate values in {list(self.budgets)!r}")
        object.__setattr__(self, "budgets", tuple(budgets))
        methods = tuple(m if isinstance(m, MethodSpec) else MethodSpec.from_dict(m) for m in self.methods or ())
        if not methods:
            raise ValueError("methods must list at least one method, e.g. [[methods]] name = \"alds\"")
        names = [m.name for m in methods]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"methods: duplicate name(s) {dup!r}")
        object.__setattr__(self, "methods", methods)
        if self.finetune is not None and not isinstance(self.finetune, FinetuneSpec):
            if not isinstance(self.finetune, Mapping):
                raise ValueError(f"finetune must be a table or absent, got {self.finetune!r}")
            _unknown("finetune", self.finetune, tuple(FinetuneSpec.__dataclass_fields__))
            object.__setattr__(self, "finetune", FinetuneSpec(**self.finetune))
        if self.finetune is not None and self.data is None:
            raise ValueError("finetune needs training data: set data = \"mnist\" or remove [finetune]")
        c = self.calibration
        if c is not None:
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise ValueError(f"calibration must be a number of samples >= 1, got {c!r}")
            if self.data is None:
                raise ValueError("calibration takes its samples from the training data: set data = \"mnist\"")
        for m in methods:  # a part a method demands needs the sweep's calibration data
            try:
                resolve_data_parts(DataAware(**m.data_aware), self.calibration is not None)
            except ValueError as exc:
                raise ValueError(f"methods[{m.name!r}].data_aware: {exc}") from None
        if self.input_shape is not None:
            shape = self.input_shape
            if (not isinstance(shape, (list, tuple)) or not shape
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
                raise ValueError(f"input_shape must be a list of positive ints, got {shape!r}")
            object.__setattr__(self, "input_shape", tuple(shape))
        if self.checkpoint is not None and not isinstance(self.checkpoint, str):
            raise ValueError(f"checkpoint must be a path string, got {self.checkpoint!r}")
        r = self.latency_repeats
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"latency.repeats must be an int >= 1, got {r!r}")
        t = self.latency_threads
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ValueError(f"latency.threads must be an int >= 1, got {t!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SweepConfig":
        """Build from the parsed TOML: top-level keys plus ``[finetune]``, ``[latency]``, ``[[methods]]``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a sweep config must be a table, got {type(data).__name__}")
        _unknown("sweep config", data, ("model", "checkpoint", "input_shape", "data", "metric", "budgets",
                                        "methods", "finetune", "latency", "calibration"))
        for key in ("model", "budgets", "methods"):
            if key not in data:
                raise ValueError(f"sweep config: missing required key {key!r}")
        kw = {k: v for k, v in data.items() if k != "latency"}
        if kw.get("data") in ("none", ""):
            kw["data"] = None
        if kw.get("finetune") is False or kw.get("finetune") == "none":
            kw["finetune"] = None
        lat = data.get("latency", {})
        if not isinstance(lat, Mapping):
            raise ValueError(f"latency must be a table, got {lat!r}")
        _unknown("latency", lat, ("repeats", "threads"))
        if "repeats" in lat:
            kw["latency_repeats"] = lat["repeats"]
        if "threads" in lat:
            kw["latency_threads"] = lat["threads"]
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = [asdict(m) for m in self.methods]
        for m in d["methods"]:
            m["families"] = None if m["families"] is None else list(m["families"])
        d["budgets"] = list(self.budgets)
        d["input_shape"] = None if self.input_shape is None else list(self.input_shape)
        return d


def load_config(path: str | os.PathLike) -> SweepConfig:
    """Read and validate a sweep TOML file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"sweep config {str(p)!r} does not exist")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{p}: invalid TOML: {exc}") from None
    try:
        return SweepConfig.from_dict(data)
    except TypeError as exc:  # e.g. a wrong key type reaching a dataclass constructor
        raise ValueError(f"{p}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from None


# ---- running -----------------------------------------------------------------------------

def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_results(out: Path, state: dict[str, Any]) -> None:
    _write_atomic(out / RESULTS_JSON, json.dumps(state, indent=1))
    tmp = out / (RESULTS_CSV + f".{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in state["rows"]:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    os.replace(tmp, out / RESULTS_CSV)


def read_results(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``results.json`` of a sweep directory."""
    f = Path(out_dir) / RESULTS_JSON
    if not f.is_file():
        raise FileNotFoundError(f"no {RESULTS_JSON} in {str(out_dir)!r}; was it written by autorank sweep?")
    return json.loads(f.read_text())


def curves_data(curves: Mapping[str, Any], max_k: int = 4) -> dict[str, dict[str, dict[str, list]]]:
    """Plain data of the ALDS curves for plots: ``{layer: {k: {"rank": [...], "error": [...]}}}``.

    Up to ``max_k`` values of ``k`` per layer (always ``k = 1``, then the smallest others).
    """
    out: dict[str, dict[str, dict[str, list]]] = {}
    for name, lc in curves.items():
        if "alds" not in lc.families:
            continue
        ks = sorted({int(k) for k in lc.curve("alds")["groups"]})[:max_k]
        out[name] = {}
        for k in ks:
            c = lc.curve("alds", groups=k)
            order = c["rank"].argsort()
            out[name][str(k)] = {"rank": c["rank"][order].tolist(), "error": c["error"][order].tolist(),
                                 "params": c["params"][order].tolist()}
        out[name]["dense"] = {"params": int(lc.info.dense_params), "flops": int(lc.info.dense_flops)}
    return out


def _evaluator(data: str | None):
    if data is None:
        return None, None
    from .zoo import accuracy, load_mnist

    train, test = load_mnist()
    return train, (lambda m: accuracy(m, test))


def _calibration_batches(train: Any, samples: int | None, batch_size: int = 64) -> list[torch.Tensor] | None:
    """The first ``samples`` training inputs in batches of ``batch_size`` (None: no calibration data)."""
    if samples is None:
        return None
    images = torch.stack([train[i][0] for i in range(min(samples, len(train)))])
    return list(images.split(batch_size))


def speedup_spread(base: Mapping[str, float], lat: Mapping[str, float]) -> dict[str, Any]:
    """The speed-up ``base median / row median`` with its spread, from the quartiles of both timings.

    ``speedup_low = base q25 / row q75`` and ``speedup_high = base q75 / row q25`` bound the
    ratio of a typical pair of passes; when ``1`` lies between them the timing noise is as
    large as the effect (``speedup_noisy``), so "faster" or "slower" cannot be read from the row.
    """
    out: dict[str, Any] = {"speedup": base["median_s"] / lat["median_s"], "speedup_low": None,
                           "speedup_high": None, "speedup_noisy": None}
    if base.get("q25_s") and base.get("q75_s") and lat.get("q25_s") and lat.get("q75_s"):
        low, high = base["q25_s"] / lat["q75_s"], base["q75_s"] / lat["q25_s"]
        out.update(speedup_low=low, speedup_high=high, speedup_noisy=bool(low <= 1.0 <= high))
    return out


def run_sweep(config: SweepConfig | str | os.PathLike, out_dir: str | os.PathLike,
              resume: bool = True, model_spec: ModelSpec | None = None,
              progress: bool | None = None) -> dict[str, Any]:
    """Run every ``method x budget`` row of ``config`` and write the results into ``out_dir``.

    The layer graph and the error curves are computed once (per distinct curve
    setting of the methods) and reused for every row.  Each finished row is written
    at once to ``results.json`` (with its plan) and ``results.csv``; with
    ``resume=True`` rows already in ``results.json`` are skipped (the stored config must
    name the same model, data and metric).  ``model_spec`` overrides the config's model
    (tests, or a model built in Python).  ``progress`` (True / False / None = automatic,
    :mod:`autorank.progress`) reports row ``i`` of ``n`` with its method and budget, and
    the steps inside each row.

    Returns the results state (``{"version", "config", "baseline", "rows", ...}``).
    """
    if not isinstance(config, SweepConfig):
        config = load_config(config)
    with progress_scope(progress):
        return _run_sweep(config, Path(out_dir), resume, model_spec, progress)


def _run_sweep(config: SweepConfig, out: Path, resume: bool, model_spec: ModelSpec | None,
               progress: bool | None) -> dict[str, Any]:
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = config.to_dict()
    state: dict[str, Any] = {"version": RESULTS_VERSION, "config": cfg_dict, "baseline": None, "rows": []}
    if resume and (out / RESULTS_JSON).is_file():
        old = read_results(out)
        for key in ("model", "checkpoint", "input_shape", "data", "metric", "calibration"):
            if old.get("config", {}).get(key) != cfg_dict[key]:
                raise ValueError(f"cannot resume in {str(out)!r}: its results were made with {key}="
                                 f"{old.get('config', {}).get(key)!r}, this config has {cfg_dict[key]!r}; "
                                 "use another output folder or resume=False (--no-resume)")
        state["rows"] = old.get("rows", [])
        state["baseline"] = old.get("baseline")
        state["config"] = cfg_dict
    done = {(r["method"], r["budget"]) for r in state["rows"]}
    todo = [(m, b) for m in config.methods for b in config.budgets if (m.name, b) not in done]
    log.info("sweep: %d rows, %d already done, %d to run", len(config.methods) * len(config.budgets),
             len(config.methods) * len(config.budgets) - len(todo), len(todo))
    if not todo:
        return state

    t0 = time.perf_counter()
    spec = model_spec or load_model(config.model, config.checkpoint, config.input_shape)
    model, x = spec.model, spec.example_inputs
    if config.metric == "latency":  # a latency budget is a fraction of the time on the batch latency is reported on
        x = spec.latency_inputs
    train, evaluate = _evaluator(config.data)
    with stage("sweep: analysis and the original's latency", progress):
        graph = analyze(model, x)
        base_lat = measure_latency(model, spec.latency_inputs, config.latency_repeats,
                                   threads=config.latency_threads)
    import networkx as nx

    _write_atomic(out / "graph.json", json.dumps(nx.node_link_data(graph.graph, edges="edges"), default=str))
    if state["baseline"] is None:
        state["baseline"] = {
            "params": graph.total_params, "flops": graph.total_flops,
            "metric": evaluate(model) if evaluate else None,
            "latency_ms": base_lat["median_s"] * 1e3,
        }
    # this run's timing of the original: the speed-ups of its rows are against it
    state["baseline"].update(latency_ms=base_lat["median_s"] * 1e3, latency_q25_ms=base_lat["q25_s"] * 1e3,
                             latency_q75_ms=base_lat["q75_s"] * 1e3)
    log.info("sweep: analysed %s in %.1fs; original latency %.2f ms", config.model,
             time.perf_counter() - t0, base_lat["median_s"] * 1e3)

    calibration = _calibration_batches(train, config.calibration)
    prepared: dict[str, Any] = {}  # per distinct curve and data setting: the graph, moments and curves
    alloc_cache: dict[str, Any] = {}  # e.g. the sensitivity allocator's table, shared by all rows
    rows = Progress("sweep rows", total=len(todo), progress=progress, unit="row", interval=0)
    try:
        for method, budget in todo:
            rows.announce(f"{method.name} @ budget {budget:g}")
            _run_row(config, out, state, method, budget, model, x, spec, train, evaluate, graph, base_lat,
                     calibration, prepared, alloc_cache, progress)
            rows.update(1, f"{method.name} @ {budget:g}")
    finally:
        rows.close(rows.n == len(todo))
    state["timings"] = {"last_run_s": time.perf_counter() - t0}
    _write_results(out, state)
    return state


def _run_row(config: SweepConfig, out: Path, state: dict[str, Any], method: MethodSpec, budget: float,
             model: Any, x: Any, spec: ModelSpec, train: Any, evaluate: Any, graph: Any, base_lat: dict[str, Any],
             calibration: Any, prepared: dict[str, Any], alloc_cache: dict[str, Any],
             progress: bool | None) -> None:
    """One ``method x budget`` row: compress, fine-tune, evaluate, time; appended to the results at once."""
    t_row = time.perf_counter()
    step = CompressStep(x, method.settings(config.metric), calibration=calibration, evaluate=evaluate,
                        progress=progress)
    key = json.dumps({"curves": step.settings.curves.to_dict(), "data": step.parts}, sort_keys=True)
    if key not in prepared:
        t = time.perf_counter()
        prepared[key] = step.prepare(model)
        log.info("sweep: error curves (%s) in %.1fs", key, time.perf_counter() - t)
        if not (out / "curves.json").is_file():
            _write_atomic(out / "curves.json", json.dumps(curves_data(prepared[key].curves)))
    row: dict[str, Any] = {"method": method.name, "allocator": method.allocator, "budget": budget}
    work = copy.deepcopy(model)  # the original stays the teacher and the reference
    try:
        result = step(work, budget, prepared=prepared[key], cache=alloc_cache)
    except ValueError as exc:
        log.warning("sweep: %s at budget %g: %s", method.name, budget, exc)
        row.update(status=f"infeasible: {exc}", wall_s=time.perf_counter() - t_row)
        state["rows"].append(row)
        _write_results(out, state)
        return
    plan = result.plan
    row["allocator"] = plan.config["allocator"]  # what ran (alds_output in place of alds with calibration)
    before = evaluate(work) if evaluate else None
    after = None
    if config.finetune is not None:
        ft = config.finetune
        Finetune(train, epochs=ft.epochs, lr=ft.lr, distill=ft.distill, batch_size=ft.batch_size,
                 seed=ft.seed, progress=progress)(work, 0, teacher=model if ft.distill else None)
        after = evaluate(work) if evaluate else None
    lat = measure_latency(work, spec.latency_inputs, config.latency_repeats, threads=config.latency_threads)
    per_layer = layer_latencies(model, work, plan, spec.latency_inputs, config.latency_repeats,
                                threads=config.latency_threads)
    slower = [r["name"] for r in per_layer if r["slower"]]
    if slower:
        log.warning("sweep: %s @ %g: factorised layer(s) measured slower than dense: %s",
                    method.name, budget, ", ".join(slower))
    row.update(
        status="ok", params=plan.totals["params"], flops=plan.totals["flops"],
        params_frac=plan.totals["params"] / graph.total_params,
        flops_frac=plan.totals["flops"] / max(graph.total_flops, 1),
        latency_ms=lat["median_s"] * 1e3, latency_iqr_ms=lat["iqr_s"] * 1e3,
        **speedup_spread(base_lat, lat), metric_before=before, metric_after=after,
        max_error=plan.max_error, network_bound=plan.network_bound,
        slower_layers=" ".join(slower), layer_latency=per_layer,
        wall_s=time.perf_counter() - t_row, plan=plan.to_dict(),
    )
    state["rows"].append(row)
    _write_results(out, state)
    log.info("sweep: %s @ %g: %s params, metric %s -> %s, %.1fs", method.name, budget,
             f"{row['params']:,}", before, after, row["wall_s"])


def results_table(state: Mapping[str, Any]) -> str:
    """The rows of a sweep as a text table (for the CLI and the docs)."""
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    head = ("method", "budget", "params", "MACs", "latency ms", "speed-up [q25/q75 range]", "metric before",
            "metric after", "max error", "wall s")

    def speed(r: Mapping[str, Any]) -> str:
        text = f(r.get("speedup"), ".2f")
        if r.get("speedup_low") is not None and r.get("speedup_high") is not None:
            text += f" [{r['speedup_low']:.2f}-{r['speedup_high']:.2f}]" + (" ~" if r.get("speedup_noisy") else "")
        return text

    rows = []
    base = state.get("baseline") or {}
    if base:
        rows.append(("original", "1", f"{base['params']:,}", f"{base['flops']:,}", f(base.get("latency_ms"), ".2f"),
                     "1.00", f(base.get("metric"), ".2f"), "-", "0", "-"))
    for r in state.get("rows", []):
        if r.get("status") != "ok":
            rows.append((r["method"], f"{r['budget']:g}", r.get("status", "?")[:40], *("-",) * 7))
            continue
        rows.append((r["method"], f"{r['budget']:g}", f"{r['params']:,}", f"{r['flops']:,}",
                     f(r["latency_ms"], ".2f"), speed(r), f(r["metric_before"], ".2f"),
                     f(r["metric_after"], ".2f"), f(r["max_error"], ".4f"), f(r["wall_s"], ".1f")))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = "  ".join(f"{{:>{w}}}" for w in widths)
    lines = [line.format(*head), line.format(*("-" * w for w in widths))] + [line.format(*r) for r in rows]
    noisy = [r for r in state.get("rows", []) if r.get("status") == "ok" and r.get("speedup_noisy")]
    if noisy:
        lines.append(f"~ {len(noisy)} row(s): the timing spread includes 1.00x, so the noise is as large as "
                     "the effect; neither faster nor slower can be read from them (a busy machine? "
                     "raise [latency] repeats or fix threads)")
    return "\n".join(ln.rstrip() for ln in lines)
