"""The front door: :func:`optimize`."""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from .allocators import allocate, solve_curves
from .config import CurveConfig, SolverConfig, check_budget, check_metric
from .curves import LayerCurves, build_curves
from .graph import LayerGraph, analyze, count_flops, count_params
from .plan import LayerPlan, Plan
from .realize import realize
from .solver import network_bound

__all__ = ["optimize", "allocate", "solve_curves", "make_plan", "fixed_cost", "measure_totals",
           "OptimizeResult", "CompressStep"]

log = logging.getLogger(__name__)


@dataclass
class OptimizeResult:
    """What :func:`optimize` returns.

    model:   the compressed model (a new module unless ``inplace=True``).
    plan:    per-layer decisions and measured totals (:class:`autorank.Plan`).
    graph:   the analysed layer graph of the model that was compressed (None when the
             result was restored from a checkpoint).
    curves:  the candidates of every layer (``{name: LayerCurves}``).
    timings: seconds spent in each stage.
    history: per-step records of a compress -> fine-tune schedule (budget, params,
             FLOPs, metric after compression and after fine-tuning, times).
    """

    model: nn.Module
    plan: Plan
    graph: LayerGraph | None
    curves: dict[str, LayerCurves]
    timings: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    original: nn.Module | None = field(default=None, repr=False, compare=False)
    example_inputs: Any = field(default=None, repr=False, compare=False)

    def summary(self, max_rows: int | None = None, latency: bool = False, repeats: int = 20,
                threads: int | None = None) -> str:
        """Per-layer table, measured totals and, for scheduled runs, the per-step history.

        With ``latency=True`` the original and the compressed model, and every
        factorised layer against its dense original, are timed on the CPU (median of
        ``repeats`` runs after a warm-up, ``threads`` fixes the thread count), and
        layers measured slower than dense are flagged.
        """
        text = self.plan.summary(max_rows=max_rows)
        ref = self.plan.config.get("refine")
        if ref:
            text += (f"\n\nrefine (Optuna, seed {ref['seed']}): best trial {ref['best_trial']} of {ref['n_trials']} "
                     f"({ref['pruned']} pruned), metric {ref['best_metric']:.4f} vs unrefined "
                     f"{ref['baseline_metric']:.4f} (gain {ref['gain']:+.4f}); best settings {ref['best_params']}")
        if self.history:
            text += "\n\n" + history_table(self.history)
        if latency:
            text += "\n\n" + self.latency_report(repeats=repeats, threads=threads)
        return text

    def latency_report(self, repeats: int = 20, threads: int | None = None) -> str:
        """Measured forward latency: whole model and per factorised layer, original vs compressed."""
        from .latency import layer_latencies, measure_latency

        if self.original is None or self.example_inputs is None:
            raise ValueError("latency needs the original model and example inputs; this result has none "
                             "(inplace=True, or restored from a checkpoint)")
        dense = measure_latency(self.original, self.example_inputs, repeats=repeats, threads=threads)
        comp = measure_latency(self.model, self.example_inputs, repeats=repeats, threads=threads)
        lines = [f"latency (median of {repeats}, CPU): original {dense['median_s'] * 1e3:.3f} ms -> "
                 f"compressed {comp['median_s'] * 1e3:.3f} ms  (speed-up {dense['median_s'] / comp['median_s']:.2f}x)"]
        rows = layer_latencies(self.original, self.model, self.plan, self.example_inputs, repeats=repeats,
                               threads=threads)
        for r in rows:
            flag = "  <- SLOWER than dense" if r["slower"] else ""
            lines.append(f"  {r['name']}: {r['dense_ms']:.3f} ms -> {r['compressed_ms']:.3f} ms "
                         f"({r['speedup']:.2f}x){flag}")
        slower = sum(r["slower"] for r in rows)
        if slower:
            lines.append(f"{slower} factorised layer(s) measured slower than dense")
        return "\n".join(lines)

    def save(self, path) -> Any:
        """Save the plan (JSON) and the compressed weights (safetensors) into directory ``path``."""
        from .io import save

        return save(self.model, self.plan, path)


