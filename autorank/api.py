"""The front door: :func:`optimize`.

It validates the arguments, groups them into the :class:`autorank.pipeline.Settings`
of one :class:`autorank.pipeline.CompressStep`, and hands that step to the workflow
that was asked for: a single compression, the compress -> fine-tune schedule
(:mod:`autorank.retrain`) or the Optuna refinement (:mod:`autorank.refine`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from .allocators import allocate, resolve_allocator, solve_curves
from .config import Compression, DataAware, Retrain, as_config, check_budget
from .pipeline import CompressStep, Prepared, Settings, fixed_cost, make_plan, measure_totals
from .progress import progress_scope
from .realize import copy_model
from .refine import Refine, run_refine
from .result import OptimizeResult, history_table
from .retrain import Schedule, run_schedule

__all__ = ["optimize", "allocate", "solve_curves", "make_plan", "fixed_cost", "measure_totals",
           "OptimizeResult", "CompressStep", "Settings", "Prepared", "history_table"]

log = logging.getLogger(__name__)

#: the keyword arguments of optimize before the settings were grouped: {old name: (group, field)};
#: every old keyword is the field of the same name in its group
LEGACY_KEYWORDS: dict[str, tuple[str, str]] = {
    old: (group, old)
    for group, olds in (("compression", ("exclude", "curves", "solver", "allocator", "families", "embeddings")),
                        ("data", ("sequential", "output_weighting")),
                        ("retrain", ("schedule", "mode", "min_metric", "checkpoint")))
    for old in olds
}
_GROUPS = {"compression": Compression, "data": DataAware, "retrain": Retrain}


def _legacy_groups(legacy: Mapping[str, Any], groups: dict[str, Any]) -> dict[str, Any]:
    """Fold the old keyword arguments into their groups (with a DeprecationWarning each)."""
    unknown = sorted(set(legacy) - set(LEGACY_KEYWORDS))
    if unknown:
        raise TypeError(f"optimize() got unexpected keyword argument(s) {unknown}")
    fields: dict[str, dict[str, Any]] = {}
    for old, value in legacy.items():
        group, name = LEGACY_KEYWORDS[old]
        if groups[group] is not None:
            raise TypeError(f"pass {old}= inside {group}=autorank.{_GROUPS[group].__name__}(...), not beside it")
        if old == "output_weighting" and callable(value) and not isinstance(value, bool):
            fields.setdefault(group, {}).update(output_weighting=True, output=value)
            value = True
        elif old == "output_weighting" and not isinstance(value, bool):
            raise TypeError(f"output_weighting must be a bool or a callable, got {value!r}")
        warnings.warn(f"optimize({old}=...) is deprecated and will be removed in autorank 0.3: pass "
                      f"{group}=autorank.{_GROUPS[group].__name__}({name}=...)", DeprecationWarning, stacklevel=3)
        fields.setdefault(group, {})[name] = value
    out = dict(groups)
    for group, kw in fields.items():
        out[group] = _GROUPS[group](**kw)
    return out


def _check_calibration(calibration: Any) -> Any:
    if calibration is None:
        return None
    if isinstance(calibration, (torch.Tensor, Mapping)):
        raise TypeError("calibration must be an iterable of batches (e.g. a list or a DataLoader), "
                        f"not a single {type(calibration).__name__}; wrap it in a list")
    try:
        return calibration if hasattr(calibration, "__len__") else list(calibration)
    except TypeError:
        raise TypeError(f"calibration must be an iterable of input batches, got {type(calibration).__name__}") from None


def optimize(
    model: nn.Module,
    budget: float,
    example_inputs: Any,
    *,
    metric: str = "params",
    calibration: Iterable[Any] | None = None,
    finetune: Any = None,
    steps: int = 1,
    evaluate: Callable[[nn.Module], float] | None = None,
    compression: Compression | Mapping[str, Any] | None = None,
    data: DataAware | Mapping[str, Any] | None = None,
    retrain: Retrain | Mapping[str, Any] | None = None,
    refine: Refine | None = None,
    inplace: bool = False,
    progress: bool | None = None,
    **legacy: Any,
) -> OptimizeResult:
    """Compress ``model`` by per-layer low-rank factorisation so that at most ``budget`` of it remains.

    Args:
        model: any ``nn.Module`` that runs forward on ``example_inputs``.
        budget: the fraction in (0, 1] of the whole model's ``metric`` that may remain,
            counting the parameters (or FLOPs) that cannot be compressed.
        example_inputs: a tensor, a tuple/list of positional inputs, or a dict of keyword
            inputs; one forward pass is run to find the layers and their output sizes.
        metric: ``"params"``, ``"flops"`` (multiply-accumulates over ``example_inputs``) or
            ``"latency"`` (measured forward time on ``example_inputs``, docs/latency.md).
        calibration: an iterable of input batches (in the form of ``example_inputs``) for
            data-aware compression: every error becomes ``||(W - W_hat) X||_F / ||W X||_F`` on
            these inputs and SVD factors are whitened (:mod:`autorank.calibration`); ``data``
            says which further parts of the data-aware recipe run.  Dict batches may carry an
            ``attention_mask``; padded tokens are left out.
        finetune: ``None`` (compress only), an :class:`autorank.Finetune`, an
            :class:`autorank.EncoderDistill`, or any callable ``finetune(model, step)`` that
            trains ``model`` in place (:mod:`autorank.finetune`).
        steps: number of compress -> fine-tune steps (``retrain`` says how they run).
        evaluate: ``evaluate(model) -> float`` (higher is better), recorded at every step of a
            schedule, and used by allocators that score models.
        compression: :class:`autorank.Compression`: families, exclude patterns, embeddings,
            the allocator and the solver.
        data: :class:`autorank.DataAware`: which parts of the data-aware recipe run.
        retrain: :class:`autorank.Retrain`: schedule, mode, ``min_metric``, checkpoint.
        refine: an :class:`autorank.Refine` to tune solver knobs with Optuna against a metric
            on held-out data (single-step runs; see :mod:`autorank.refine`).
        inplace: modify ``model`` itself (single-step runs only); by default it is left untouched.
        progress: ``True`` progress bars, ``False`` nothing, ``None`` bars on a terminal and
            INFO lines on the ``autorank.progress`` logger otherwise (:mod:`autorank.progress`);
            it applies to every step, fine-tuning loops included.
        **legacy: the keyword arguments of earlier versions (``families``, ``allocator``,
            ``exclude``, ``curves``, ``solver``, ``embeddings``, ``sequential``,
            ``output_weighting``, ``schedule``, ``mode``, ``min_metric``, ``checkpoint``), each
            folded into its group with a ``DeprecationWarning`` (``api.LEGACY_KEYWORDS``).

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
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    groups = {"compression": compression, "data": data, "retrain": retrain}
    if legacy:
        groups = _legacy_groups(legacy, groups)
    comp = as_config(groups["compression"], Compression, "compression")
    settings = Settings(metric=metric, compression=comp, data=as_config(groups["data"], DataAware, "data"))
    retrain_cfg = as_config(groups["retrain"], Retrain, "retrain")
    resolve_allocator(comp.allocator)  # validates the name
    calibration = _check_calibration(calibration)
    settings.parts(calibration is not None)  # an explicitly requested part needs calibration data
    step = CompressStep(example_inputs, settings, calibration=calibration, evaluate=evaluate, progress=progress)

    with progress_scope(progress):  # every nested step (fine-tuning loops too) follows progress
        result = _run(model, budget, step, refine, finetune, steps, retrain_cfg, evaluate, inplace)
    result.original = None if inplace else model
    result.example_inputs = example_inputs
    return result


def _run(model: nn.Module, budget: float, step: CompressStep, refine: Any, finetune: Any, steps: int,
         retrain_cfg: Retrain, evaluate: Any, inplace: bool) -> OptimizeResult:
    """The workflow asked for: refine, a single step or a schedule."""
    if refine is not None:
        if not isinstance(refine, Refine):
            raise TypeError(f"refine must be an autorank.Refine, got {type(refine).__name__}")
        if finetune is not None or steps != 1:
            raise ValueError("refine applies to single-step compression (no finetune, steps=1)")
        result = run_refine(model if inplace else copy_model(model), budget, step, refine)
    else:
        schedule = Schedule.build(budget, steps, retrain_cfg, finetune, evaluate)
        if schedule.is_single:
            result = step(model if inplace else copy_model(model), budget)
        elif inplace:
            raise ValueError("inplace=True applies to single-step compression only (no finetune, steps=1)")
        else:
            result = run_schedule(model, step, schedule)
    return result
