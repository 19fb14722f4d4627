r"""Optuna refinement of the global step against a user metric on held-out data.

The solver minimises a proxy (the largest, or the summed, per-layer error).  A
few knobs of that proxy can be tuned against what the user actually cares
about, measured on held-out batches:

* **per-layer-type error weights** ``w_g``: layers are grouped by their name with
  every number replaced by ``*`` (``encoder.layer.*.attention.self.query``,
  ``layer*.*.conv1``, ...), so one weight covers one layer type across blocks;
  the solver then sees ``w_g * eps``.  Weights are sampled log-uniformly in
  ``[1/weight_range, weight_range]``.
* **the objective** (``"max"`` or ``"sum"``) and, for ``"sum"``, an **exponent**
  ``p``: the solver sees ``(w_g * eps)^p``, which makes the knapsack more (``p > 1``)
  or less (``p < 1``) averse to large single-layer errors.

Every trial allocates on the same curves (no new SVDs), builds the plan on a
copy of the model exactly as the result is built (the sequential refit included
when the data-aware recipe runs it) and scores it batch by batch; the running mean is reported
to Optuna after each batch, so a :class:`optuna.pruners.MedianPruner` stops
hopeless trials early.  Trial 0 is always the unrefined setting, so the gain is
measured against it, and the result is reproducible for a given ``seed`` (TPE
sampler seeded, trials run sequentially).

The default metric is the output fidelity: the mean cosine similarity between
the original and the compressed model's output vectors (the last axis of the
primary output tensor: ``last_hidden_state`` or ``logits``), over the positions an
``attention_mask`` keeps.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn

from .config import SolverConfig
from .progress import Progress
from .nested import entry, primary_tensor, run_model

__all__ = ["Refine", "run_refine", "layer_type", "output_fidelity"]

log = logging.getLogger(__name__)


def layer_type(name: str) -> str:
    """The group a layer's error weight belongs to: its name with every number replaced by ``*``."""
    return re.sub(r"\d+", "*", name)


