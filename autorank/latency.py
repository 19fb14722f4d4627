"""Wall-clock latency of forward passes: whole models and single layers.

:func:`measure_latency` times ``repeats`` forward passes (after ``warmup`` untimed
ones) under ``torch.no_grad()`` in eval mode and reports the median and the
inter-quartile range (IQR = q75 - q25) in seconds.  The model's training mode
and torch's intra-op thread count are restored afterwards, also on error.

:func:`layer_latencies` times every compressed layer of a plan against its dense
original on the real input that layer sees (captured by a forward hook on the
original model), and flags the layers whose factorisation is slower than dense.
A smaller layer is not always a faster one: ``k`` groups of rank ``j`` run as
two thin convolutions, and on a CPU thin matrix products can lose to one dense one.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn

from .nested import run_model
from .plan import Plan
from .validate import check_count

__all__ = ["measure_latency", "layer_latencies"]

log = logging.getLogger(__name__)


def _check_counts(repeats: Any, warmup: Any, threads: Any) -> None:
    check_count("repeats", repeats)
    check_count("warmup", warmup, low=0)
    check_count("threads", threads, optional=True)


def measure_latency(
    model: nn.Module,
    example_inputs: Any,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
) -> dict[str, Any]:
    """Median and IQR (seconds) of ``repeats`` forward passes of ``model`` on ``example_inputs``.

    Args:
        model: any module; it runs in eval mode under ``torch.no_grad()`` and its
            training mode is restored afterwards.
        example_inputs: a tensor, a tuple/list of positional inputs or a dict of
            keyword inputs (as for :func:`autorank.analyze`).
        repeats: timed passes (>= 1).
        warmup: untimed passes first (>= 0).
        threads: fix ``torch.set_num_threads`` during the measurement (restored after);
            ``None`` keeps the current setting.

    Returns:
        ``{"median_s", "iqr_s", "q25_s", "q75_s", "min_s", "repeats", "threads"}``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_counts(repeats, warmup, threads)
    was_training = model.training
    old_threads = torch.get_num_threads()
    times = np.empty(repeats)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        model.eval()
        with torch.no_grad():
            for _ in range(warmup):
                run_model(model, example_inputs)
            for i in range(repeats):
                t = time.perf_counter()
                run_model(model, example_inputs)
                times[i] = time.perf_counter() - t
        used = torch.get_num_threads()
    finally:
        model.train(was_training)
        torch.set_num_threads(old_threads)
    q25, med, q75 = np.percentile(times, [25, 50, 75])
    return {"median_s": float(med), "iqr_s": float(q75 - q25), "q25_s": float(q25), "q75_s": float(q75),
            "min_s": float(times.min()), "repeats": repeats, "threads": used}


def _layer_inputs(model: nn.Module, names: Iterable[str], example_inputs: Any) -> dict[str, torch.Tensor]:
    """The first positional input tensor of each named module, from one forward pass of ``model``."""
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def fn(mod, args):
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()
        return fn

    was_training = model.training
    try:
        for n in names:
            handles.append(model.get_submodule(n).register_forward_pre_hook(hook(n)))
        model.eval()
        with torch.no_grad():
            run_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen


def layer_latencies(
    original: nn.Module,
    compressed: nn.Module,
    plan: Plan,
    example_inputs: Any,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Time each compressed layer of ``plan`` against its dense original on its real input.

    The input of every layer is captured by a forward pre-hook on ``original`` running
    ``example_inputs``; the dense module (from ``original``) and the factorised one
    (from ``compressed``, same qualified name) are then timed on that tensor with
    :func:`measure_latency`.

    Returns one dict per compressed layer, in plan order: ``name``, ``family``,
    ``hyper``, ``in_shape``, ``dense_ms``, ``compressed_ms``, ``speedup``
    (dense / compressed) and ``slower`` (True when the factorised layer is slower).
    Layers that were not called on ``example_inputs`` are left out (logged).
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an autorank.Plan, got {type(plan).__name__}")
    _check_counts(repeats, warmup, threads)
    names = [n for n, lp in plan.layers.items() if lp.compressed]
    inputs = _layer_inputs(original, names, example_inputs)
    rows = []
    for name in names:
        if name not in inputs:
            log.warning("layer %s was not called on example_inputs; not timed", name)
            continue
        x = inputs[name]
        dense = measure_latency(original.get_submodule(name), x, repeats, warmup, threads)
        comp = measure_latency(compressed.get_submodule(name), x, repeats, warmup, threads)
        lp = plan.layers[name]
        speedup = dense["median_s"] / comp["median_s"] if comp["median_s"] > 0 else float("inf")
        rows.append({
            "name": name, "family": lp.family, "hyper": dict(lp.hyper), "in_shape": list(x.shape),
            "dense_ms": dense["median_s"] * 1e3, "compressed_ms": comp["median_s"] * 1e3,
            "speedup": speedup, "slower": comp["median_s"] > dense["median_s"],
        })
        if rows[-1]["slower"]:
            log.info("layer %s: factorised %.3f ms is slower than dense %.3f ms",
                     name, rows[-1]["compressed_ms"], rows[-1]["dense_ms"])
    return rows
