"""The compression pipeline, written once.

One compression of a model to a budget runs four stages of a :class:`CompressStep`::

    prepare   analyse the layer graph -> calibration moments (-> output moments)
              -> error curves of every candidate                    (does not depend on the budget)
    choose    one candidate per layer under the budget              (the global step, an allocator)
    build     the plan -> the factorised modules -> the sequential refit   (in place)
    finish    measure the realised model, check it against the budget -> OptimizeResult

:func:`autorank.optimize` runs them once; the retraining schedule once per budget;
:mod:`autorank.refine` prepares once, chooses once per trial and builds every trial it
scores; sweeps prepare once per setting and choose + build once per row.  What was asked
is one :class:`Settings` record: ``plan.config`` and the checkpoint fingerprint of a
schedule are both written from :meth:`Settings.record`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch.nn as nn

from .allocators import allocate, resolve_allocator
from .calibration import collect_moments, collect_output_moments
from .config import (OUTPUT_MOMENTS_LIMIT, OUTPUT_PARTS, Compression, CurveConfig, DataAware, SolverConfig, as_config,
                     check_metric, resolve_data_parts)
from .curves import LayerCurves, attach_latency, build_curves
from .families import get_family
from .families.memo import FIT_MEMO_BYTES, FitMemo, memo_scope
from .families.attention import UnfusedMultiheadAttention, refuse_attention, unfuse_attention
from .graph import LayerGraph, analyze, count_flops, count_params
from .latency import measure_latency
from .plan import LayerPlan, Plan
from .progress import progress_scope, stage
from .realize import (check_finite_parameters, copy_model, find_outside_reads, module_snapshot, preserve_rng,
                      realize, restore_on_error, restore_snapshot)
from .result import OptimizeResult
from .sequential import sequential_refit
from .solver import network_bound
from .stream import Streamed, block_replay, find_chain, input_moment_bytes, output_moment_bytes, stream_build, stream_curves

__all__ = ["Settings", "CompressStep", "Prepared", "make_plan", "fixed_cost", "latency_overrun", "measure_totals",
           "record_built_errors"]

log = logging.getLogger(__name__)


# ---- plan arithmetic ---------------------------------------------------------------------------

def latency_overrun(plan: Plan) -> tuple[float, float]:
    """``(measured / original latency, spread)`` of a measured latency plan; the spread is the sum of both IQRs
    over the original's time."""
    t = plan.totals
    before = t["latency_before"]
    return t["latency"] / before, (t["latency_iqr"] + t["latency_before_iqr"]) / before


