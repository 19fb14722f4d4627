"""The retraining scheduler: compress -> fine-tune, repeated over a budget schedule.

Budgets run from 1.0 down to the target.  A schedule is a plain function::

    one_shot(0.3, 3)   -> [0.3]
    linear(0.3, 3)     -> [0.7667, 0.5333, 0.3]          1 - (1 - b) * i / n
    geometric(0.3, 3)  -> [0.6694, 0.4481, 0.3]          b ** (i / n)

Every step (1) densifies the model it starts from, (2) builds the error curves on
its current weights, (3) allocates, (4) realises, (5) fine-tunes and (6) evaluates.

Two modes, as in the reference:

* ``"cascade"``: step ``s`` starts from the fine-tuned model of step ``s - 1``.
  Layers that are already factorised are turned back into their exact dense
  product (:func:`autorank.realize.densify`) and re-factorised, because the
  product of fine-tuned factors is what the network computes, its truncated SVD
  is optimal for it, and the allocator may then re-choose ``k`` and ``j`` of
  every layer against the original model's budget (a re-factorisation at the
  same or a higher rank reproduces the layer exactly).
* ``"one-shot"``: every step compresses the *original* model (each step then
  fine-tunes from the original weights).

Budgets always refer to the original model's parameters (or FLOPs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .config import Retrain, check_budget
from .finetune import FinetuneContext, check_finetuner, run_finetuner
from .graph import count_flops, count_params
from .io import load, load_plan, save
from .progress import track
from .realize import copy_model, densify
from .result import OptimizeResult

__all__ = ["one_shot", "linear", "geometric", "SCHEDULES", "Schedule", "run_schedule", "budgets_of",
           "model_fingerprint"]

log = logging.getLogger(__name__)

STATE_FILE = "schedule.json"


def one_shot(target: float, steps: int) -> list[float]:
    """A single step straight to ``target`` (``steps`` is ignored)."""
    return [target]


def linear(target: float, steps: int) -> list[float]:
    """``1 - (1 - target) * i / steps`` for ``i = 1 .. steps``."""
    return [1.0 - (1.0 - target) * i / steps for i in range(1, steps)] + [target]


def geometric(target: float, steps: int) -> list[float]:
    """``target ** (i / steps)`` for ``i = 1 .. steps``: the same ratio between successive budgets."""
    return [target ** (i / steps) for i in range(1, steps)] + [target]


SCHEDULES: dict[str, Callable[[float, int], list[float]]] = {
    "one-shot": one_shot,
    "linear": linear,
    "geometric": geometric,
}


def budgets_of(schedule: str | tuple[float, ...], target: float, steps: int) -> tuple[float, ...]:
    """The budgets of a named schedule, or an explicit list checked to end at ``target``."""
    if isinstance(schedule, str):
        return tuple(float(b) for b in SCHEDULES[schedule](target, steps))
    if not math.isclose(schedule[-1], target, rel_tol=1e-9):
        raise ValueError(f"schedule: the last budget must be the target {target:g}, got {schedule[-1]:g}")
    return tuple(float(b) for b in schedule)


@dataclass(frozen=True)
class Schedule:
    """A validated compress -> fine-tune schedule (built by :func:`autorank.optimize`)."""

    budgets: tuple[float, ...]
    mode: str = "cascade"
    finetune: Any = None
    evaluate: Callable[[nn.Module], float] | None = None
    min_metric: float | None = None
    checkpoint: Path | None = None

    @property
    def is_single(self) -> bool:
        """A plain compression: one budget, nothing to fine-tune, evaluate or save."""
        return (len(self.budgets) == 1 and self.finetune is None and self.evaluate is None
                and self.checkpoint is None)

    @classmethod
    def build(cls, target: float, steps: Any, retrain: Retrain, finetune: Any, evaluate: Any) -> "Schedule":
        """The schedule of ``steps`` budgets down to ``target`` run as ``retrain`` says."""
        target = check_budget(target)
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"steps must be an int >= 1, got {steps!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not isinstance(retrain, Retrain):
            raise TypeError(f"retrain must be an autorank.Retrain, got {type(retrain).__name__}")
        check_finetuner(finetune)
        if evaluate is not None and not callable(evaluate):
            raise TypeError(f"evaluate must be a callable evaluate(model) -> float, got {type(evaluate).__name__}")
        if retrain.min_metric is not None and evaluate is None:
            raise ValueError("min_metric needs evaluate= to measure the metric")
        return cls(budgets_of(retrain.schedule, target, steps), retrain.mode, finetune, evaluate, retrain.min_metric,
                   None if retrain.checkpoint is None else Path(retrain.checkpoint))


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """``{"architecture": ..., "weights": ...}``: SHA-256 digests (16 hex digits) of ``model``.

    ``architecture`` hashes the module tree (``repr(model)``) with every parameter's and
    buffer's name, shape and dtype; ``weights`` hashes the bytes of every parameter and
    buffer, in ``state_dict`` order.  One read of the weights (hashing runs at about 1 GB/s).
    """
    arch = hashlib.sha256(repr(model).encode())
    weights = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=True).items():
        arch.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.is_meta:
            continue
        flat = t.detach().reshape(-1).contiguous().cpu()
        weights.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return {"architecture": arch.hexdigest()[:16], "weights": weights.hexdigest()[:16]}


def fingerprint(schedule: Schedule, step: Any, model: dict[str, str] | None = None) -> dict[str, Any]:
    """What must match for a checkpointed schedule to resume: the model (:func:`model_fingerprint`), the
    budgets and mode, and the step's record."""
    return {**({"model": model} if model is not None else {}), "budgets": list(schedule.budgets),
            "mode": schedule.mode, "metric": step.metric, **step.record()}