@dataclass(frozen=True)
class Refine:
    """Settings of the Optuna refinement (``optimize(..., refine=Refine(...))``).

    heldout: held-out batches (in the form of ``example_inputs``; disjoint from the
        calibration data), scored one by one.
    metric: ``metric(model, batch, reference_output) -> float``, higher is better;
        ``None``: :func:`output_fidelity`.  ``reference_output`` is the original
        model's output on ``batch`` (computed once).
    n_trials: number of trials, including the unrefined one.
    seed: seed of the TPE sampler.
    knobs: which knobs to tune: ``"weights"`` (per-layer-type error weights) and/or
        ``"objective"`` (``max``/``sum`` and the exponent).
    weight_range: per-layer-type weights lie in ``[1/weight_range, weight_range]``.
    timeout: stop starting new trials after this many seconds (None: no limit).
    """

    heldout: Any
    metric: Callable[[nn.Module, Any, Any], float] | None = None
    n_trials: int = 20
    seed: int = 0
    knobs: tuple[str, ...] = ("weights", "objective")
    weight_range: float = 4.0
    timeout: float | None = None

    def __post_init__(self) -> None:
        held = self.heldout
        if held is None or isinstance(held, (torch.Tensor, Mapping, str)):
            raise TypeError("Refine.heldout must be a list (or other re-iterable) of input batches, "
                            f"got {type(held).__name__}")
        try:
            held = list(held)
        except TypeError:
            raise TypeError(f"Refine.heldout must be an iterable of batches, got {type(self.heldout).__name__}") from None
        if not held:
            raise ValueError("Refine.heldout is empty: give at least one held-out batch")
        object.__setattr__(self, "heldout", held)
        if self.metric is not None and not callable(self.metric):
            raise TypeError(f"Refine.metric must be callable(model, batch, reference) or None, got {self.metric!r}")
        if isinstance(self.n_trials, bool) or not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise ValueError(f"Refine.n_trials must be an int >= 1, got {self.n_trials!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"Refine.seed must be an int, got {self.seed!r}")
        knobs = (self.knobs,) if isinstance(self.knobs, str) else tuple(self.knobs)
        bad = [k for k in knobs if k not in ("weights", "objective")]
        if bad or not knobs:
            raise ValueError(f"Refine.knobs must be a non-empty subset of ('weights', 'objective'), got {self.knobs!r}")
        object.__setattr__(self, "knobs", knobs)
        if not isinstance(self.weight_range, (int, float)) or isinstance(self.weight_range, bool) \
                or not 1.0 < float(self.weight_range) <= 100.0:
            raise ValueError(f"Refine.weight_range must be in (1, 100], got {self.weight_range!r}")
        if self.timeout is not None and (not isinstance(self.timeout, (int, float)) or self.timeout <= 0):
            raise ValueError(f"Refine.timeout must be a positive number of seconds or None, got {self.timeout!r}")


def output_fidelity(model: nn.Module, batch: Any, reference: Any) -> float:
    """Mean cosine similarity of output vectors (last axis of the primary output tensor) to ``reference``.

    The primary output tensor is :func:`autorank.nested.primary_tensor` (``last_hidden_state``
    or ``logits`` of a Hugging Face output, the first tensor of a tuple).

    Positions where a dict batch's ``attention_mask`` is 0 are left out.
    """
    with torch.no_grad():
        out = primary_tensor(run_model(model, batch)).float()
    ref = primary_tensor(reference).float()
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    mask = entry(batch, "attention_mask")
    if mask is not None and tuple(mask.shape) == tuple(cos.shape):
        return float((cos * mask).sum() / mask.sum().clamp_min(1))
    return float(cos.mean())


def _weighted_curves(curves: Mapping[str, Any], weights: Mapping[str, float], exponent: float) -> dict[str, Any]:
    out = {}
    for name, lc in curves.items():
        w = weights.get(layer_type(name), 1.0)
        out[name] = replace(lc, error=np.power(w * lc.error, exponent))
    return out


def run_refine(work: nn.Module, budget: float, step: Any, refine: Refine) -> Any:
    """Prepare once, run the Optuna study, then realise the best trial on ``work`` (in place)."""
    import optuna

    t0 = time.perf_counter()
    prep = step.prepare(work)
    dense = copy.deepcopy(work)
    references = []
    dense.eval()
    with torch.no_grad():
        for batch in refine.heldout:
            references.append(run_model(dense, batch))
    metric = refine.metric or output_fidelity
    groups = sorted({layer_type(n) for n in prep.curves})
    cache: dict[str, Any] = {}
    base_solver = step.settings.solver

    def settings(trial) -> tuple[dict[str, float], SolverConfig, float]:
        weights = {}
        if "weights" in refine.knobs:
            for g in groups:
                weights[g] = trial.suggest_float(f"w[{g}]", 1.0 / refine.weight_range, refine.weight_range, log=True)
        solver, exponent = base_solver, 1.0
        if "objective" in refine.knobs:
            objective = trial.suggest_categorical("objective", ["max", "sum"])
            exponent = trial.suggest_float("exponent", 0.5, 4.0, log=True) if objective == "sum" else 1.0
            solver = replace(base_solver, objective=objective, method="auto")
        return weights, solver, exponent

    def pick(weights, solver, exponent):
        curves = _weighted_curves(prep.curves, weights, exponent) if weights or exponent != 1.0 else prep.curves
        picked, _ = step.choose(work, prep, budget, curves=curves, solver=solver, cache=cache)
        return picked

    def objective_fn(trial) -> float:
        weights, solver, exponent = settings(trial)
        picked = pick(weights, solver, exponent)
        candidate = copy.deepcopy(dense)
        step.build(candidate, prep, step.plan(prep, picked, budget, solver))  # what the result will be
        candidate.eval()
        scores = []
        for i, (batch, ref) in enumerate(zip(refine.heldout, references)):
            scores.append(float(metric(candidate, batch, ref)))
            trial.report(float(np.mean(scores)), i)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return float(np.mean(scores))

    # Optuna's own INFO lines ("A new study created", one per trial) only when autorank logs at DEBUG
    verbosity = optuna.logging.get_verbosity()
    if not logging.getLogger("autorank").isEnabledFor(logging.DEBUG):
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = _study(optuna, refine, objective_fn, groups, base_solver)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return _finish(optuna, study, work, budget, step, refine, prep, settings, pick, t0)


def _study(optuna: Any, refine: Refine, objective_fn: Callable, groups: list[str], base_solver: SolverConfig) -> Any:
    """Create the seeded study, enqueue the unrefined settings as trial 0, and run the trials."""
    sampler = optuna.samplers.TPESampler(seed=refine.seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    baseline_params: dict[str, Any] = {}
    if "weights" in refine.knobs:
        baseline_params.update({f"w[{g}]": 1.0 for g in groups})
    if "objective" in refine.knobs:
        baseline_params["objective"] = base_solver.objective
        if base_solver.objective == "sum":
            baseline_params["exponent"] = 1.0
    study.enqueue_trial(baseline_params)
    with Progress("refine trials", total=refine.n_trials, unit="trial") as bar:
        def report(study: Any, trial: Any) -> None:
            best = [t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
            bar.update(1, f"best {max(best):.4f}" if best else None)

        study.optimize(objective_fn, n_trials=refine.n_trials, timeout=refine.timeout, callbacks=[report])
    return study


def _finish(optuna: Any, study: Any, work: nn.Module, budget: float, step: Any, refine: Refine, prep: Any,
            settings: Callable, pick: Callable, t0: float) -> Any:
    """Realise the best trial on ``work`` and record the study in ``plan.config["refine"]``."""
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    baseline = study.trials[0].value
    best = study.best_trial
    weights, solver, exponent = settings(optuna.trial.FixedTrial(best.params))
    picked = pick(weights, solver, exponent)
    worst = max(float(prep.curves[n].error[i]) for n, i in picked.items())
    timings = dict(prep.timings)
    timings["refine"] = time.perf_counter() - t0
    result = step.finish(work, budget, prep, picked, worst, timings, t0, solver=solver)
    report = {
        "n_trials": len(study.trials),
        "completed": len(done),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
        "baseline_metric": baseline,
        "best_metric": best.value,
        "gain": None if baseline is None else best.value - baseline,
        "best_trial": best.number,
        "best_params": dict(best.params),
        "seed": refine.seed,
    }
    result.plan.config["refine"] = report
    log.info("refine: best trial %d of %d, metric %.4f (unrefined %.4f, gain %+.4f)", best.number,
             len(study.trials), best.value, baseline if baseline is not None else float("nan"),
             report["gain"] or 0.0)
    return result