def fixed_cost(curves: Mapping[str, LayerCurves], metric: str, total: float) -> float:
    """The part of ``total`` outside the layers that have curves (it counts towards the budget as is)."""
    return total - sum(float(lc.cost(metric)[0]) if metric == "latency" else
                       lc.info.dense_params if metric == "params" else lc.info.dense_flops
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


def record_built_errors(plan: Plan, model: nn.Module) -> None:
    """Set the error of each layer whose realised module measured its own (``fit_error``) to that.

    A family may refine its factors at build time beyond what its candidate's closed form
    describes (Tucker-2: HOOI, kept only where it lowers the error); the plan then reports
    the error of what was built, and its ``max_error`` and ``network_bound`` follow.
    """
    changed = False
    for name, lp in plan.layers.items():
        err = getattr(model.get_submodule(name), "fit_error", None) if lp.compressed else None
        if err is not None and float(err) != lp.error:
            lp.error = float(err)
            changed = True
    if changed:
        errs = np.array([lp.error for lp in plan.layers.values()])
        plan.max_error, plan.network_bound = float(errs.max()), network_bound(errs)


def thin_moments(moments: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """``{layer: (rows, inputs)}`` for the layers whose calibration saw fewer input rows than inputs.

    A moment ``M = (1/N) sum x x^T`` of ``N < n`` rows has rank at most ``N``, so every rank
    ``j >= N`` fits the calibration inputs exactly: its data-aware error is 0 there, whatever
    it does on other inputs.
    """
    return {name: (int(m.count), int(m.sum.shape[0])) for name, m in moments.items()
            if m.sum.ndim == 2 and m.count < m.sum.shape[0]}


def warn_zero_calibration(moments: Mapping[str, Any]) -> None:
    """One warning naming the layers whose calibration inputs are all zero (their data-aware errors are 0/0)."""
    zero = [n for n, m in moments.items() if m.count and not bool(m.sum.abs().max() > 0)]
    if zero:
        log.warning("the calibration inputs of %d layer(s) are all zero (%s): their data-aware errors are 0/0 and "
                    "the plan chosen for them is degenerate; check the calibration data", len(zero),
                    ", ".join(zero[:5]))


def warn_thin_calibration(moments: Mapping[str, Any]) -> None:
    """One warning naming the layers :func:`thin_moments` finds (the plan may over-compress them)."""
    thin = thin_moments(moments)
    if thin:
        some = ", ".join(f"{n} ({rows} rows < {inputs} inputs)" for n, (rows, inputs) in list(thin.items())[:4])
        more = f" and {len(thin) - 4} more" if len(thin) > 4 else ""
        log.warning("calibration is too small for %d layer(s): %s%s. Their data-aware errors are 0 from rank "
                    "= rows on, so the plan may compress them far more than the data supports; pass more "
                    "calibration samples (at least as many rows as the layer's inputs)", len(thin), some, more)


def settle_attention(work: nn.Module, prep: "Prepared", plan: Plan) -> None:
    """Fuse back the attention modules prepare unfused whose projections all stayed dense; record the rest
    in ``plan.attention`` (what :func:`autorank.realize` and :func:`autorank.load` unfuse)."""
    refuse_attention(work, prep.attention, [n for n, lp in plan.layers.items() if lp.compressed])
    plan.attention = [n for n, m in work.named_modules() if isinstance(m, UnfusedMultiheadAttention)]


# ---- the settings --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """Everything that was asked of one compression, as plain data (JSON: :meth:`to_dict`).

    metric:      ``"params"``, ``"flops"`` or ``"latency"``: what the budget is a fraction of.
    compression: :class:`autorank.Compression` (what to compress, candidates, allocator, solver).
    data:        :class:`autorank.DataAware` (how calibration data is used).
    """

    metric: str = "params"
    compression: Compression = field(default_factory=Compression)
    data: DataAware = field(default_factory=DataAware)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metric", check_metric(self.metric))
        object.__setattr__(self, "compression", as_config(self.compression, Compression, "compression"))
        object.__setattr__(self, "data", as_config(self.data, DataAware, "data"))

    @property
    def curves(self) -> CurveConfig:
        return self.compression.curves

    @property
    def solver(self) -> SolverConfig:
        return self.compression.solver

    def parts(self, calibrated: bool, heavy: bool = False) -> dict[str, bool]:
        """Which parts of the data-aware recipe run (:func:`autorank.config.resolve_data_parts`)."""
        return resolve_data_parts(self.data, calibrated, heavy)

    def allocator(self, calibrated: bool, heavy: bool = False) -> Any:
        """The allocator that runs: ``"alds_output"`` in place of the default ``"alds"`` with output allocation."""
        chosen = self.compression.allocator
        if chosen == "alds" and self.parts(calibrated, heavy)["output_allocation"]:
            return "alds_output"
        if self.data.output_allocation is True and chosen not in ("alds", "alds_output"):
            raise ValueError(f"DataAware.output_allocation=True replaces the allocator 'alds' by 'alds_output'; "
                             f"it cannot apply to Compression.allocator={self.compression.allocator_name!r}")
        return chosen

    def record(self, calibrated: bool, solver: SolverConfig | None = None, heavy: bool = False) -> dict[str, Any]:
        """What ran, as ``plan.config`` records it (and a schedule's checkpoint fingerprint)."""
        parts = self.parts(calibrated, heavy)
        comp = self.compression
        return {"allocator": resolve_allocator(self.allocator(calibrated, heavy))[0], "curves": comp.curves.to_dict(),
                "solver": (solver or comp.solver).to_dict(), "exclude": list(comp.exclude),
                "data_aware": calibrated, "embeddings": comp.embeddings,
                "sequential": parts["sequential"], "output_weighting": parts["output_weighting"]}

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "compression": self.compression.to_dict(), "data": self.data.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Settings":
        return cls(metric=data.get("metric", "params"),
                   compression=Compression.from_dict(dict(data.get("compression", {}))),
                   data=DataAware.from_dict(dict(data.get("data", {}))))


# ---- the pipeline ----------------------------------------------------------------------------------

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
    outputs: dict[str, Any] | None = None
    heavy: bool = False  # the output moments would not fit: the output-aware parts default to off
    streamed: Streamed | None = None  # pass 1 of the block-by-block path, for its pass 2 (autorank.stream)
    latency: dict[str, Any] | None = None  # metric="latency": the whole model's and the rest's times
    attention: tuple[str, ...] = ()  # the nn.MultiheadAttention modules prepare unfused
    # the conv families' per-kernel decompositions, computed for the curves and read again by each build
    memo: FitMemo = field(default_factory=FitMemo, repr=False, compare=False)


@dataclass(frozen=True)
class CompressStep:
    """One compression of a model to a budget with fixed settings (the unit every workflow repeats).

    example_inputs: the inputs the graph is analysed and the MACs are counted on.
    settings:       the :class:`Settings`.
    calibration:    a re-iterable of input batches, or None (weight-only).
    evaluate:       the user's ``evaluate(model) -> float``, for allocators that score models.
    progress:       progress bars (None: only on a terminal).
    """

    example_inputs: Any
    settings: Settings = field(default_factory=Settings)
    calibration: Any = None
    evaluate: Callable[[nn.Module], float] | None = None
    progress: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.settings, Settings):
            raise TypeError(f"CompressStep.settings must be an autorank.Settings, got {type(self.settings).__name__}")

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    @property
    def parts(self) -> dict[str, bool]:
        """Which parts of the data-aware recipe run."""
        return self.settings.parts(self.calibrated)

    @property
    def metric(self) -> str:
        return self.settings.metric

    def record(self, solver: SolverConfig | None = None, heavy: bool = False) -> dict[str, Any]:
        return self.settings.record(self.calibrated, solver, heavy)

    def heavy(self, work: nn.Module, graph: LayerGraph) -> bool:
        """Whether the input or the output moments of all ``graph``'s layers at once would take more
        than :data:`autorank.config.OUTPUT_MOMENTS_LIMIT` bytes and more than half the model's."""
        need = max(output_moment_bytes(graph), input_moment_bytes(graph))
        own = sum(p.numel() * p.element_size() for p in work.parameters())
        return self.calibrated and need > max(OUTPUT_MOMENTS_LIMIT, own // 2)

    # -- stage 1
    def prepare(self, work: nn.Module) -> Prepared:
        """Analyse ``work`` and build its curves (and calibration moments): everything before allocation.

        Every supported ``nn.MultiheadAttention`` of ``work`` is first unfused in place
        (:func:`autorank.families.attention.unfuse_attention`, same outputs), so that its four
        projections are layers; the build turns back those none of whose projections is compressed.
        """
        comp, metric = self.settings.compression, self.metric
        timings: dict[str, float] = {}
        t = time.perf_counter()
        with stage("analysis", self.progress):
            unfused, fused = unfuse_attention(work, comp.exclude)
            graph = analyze(work, self.example_inputs, comp.exclude, embeddings=comp.embeddings)
            check_finite_parameters(work)
            # a parent whose forward reads a layer's own attributes (self.fc.weight.sum()) needs that layer dense
            for name, attr in find_outside_reads(work, list(graph.layers), self.example_inputs).items():
                del graph.layers[name]
                graph.skipped[name] = (f"the forward of its parent reads its .{attr} directly, which a factorised "
                                       "replacement does not have")
        for name, why in fused.items():
            graph.skipped[name] = why
            if f"{name}.out_proj" in graph.skipped and not graph.skipped[f"{name}.out_proj"].startswith("excluded"):
                graph.skipped[f"{name}.out_proj"] = f"called functionally by the attention {name}, left fused"
        timings["analyze"] = time.perf_counter() - t
        if not graph.layers:
            why = "; ".join(f"{n}: {r}" for n, r in list(graph.skipped.items())[:5]) or "no Linear/Conv1d/Conv2d layer"
            raise ValueError(f"{type(work).__name__} has no compressible layer ({why})")
        total = graph.total_params if metric == "params" else graph.total_flops
        if metric == "latency":
            total = graph.total_flops or 1  # the time is measured after the curves are built
        if total <= 0:
            raise ValueError(f"the model's total {metric} on example_inputs is {total}; nothing to budget")
        moments = outputs = streamed = None
        heavy = self.heavy(work, graph)
        parts = self.settings.parts(self.calibrated, heavy)
        if heavy and any(getattr(self.settings.data, n) is None for n in OUTPUT_PARTS):
            log.info("output weighting and allocation are off: their output moments would take %.1f GiB "
                     "(DataAware(output_weighting=True, output_allocation=True) turns them on)",
                     output_moment_bytes(graph) / 2 ** 30)
        if heavy and self.settings.data.streaming is False:
            log.warning("calibrating the whole model at once (DataAware(streaming=False)): its input moments "
                        "take %.1f GiB", input_moment_bytes(graph) / 2 ** 30)
        chain = batches = None
        if self.calibrated:
            batches = list(self.calibration)
            if not batches:
                raise ValueError("calibration is empty: it must yield at least one batch of inputs")
            if parts["output_weighting"]:
                t = time.perf_counter()
                outputs = collect_output_moments(work, graph.layers, batches, self.settings.data.output,
                                                 self.progress)
                timings["output_moments"] = time.perf_counter() - t
            if parts["streaming"]:
                chain = find_chain(work, list(graph.layers), batches[0])
                if isinstance(chain, str):
                    if self.settings.data.streaming:
                        raise ValueError(f"DataAware(streaming=True): {type(work).__name__} cannot be streamed "
                                         f"block by block: {chain}")
                    log.info("calibrating the whole model at once: %s", chain)
                    chain = None
        t = time.perf_counter()
        memo = FitMemo(FIT_MEMO_BYTES)  # its scope reaches the curve workers
        with memo_scope(memo):
            layer_curves, no_gain, moments, streamed = self._curves(work, graph, chain, batches, outputs, heavy,
                                                                    timings, t)
        if moments is not None:
            warn_zero_calibration(moments)
            warn_thin_calibration(moments)
        if not layer_curves:
            raise ValueError(f"{type(work).__name__} has no layer whose factorisation is cheaper than dense")
        latency = None
        if metric == "latency":
            t = time.perf_counter()
            layer_curves, slow, latency = attach_latency(work, layer_curves, self.example_inputs, comp.latency,
                                                         self.progress)
            no_gain = {**no_gain, **slow}
            timings["latency"] = time.perf_counter() - t
            if not layer_curves:
                raise ValueError(f"{type(work).__name__} has no layer whose factorisation measures faster than dense")
            # the budget is a fraction of the predicted original: the rest plus every dense layer's time
            total = latency["rest_s"] + sum(float(lc.latency[0]) for lc in layer_curves.values())
            latency["predicted_s"] = total
        return Prepared(graph=graph, curves=layer_curves, skipped={**graph.skipped, **no_gain}, total=total,
                        fixed=fixed_cost(layer_curves, metric, total), moments=moments, timings=timings,
                        outputs=outputs, heavy=heavy, streamed=streamed, latency=latency,
                        attention=tuple(unfused), memo=memo)

    def _curves(self, work: nn.Module, graph: LayerGraph, chain: Any, batches: list[Any] | None,
                outputs: dict[str, Any] | None, heavy: bool, timings: dict[str, float], t: float,
                ) -> tuple[dict[str, LayerCurves], dict[str, str], dict[str, Any] | None, Streamed | None]:
        """Calibration and curves, block by block (``chain``) or for the whole model.

        Returns ``(curves, no_gain, moments, streamed)``."""
        comp, metric = self.settings.compression, self.metric
        moments = streamed = None
        if chain is not None:
            log.info("streaming %d blocks of %r", len(chain.blocks), chain.container)
            layer_curves, no_gain, streamed = stream_curves(work, graph, chain, batches, comp.curves, metric,
                                                            self.progress, outputs, keep=not heavy)
            if not heavy:  # every moment was kept: allocators and the build read them as on the whole path
                moments = streamed.outer
            timings["calibration"] = time.perf_counter() - t  # with the curves: block by block, they interleave
        else:
            if self.calibrated:
                moments = collect_moments(work, graph.layers, batches, self.progress)
                for name, out in (outputs or {}).items():
                    if name in moments:
                        moments[name].output = out
                timings["calibration"] = time.perf_counter() - t
                t = time.perf_counter()
            layer_curves, no_gain = build_curves(work, graph, comp.curves, metric, self.progress, moments)
            timings["curves"] = time.perf_counter() - t
        return layer_curves, no_gain, moments, streamed

    # -- stage 2
    def choose(self, work: nn.Module, prep: Prepared, budget: float, *, curves: Mapping[str, LayerCurves] | None = None,
               solver: SolverConfig | None = None, cache: dict[str, Any] | None = None) -> tuple[dict[str, int], float]:
        """The global step on ``prep``'s curves (or on ``curves``, e.g. re-weighted ones); ``(picked, largest error)``."""
        with progress_scope(self.progress):  # allocators that probe models report under it
            return allocate(prep.curves if curves is None else curves, budget, self.metric, prep.total, prep.fixed,
                            solver or self.settings.solver, self.settings.allocator(self.calibrated, prep.heavy),
                            model=work, example_inputs=self.example_inputs, moments=prep.moments,
                            evaluate=self.evaluate, cache={} if cache is None else cache, outputs=prep.outputs,
                            replay=None if prep.streamed is None else
                            block_replay(work, prep.streamed.chain, self.example_inputs, prep.streamed.mask_key))

    # -- stage 3
    def plan(self, prep: Prepared, picked: Mapping[str, int], budget: float,
             solver: SolverConfig | None = None) -> Plan:
        """The plan of ``picked``, with :meth:`Settings.record` as its ``config``."""
        solver = solver or self.settings.solver
        return make_plan(prep.curves, picked, self.metric, budget, solver.objective, prep.skipped,
                         config=self.record(solver, prep.heavy))

    def build(self, work: nn.Module, prep: Prepared, plan: Plan) -> dict[str, float]:
        """Realise ``plan`` in ``work`` (in place), then refit it when the recipe says so; the timings.

        The global RNG is left as it was (factor modules are randomly initialised before their
        factors are written)."""
        with preserve_rng(work), memo_scope(prep.memo):  # the kernels' decompositions made for the curves
            return self._build(work, prep, plan)

    def _build(self, work: nn.Module, prep: Prepared, plan: Plan) -> dict[str, float]:
        late = sorted({lp.family for lp in plan.layers.values()
                       if lp.compressed and get_family(lp.family).needs_finetune})
        if late:
            log.warning("family %s is initialised to match plain SVD and only pays off after fine-tuning; "
                        "pass finetune=... (or fine-tune the result)", ", ".join(late))
        timings: dict[str, float] = {}
        refit = self.settings.parts(self.calibrated, prep.heavy)["sequential"]
        if prep.streamed is not None:
            t = time.perf_counter()
            # a model too big for all its moments is also too big to keep its dense layers in
            # memory next to their replacements (the rollback holds them): they go to a mapped file
            done = stream_build(work, plan, prep.graph, prep.streamed, refit, outputs=prep.outputs,
                                progress=self.progress, spill=prep.heavy)
            key = "refit" if refit else "realize"  # block by block, a block is realised then refitted
            timings[key] = time.perf_counter() - t
            log.info("built block by block, %d layers refitted: %.2fs", len(done), timings[key])
            settle_attention(work, prep, plan)
            return timings
        refit = refit and prep.moments is not None
        t = time.perf_counter()
        reference = copy_model(work, "as the reference of the sequential refit (or pass "
                               "data=autorank.DataAware(sequential=False))") if refit else None
        with stage(f"realise {sum(lp.compressed for lp in plan.layers.values())} layers", self.progress):
            realize(work, plan, inplace=True, moments=prep.moments)
        timings["realize"] = time.perf_counter() - t
        if reference is not None:
            t = time.perf_counter()
            done = sequential_refit(reference, work, plan, self.calibration, graph=prep.graph.graph,
                                    kinds={n: info.kind for n, info in prep.graph.layers.items()},
                                    progress=self.progress,
                                    output_moments={n: m.output_matrix for n, m in prep.moments.items()
                                                    if m.output is not None})
            del reference
            timings["refit"] = time.perf_counter() - t
            log.info("sequential refit of %d layers: %.2fs", len(done), timings["refit"])
        settle_attention(work, prep, plan)
        return timings

    # -- stage 4
    def finish(self, work: nn.Module, budget: float, prep: Prepared, picked: Mapping[str, int], worst: float,
               timings: dict[str, float], t0: float, solver: SolverConfig | None = None,
               warn: bool = True) -> OptimizeResult:
        """Plan, build, measure and check ``work``; the result (``warn``: log a latency over budget)."""
        metric = self.metric
        plan = self.plan(prep, picked, budget, solver)
        with restore_on_error(work):  # a failure leaves an inplace=True model as it was, not half-converted
            timings = {**timings, **self.build(work, prep, plan)}
            record_built_errors(plan, work)
            t = time.perf_counter()
            measured = measure_totals(prep.graph, work, self.example_inputs)
            timings["measure"] = time.perf_counter() - t
            plan.totals = measured
            total = prep.total
            predicted = prep.fixed + sum(float(prep.curves[n].cost(metric)[i]) for n, i in picked.items())
            if metric == "latency":
                self._check_latency(work, plan, prep, budget, predicted, warn)
            elif measured[metric] != round(predicted):
                log.warning("measured %s (%d) differ from the plan's prediction (%d)", metric, measured[metric], predicted)
            if metric != "latency" and measured[metric] > budget * total * (1 + 1e-9):
                raise RuntimeError(
                    f"internal error: the realised model has {measured[metric]:,} {metric}, over the budget "
                    f"{budget:g} x {total:,}; please report this with the model"
                )
        timings["total"] = time.perf_counter() - t0
        achieved = plan.totals[metric] / plan.totals[f"{metric}_before"] if metric == "latency" else \
            measured[metric] / total
        log.info("optimize: %s budget %.3f -> %.4f measured, largest error %.4f, %.2fs",
                 metric, budget, achieved, worst, timings["total"])
        return OptimizeResult(model=work, plan=plan, graph=prep.graph, curves=prep.curves, timings=timings)

    def _check_latency(self, work: nn.Module, plan: Plan, prep: Prepared, budget: float, predicted: float,
                       warn: bool = True) -> None:
        """Time the realised model (median of repeats and IQR) into ``plan.totals``; warn when over budget.

        The ratio is against the original's time measured in :meth:`prepare` with the same clock
        (not interleaved with this one, so a change of machine load between the two shows up in it).
        """
        cfg = self.settings.compression.latency
        lat = measure_latency(work, self.example_inputs, cfg.final_repeats, cfg.warmup, cfg.threads, cfg.clock)
        before = prep.latency["whole_s"]
        plan.totals.update(latency=lat["median_s"], latency_before=before, latency_iqr=lat["iqr_s"],
                           latency_before_iqr=prep.latency["whole_iqr_s"],
                           latency_min=lat["min_s"], latency_before_min=prep.latency["whole_min_s"],
                           latency_predicted=predicted * before / prep.total, latency_threads=cfg.threads)
        ratio, spread = latency_overrun(plan)
        if warn and ratio > budget + spread:
            log.warning("measured latency %.3f ms is %.3f of the original %.3f ms, over the budget %.3f by more than "
                        "the measurement spread (IQR %.3f); the machine may be loaded", lat["median_s"] * 1e3, ratio,
                        before * 1e3, budget, spread)

    def __call__(self, work: nn.Module, budget: float, prepared: Prepared | None = None,
                 cache: dict[str, Any] | None = None) -> OptimizeResult:
        """Compress ``work`` **in place** to ``budget`` (all four stages) and return the result."""
        t0 = time.perf_counter()
        # compressing never moves the caller's random stream; a failure (an infeasible budget, say)
        # puts back every module swapped so far, the attentions unfused by prepare included
        with preserve_rng(work), restore_on_error(work):
            prep = prepared or self.prepare(work)
            timings = dict(prep.timings)
            t = time.perf_counter()
            picked, worst = self.choose(work, prep, budget, cache=cache)
            timings["solve"] = time.perf_counter() - t
            corrections = self.settings.compression.latency.corrections if self.metric == "latency" else 0
            if not corrections:
                return self.finish(work, budget, prep, picked, worst, timings, t0)
            return self._corrected(work, budget, prep, picked, worst, timings, t0, corrections, cache)

    def _corrected(self, work: nn.Module, budget: float, prep: Prepared, picked: Mapping[str, int], worst: float,
                   timings: dict[str, float], t0: float, corrections: int,
                   cache: dict[str, Any] | None) -> OptimizeResult:
        """Build at ``budget``; while the measured latency ratio ``m`` is over it by more than the spread, put
        ``work`` back as it was before the build, re-plan at ``p * budget / m`` (``p``: the built plan's
        predicted ratio) and rebuild, up to ``corrections`` times, and never below the smallest
        reachable ratio; the loop stops when no faster plan is left."""
        before_build = module_snapshot(work)  # every child table: attentions fused back by a build included
        floor = (prep.fixed + sum(float(lc.cost(self.metric).min()) for lc in prep.curves.values())) / prep.total
        result = self.finish(work, budget, prep, picked, worst, timings, t0, warn=False)
        built_state = module_snapshot(work)
        target, done, stuck = budget, 0, False
        while done < corrections:
            ratio, spread = latency_overrun(result.plan)
            if ratio <= budget + spread:
                break
            t = result.plan.totals
            built = min(target, t["latency_predicted"] / t["latency_before"])
            tighter = max(built * budget / ratio, floor * (1 + 1e-9))
            if tighter >= built:
                stuck = True
                log.info("latency %.3f over the budget %.3f; no faster plan is reachable (smallest %.3f)", ratio,
                         budget, floor)
                break
            restore_snapshot(before_build)
            new, worst = self.choose(work, prep, tighter, cache=cache)
            done, target = done + 1, tighter
            log.info("latency %.3f over the budget %.3f (spread %.3f): re-planned at %.3f", ratio, budget, spread,
                     target)
            if new == dict(picked):  # the same plan again (discrete candidates): keep the build, tighten on
                restore_snapshot(built_state)
                continue
            picked = new
            result = self.finish(work, budget, prep, picked, worst, timings, t0, warn=False)
            built_state = module_snapshot(work)
        result.plan.totals.update(latency_target=target, latency_corrections=done)
        ratio, spread = latency_overrun(result.plan)
        if ratio > budget + spread:
            why = "no faster plan is reachable" if stuck else f"after {done} re-plan(s), the last at {target:.3f}"
            log.warning("measured latency is %.3f of the original, over the budget %.3f by more than the measurement "
                        "spread (IQR %.3f); %s; the machine may be loaded", ratio, budget, spread, why)
        return result