def _check_resumable(ckpt: Path, saved: Any, wanted: dict[str, Any]) -> None:
    """A ValueError when checkpoint ``ckpt`` (fingerprint ``saved``) belongs to another model or schedule."""
    if not isinstance(saved, dict):
        saved = {}
    afresh = f"delete {str(ckpt)!r} to start afresh, or pass another Retrain(checkpoint=...)"
    old, new = saved.get("model"), wanted["model"]
    if old != new:
        if not isinstance(old, dict):
            raise ValueError(f"checkpoint {str(ckpt)!r} records no model fingerprint (it was written by an older "
                             f"autorank), so it cannot be checked to belong to this model ({new}); {afresh}")
        what = "architecture" if old.get("architecture") != new["architecture"] else "weights"
        raise ValueError(f"checkpoint {str(ckpt)!r} was written for another model (its {what} differ): the "
                         f"checkpoint's model fingerprint is {old}, this model's is {new}; {afresh}")
    if saved != wanted:
        raise ValueError(f"checkpoint {str(ckpt)!r} holds a different schedule {saved}; this run asks for "
                         f"{wanted}; {afresh}")


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _evaluate(evaluate, model: nn.Module) -> float | None:
    if evaluate is None:
        return None
    value = evaluate(model)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"evaluate(model) must return a number, got {value!r}") from None