def history_table(history: Sequence[Mapping[str, Any]]) -> str:
    """The per-step history of a schedule as a text table."""
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else f"{v:,}"

    head = ("step", "budget", "params", "MACs", "metric compressed", "metric", "max error", "time s")
    rows = [(str(h["step"]), f"{h['budget']:.4f}", f"{h['params']:,}", f"{h['flops']:,}",
             fmt(h.get("metric_compressed")), fmt(h.get("metric")), f"{h.get('max_error', 0.0):.4f}",
             f"{h.get('time_s', 0.0):.1f}") for h in history]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(head)]
    line = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([line.format(*head), line.format(*("-" * w for w in widths))] + [line.format(*r) for r in rows])


def _as_config(value: Any, cls: type, name: str):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls(**value)
    raise TypeError(f"{name} must be a {cls.__name__}, a dict of its fields or None, got {type(value).__name__}")


def fixed_cost(curves: Mapping[str, LayerCurves], metric: str, total: int) -> int:
    """The part of ``total`` outside the layers that have curves (it counts towards the budget as is)."""
    return total - sum(lc.info.dense_params if metric == "params" else lc.info.dense_flops
                       for lc in curves.values())


def measure_totals(graph: LayerGraph, model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Params and MACs of the original (from ``graph``) and of ``model``, measured on the module."""
    return {
        "params_before": graph.total_params,
        "flops_before": graph.total_flops,
        "params": count_params(model),
        "flops": count_flops(model, example_inputs),
    }


def make_plan(
    curves: Mapping[str, LayerCurves],
    picked: Mapping[str, int],
    metric: str,
    budget: float,
    objective: str,
    skipped: Mapping[str, str] | None = None,
    config: dict[str, Any] | None = None,
) -> Plan:
    """The :class:`Plan` for candidate ``picked[name]`` of every layer's curves."""
    layers: dict[str, LayerPlan] = {}
    for name, idx in picked.items():
        lc = curves[name]
        cand = lc.candidate(idx)
        info = lc.info
        layers[name] = LayerPlan(
            name=name, kind=info.kind, shape=[info.out_features, info.in_channels, *info.kernel],
            family=cand["family"], hyper=cand["hyper"], error=cand["error"],
            error_lower=cand["error_lower"], dense_params=info.dense_params, params=cand["params"],
            dense_flops=info.dense_flops, flops=cand["flops"],
        )
    errs = np.array([lp.error for lp in layers.values()])
    return Plan(
        metric=metric, budget=budget, objective=objective, layers=layers, skipped=dict(skipped or {}),
        max_error=float(errs.max()) if len(errs) else 0.0, network_bound=network_bound(errs),
        config=dict(config or {}),
    )


def optimize(
    model: nn.Module,
    budget: float,
    example_inputs: Any,
    *,
    metric: str = "params",
    exclude: Iterable[str] = (),
    curves: CurveConfig | Mapping[str, Any] | None = None,
    solver: SolverConfig | Mapping[str, Any] | None = None,
    allocator: Any = "alds",
    families: Sequence[str] | None = None,
    calibration: Iterable[Any] | None = None,
    embeddings: bool = False,
    sequential: bool = False,
    output_weighting: bool | Callable[[Any], torch.Tensor] = False,
    refine: Any = None,
    finetune: Any = None,
    steps: int = 1,
    schedule: str | Sequence[float] = "geometric",
    mode: str = "cascade",
    evaluate: Callable[[nn.Module], float] | None = None,
    min_metric: float | None = None,
    checkpoint: str | os.PathLike | None = None,
    inplace: bool = False,
    progress: bool | None = None,
) -> OptimizeResult:
    """Compress ``model`` by per-layer low-rank factorisation so that at most ``budget`` of it remains.

    Args:
        model: any ``nn.Module`` that runs forward on ``example_inputs``.
        budget: the fraction in (0, 1] of the whole model's ``metric`` that may remain,
            counting the parameters (or FLOPs) that cannot be compressed.
        example_inputs: a tensor, a tuple/list of positional inputs, or a dict of keyword
            inputs; one forward pass is run to find the layers and their output sizes.
        metric: ``"params"`` or ``"flops"`` (multiply-accumulates over ``example_inputs``).
        exclude: ``fnmatch`` patterns of qualified module names to keep dense.
        curves: :class:`CurveConfig` (families, candidate groups, error bound).
        solver: :class:`SolverConfig` (objective and method of the global step).
        allocator: the rank-selection rule, ``"alds"`` (default) or another name from
            ``autorank.available_allocators()`` (e.g. the ``"uniform"`` baseline), or a
            callable taking an :class:`autorank.allocators.AllocationContext`.
        families: the decomposition families that compete for every layer under the one
            budget (``autorank.available_families()``); shorthand for
            ``curves=CurveConfig(families=...)``.  Default ``("alds",)``.
        calibration: an iterable of input batches (in the form of ``example_inputs``)
            for data-aware curves: every error becomes ``||(W - W_hat) X||_F / ||W X||_F``
            on these inputs and SVD factors are whitened (:mod:`autorank.calibration`).
            Dict batches may carry an ``attention_mask``; padded tokens are left out.
        embeddings: also factorise ``nn.Embedding`` tables (not tied ones).
        sequential: with ``calibration``, refit the factorised layers in execution order to the
            original layers' outputs given the compressed model's own inputs, with re-centred
            biases (:mod:`autorank.sequential`).  The ranks stay those of the plan; the refit costs
            two partial forward passes over the calibration data per stage of independent layers.
        output_weighting: with ``calibration``, also weight each layer's output error by how
            much it moves the model's output (two-sided whitening, :mod:`autorank.calibration`):
            errors and factors minimise ``tr((W - W_hat) M (W - W_hat)^T G)`` with ``G`` the
            layer's output Gauss-Newton moment, estimated by one backward pass per calibration
            batch.  ``True`` measures the model's primary output tensor (``last_hidden_state``,
            ``logits``, or the output itself); a callable ``fn(model_output) -> Tensor`` picks
            another (e.g. a pooled embedding).  Families without ``fits_output`` use ``M`` alone.
        refine: an :class:`autorank.Refine` to tune solver knobs with Optuna against a
            metric on held-out data (single-step runs; see :mod:`autorank.refine`).
        finetune: ``None`` (compress only), an :class:`autorank.Finetune`, or any
            callable ``finetune(model, step) -> None`` that trains ``model`` in place.
        steps: number of compress -> fine-tune steps (see ``schedule``).
        schedule: ``"one-shot"``, ``"linear"``, ``"geometric"`` or an explicit list of
            decreasing budgets ending at ``budget`` (see :mod:`autorank.retrain`).
        mode: ``"cascade"`` compresses the fine-tuned model further at each step;
            ``"one-shot"`` compresses the original model each time.
        evaluate: ``evaluate(model) -> float`` (higher is better), recorded at every step.
        min_metric: stop early once ``evaluate`` falls below this value; the result is then the
            last step that still met it, at a *larger* budget than asked (a warning is logged and
            ``result.plan.budget`` says which), or the last step if none met it.
        checkpoint: a directory where every finished step is saved; re-running with
            the same directory resumes after the last finished step (the budgets, mode, metric,
            allocator, curve, solver and exclude settings must match; fine-tuning settings are
            not checked).
        inplace: modify ``model`` itself (single-step runs only); by default it is left untouched.
        progress: show progress bars (``None``: only on a terminal).

    Returns:
        :class:`OptimizeResult` with the compressed model, the plan, the measured totals
        and, for scheduled runs, the per-step ``history``.

    Raises:
        TypeError / ValueError: bad arguments, no compressible layer, or an unreachable
            budget (the message states the smallest reachable one).
        RuntimeError: the forward pass on ``example_inputs`` failed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    budget = check_budget(budget)
    metric = check_metric(metric)
    curve_cfg = _as_config(curves, CurveConfig, "curves")
    solver_cfg = _as_config(solver, SolverConfig, "solver")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    if isinstance(exclude, str):
        exclude = (exclude,)
    try:
        exclude = tuple(exclude)
    except TypeError:
        raise TypeError(f"exclude must be a sequence of name patterns, got {exclude!r}") from None
    from .allocators import resolve_allocator

    resolve_allocator(allocator)  # validates the name
    if families is not None:
        if isinstance(families, str):
            families = (families,)
        from dataclasses import replace

        curve_cfg = replace(curve_cfg, families=tuple(families))
    if not isinstance(embeddings, bool):
        raise TypeError(f"embeddings must be a bool, got {embeddings!r}")
    if calibration is not None:
        if isinstance(calibration, (torch.Tensor, Mapping)):
            raise TypeError("calibration must be an iterable of batches (e.g. a list or a DataLoader), "
                            f"not a single {type(calibration).__name__}; wrap it in a list")
        try:
            calibration = calibration if hasattr(calibration, "__len__") else list(calibration)
        except TypeError:
            raise TypeError(f"calibration must be an iterable of input batches, got {type(calibration).__name__}") from None
    if not isinstance(sequential, bool):
        raise TypeError(f"sequential must be a bool, got {sequential!r}")
    if sequential and calibration is None:
        raise ValueError("sequential=True refits layers to calibration data: pass calibration=...")
    if not (isinstance(output_weighting, bool) or callable(output_weighting)):
        raise TypeError(f"output_weighting must be a bool or a callable, got {output_weighting!r}")
    if output_weighting is not False and calibration is None:
        raise ValueError("output_weighting measures layers on calibration data: pass calibration=...")
    step = CompressStep(example_inputs, metric, exclude, curve_cfg, solver_cfg, progress, allocator,
                        calibration=calibration, embeddings=embeddings, evaluate=evaluate, sequential=sequential,
                        output_weighting=output_weighting)
    if refine is not None:
        from .refine import Refine, run_refine

        if not isinstance(refine, Refine):
            raise TypeError(f"refine must be an autorank.Refine, got {type(refine).__name__}")
        if finetune is not None or steps != 1:
            raise ValueError("refine applies to single-step compression (no finetune, steps=1)")
        result = run_refine(model if inplace else copy.deepcopy(model), budget, step, refine)
        result.original = None if inplace else model
        result.example_inputs = example_inputs
        return result

    from .retrain import Schedule, run_schedule

    plan = Schedule.build(budget, steps, schedule, mode, finetune, evaluate, min_metric, checkpoint)
    if plan.is_single:
        result = step(model if inplace else copy.deepcopy(model), budget)
    elif inplace:
        raise ValueError("inplace=True applies to single-step compression only (no finetune, steps=1)")
    else:
        result = run_schedule(model, step, plan)
    result.original = None if inplace else model
    result.example_inputs = example_inputs
    return result


@dataclass(frozen=True)
class CompressStep:
    """One compression of a model to a budget with fixed settings (the unit a schedule repeats)."""

    example_inputs: Any
    metric: str = "params"
    exclude: tuple[str, ...] = ()
    curves: CurveConfig = field(default_factory=CurveConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    progress: bool | None = None
    allocator: Any = "alds"
    calibration: Any = None
    embeddings: bool = False
    evaluate: Callable[[nn.Module], float] | None = None
    sequential: bool = False
    output_weighting: bool | Callable[[Any], torch.Tensor] = False

    @property
    def allocator_name(self) -> str:
        from .allocators import resolve_allocator

        return resolve_allocator(self.allocator)[0]

    def __call__(self, work: nn.Module, budget: float) -> OptimizeResult:
        """Compress ``work`` **in place** to ``budget`` and return the result."""
        return _compress(work, budget, self)

    def prepare(self, work: nn.Module) -> "Prepared":
        """Analyse ``work`` and build its curves (and calibration moments): everything before allocation."""
        return _prepare(work, self)


@dataclass
class Prepared:
    """The budget-independent part of one compression: graph, moments and curves."""

    graph: LayerGraph
    curves: dict[str, LayerCurves]
    skipped: dict[str, str]
    total: int
    fixed: int
    moments: dict[str, Any] | None
    timings: dict[str, float]


def _prepare(work: nn.Module, cfg: CompressStep) -> Prepared:
    metric, example_inputs = cfg.metric, cfg.example_inputs
    timings: dict[str, float] = {}
    t = time.perf_counter()
    graph = analyze(work, example_inputs, cfg.exclude, embeddings=cfg.embeddings)
    timings["analyze"] = time.perf_counter() - t
    if not graph.layers:
        why = "; ".join(f"{n}: {r}" for n, r in list(graph.skipped.items())[:5]) or "no Linear/Conv1d/Conv2d layer"
        raise ValueError(f"{type(work).__name__} has no compressible layer ({why})")
    total = graph.total_params if metric == "params" else graph.total_flops
    if total <= 0:
        raise ValueError(f"the model's total {metric} on example_inputs is {total}; nothing to budget")
    moments = None
    if cfg.calibration is not None:
        from .calibration import collect_moments

        t = time.perf_counter()
        moments = collect_moments(work, graph.layers, cfg.calibration, cfg.progress)
        timings["calibration"] = time.perf_counter() - t
        if cfg.output_weighting is not False:
            from .calibration import collect_output_moments

            t = time.perf_counter()
            fn = None if cfg.output_weighting is True else cfg.output_weighting
            for name, out in collect_output_moments(work, graph.layers, cfg.calibration, fn, cfg.progress).items():
                if name in moments:
                    moments[name].output = out
            timings["output_moments"] = time.perf_counter() - t
    t = time.perf_counter()
    layer_curves, no_gain = build_curves(work, graph, cfg.curves, metric, cfg.progress, moments)
    timings["curves"] = time.perf_counter() - t
    if not layer_curves:
        raise ValueError(f"{type(work).__name__} has no layer whose factorisation is cheaper than dense")
    return Prepared(graph=graph, curves=layer_curves, skipped={**graph.skipped, **no_gain}, total=total,
                    fixed=fixed_cost(layer_curves, metric, total), moments=moments, timings=timings)


def _compress(work: nn.Module, budget: float, cfg: CompressStep, prepared: Prepared | None = None,
              cache: dict[str, Any] | None = None) -> OptimizeResult:
    t0 = time.perf_counter()
    prep = prepared or _prepare(work, cfg)
    timings = dict(prep.timings)
    t = time.perf_counter()
    picked, worst = allocate(prep.curves, budget, cfg.metric, prep.total, prep.fixed, cfg.solver, cfg.allocator,
                             model=work, example_inputs=cfg.example_inputs, moments=prep.moments,
                             evaluate=cfg.evaluate, cache={} if cache is None else cache)
    timings["solve"] = time.perf_counter() - t
    return _finish(work, budget, cfg, prep, picked, worst, timings, t0)


def _finish(work: nn.Module, budget: float, cfg: CompressStep, prep: Prepared, picked: Mapping[str, int],
            worst: float, timings: dict[str, float], t0: float) -> OptimizeResult:
    metric = cfg.metric
    plan = make_plan(prep.curves, picked, metric, budget, cfg.solver.objective, prep.skipped,
                     config={"allocator": cfg.allocator_name, "curves": cfg.curves.to_dict(),
                             "solver": cfg.solver.to_dict(), "exclude": list(cfg.exclude),
                             "data_aware": prep.moments is not None, "embeddings": cfg.embeddings,
                             "sequential": bool(cfg.sequential and prep.moments is not None),
                             "output_weighting": bool(cfg.output_weighting is not False and prep.moments is not None)})
    from .families import get_family

    late = sorted({lp.family for lp in plan.layers.values() if lp.compressed and get_family(lp.family).needs_finetune})
    if late:
        log.warning("family %s is initialised to match plain SVD and only pays off after fine-tuning; "
                    "pass finetune=... (or fine-tune the result)", ", ".join(late))
    t = time.perf_counter()
    reference = copy.deepcopy(work) if cfg.sequential and prep.moments is not None else None
    realize(work, plan, inplace=True, moments=prep.moments)
    timings["realize"] = time.perf_counter() - t
    if reference is not None:
        from .sequential import sequential_refit

        t = time.perf_counter()
        done = sequential_refit(reference, work, plan, cfg.calibration, graph=prep.graph.graph,
                                kinds={n: info.kind for n, info in prep.graph.layers.items()},
                                progress=cfg.progress,
                                output_moments={n: m.output_matrix for n, m in prep.moments.items()
                                                if m.output is not None})
        del reference
        timings["refit"] = time.perf_counter() - t
        log.info("sequential refit of %d layers: %.2fs", len(done), timings["refit"])

    t = time.perf_counter()
    measured = measure_totals(prep.graph, work, cfg.example_inputs)
    timings["measure"] = time.perf_counter() - t
    plan.totals = measured
    total = prep.total
    predicted = prep.fixed + sum(float(prep.curves[n].cost(metric)[i]) for n, i in picked.items())
    if measured[metric] != round(predicted):
        log.warning("measured %s (%d) differ from the plan's prediction (%d)", metric, measured[metric], predicted)
    if measured[metric] > budget * total * (1 + 1e-9):
        raise RuntimeError(
            f"internal error: the realised model has {measured[metric]:,} {metric}, over the budget "
            f"{budget:g} x {total:,}; please report this with the model"
        )
    timings["total"] = time.perf_counter() - t0
    log.info("optimize: %s budget %.3f -> %.4f measured, largest error %.4f, %.2fs",
             metric, budget, measured[metric] / total, worst, timings["total"])
    return OptimizeResult(model=work, plan=plan, graph=prep.graph, curves=prep.curves, timings=timings)