def run_schedule(model: nn.Module, step: Any, schedule: Schedule) -> Any:
    """Run ``schedule`` on a copy of ``model``; ``step`` is an :class:`autorank.pipeline.CompressStep`."""
    ckpt = schedule.checkpoint
    history: list[dict[str, Any]] = []
    done = 0
    current: OptimizeResult | None = None
    wanted = fingerprint(schedule, step, model_fingerprint(model)) if ckpt is not None else {}
    if ckpt is not None and (ckpt / STATE_FILE).is_file():
        try:
            state = json.loads((ckpt / STATE_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{str(ckpt / STATE_FILE)!r} is not JSON ({exc.msg}); delete {str(ckpt)!r} to start "
                             "afresh") from None
        _check_resumable(ckpt, state.get("fingerprint") if isinstance(state, dict) else None, wanted)
        history, done = state["history"], state["done"]
        if done:
            current = _restore(ckpt, done, model)
            rng = ckpt / "rng_state.pt"
            if rng.is_file():
                torch.set_rng_state(_load_rng_state(rng))
        log.info("resuming from %s after step %d of %d", ckpt, done, len(schedule.budgets))

    if not history:
        t = time.perf_counter()
        base = _evaluate(schedule.evaluate, model)
        history.append({
            "step": 0, "budget": 1.0, "params": count_params(model),
            "flops": count_flops(model, step.example_inputs), "metric_compressed": base, "metric": base,
            "max_error": 0.0, "compress_s": 0.0, "finetune_s": 0.0, "time_s": time.perf_counter() - t,
        })

    # a resumed run that had already stopped on min_metric stays stopped
    stopped_early = _fell_below(history, schedule.min_metric)
    results: dict[int, OptimizeResult] = {} if current is None else {done: current}
    for s, budget in track(list(enumerate(schedule.budgets, start=1)), "compress -> fine-tune schedule",
                           unit="step", note=lambda item: f"step {item[0]}, budget {item[1]:.4f}"):
        if s <= done or stopped_early:
            continue
        if schedule.mode == "cascade" and current is not None:
            source = densify(copy_model(current.model, "to start the next step from the last one"))
        else:
            source = copy_model(model)
        t = time.perf_counter()
        result = step(source, budget)
        t_compress = time.perf_counter() - t
        m_compressed = _evaluate(schedule.evaluate, result.model)
        t = time.perf_counter()
        ft_info = {}
        if schedule.finetune is not None:
            ft_info = run_finetuner(schedule.finetune, result.model,
                                    FinetuneContext(step=s, teacher=model, calibration=step.calibration,
                                                    example_inputs=step.example_inputs))
        t_finetune = time.perf_counter() - t
        m_final = _evaluate(schedule.evaluate, result.model) if schedule.finetune is not None else m_compressed
        totals = result.plan.totals
        history.append({
            "step": s, "budget": budget, "params": totals["params"], "flops": totals["flops"],
            "metric_compressed": m_compressed, "metric": m_final, "max_error": result.plan.max_error,
            "compress_s": t_compress, "finetune_s": t_finetune, "time_s": t_compress + t_finetune,
            **({"finetune": {k: v for k, v in ft_info.items() if isinstance(v, (int, float))}} if ft_info else {}),
        })
        log.info("step %d/%d: budget %.4f, params %d, metric %s -> %s (%.1fs)", s, len(schedule.budgets),
                 budget, totals["params"], m_compressed, m_final, t_compress + t_finetune)
        current = result
        results[s] = result
        if ckpt is not None:
            save(result.model, result.plan, ckpt / f"step-{s}")
            torch.save(torch.get_rng_state(), ckpt / ".rng_state.pt.tmp")
            os.replace(ckpt / ".rng_state.pt.tmp", ckpt / "rng_state.pt")
            _write_atomic(ckpt / STATE_FILE, json.dumps({"fingerprint": wanted, "done": s, "history": history},
                                                        indent=2))
        if schedule.min_metric is not None and m_final is not None and m_final < schedule.min_metric:
            stopped_early = True
            log.warning("step %d: metric %.4f fell below min_metric %.4f; stopping", s, m_final, schedule.min_metric)
            break

    # a resumed run may choose a step it did not run this time: it is read back from the checkpoint
    saved = {h["step"] for h in history[1:] if ckpt is not None and (ckpt / f"step-{h['step']}").is_dir()}
    chosen = _pick_step(set(results) | saved, history, schedule, stopped_early)
    final = results[chosen] if chosen in results else _restore(ckpt, chosen, model)
    final.history = history
    # the reports read this: in a cascade, a step's layer errors are against the model it compressed
    final.plan.config["schedule"] = {"mode": schedule.mode, "budgets": list(schedule.budgets), "step": chosen}
    return final


def _load_rng_state(path: Path) -> torch.Tensor:
    """The RNG state saved at ``path``, read with ``weights_only=True`` (a crafted pickle cannot run code)."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{str(path)!r} is not a saved RNG state (torch.load(weights_only=True) refused it: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); delete the "
                         "checkpoint folder to start afresh") from exc
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
        raise ValueError(f"{str(path)!r} does not hold an RNG state (a uint8 tensor); got {type(state).__name__}")
    return state


def _restore(ckpt: Path, s: int, model: nn.Module) -> OptimizeResult:
    """The result of step ``s`` saved in checkpoint ``ckpt`` (without its graph and curves)."""
    step_dir = ckpt / f"step-{s}"
    plan = load_plan(step_dir)
    plan.weights = {}  # the record of the saved file, not part of the result's plan
    return OptimizeResult(model=load(step_dir, model), plan=plan, graph=None, curves={})


def _fell_below(history: list[dict[str, Any]], min_metric: float | None) -> bool:
    """Whether a step of ``history`` ended below ``min_metric`` (the schedule then stopped there)."""
    return min_metric is not None and any(h["metric"] is not None and h["metric"] < min_metric
                                          for h in history[1:])


def _pick_step(available: set[int], history, schedule: Schedule, stopped_early: bool) -> int:
    """The last step, or after an early stop the last step whose metric met ``min_metric``."""
    last = max(available)
    if not stopped_early:
        return last
    ok = [h["step"] for h in history[1:] if h["metric"] is not None and h["metric"] >= schedule.min_metric
          and h["step"] in available]
    if not ok:
        log.warning("no step met min_metric=%g; returning the last step (budget %.4f)",
                    schedule.min_metric, schedule.budgets[last - 1])
        return last
    best = max(ok)
    log.warning("returning step %d (budget %.4f) instead of the target budget %.4f: it is the last step that "
                "met min_metric=%g", best, schedule.budgets[best - 1], schedule.budgets[-1], schedule.min_metric)
    return best
