"""What :func:`autorank.optimize` returns: :class:`OptimizeResult` and its reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch.nn as nn

from .curves import LayerCurves
from .graph import LayerGraph
from .io import save
from .latency import layer_latencies, measure_latency
from .plan import Plan

__all__ = ["OptimizeResult", "history_table"]


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
        text = self.plan.summary(max_rows=max_rows, error_against=self.error_reference())
        ref = self.plan.config.get("refine")
        if ref:
            text += (f"\n\nrefine (Optuna, seed {ref['seed']}): best trial {ref['best_trial']} of {ref['n_trials']} "
                     f"({ref['pruned']} pruned), metric {ref['best_metric']:.4f} vs unrefined "
                     f"{ref['baseline_metric']:.4f} (gain {ref['gain']:+.4f}); best settings {ref['best_params']}")
        if self.history:
            text += "\n\n" + history_table(self.history)
            if (self.plan.config.get("schedule") or {}).get("mode") == "cascade" and len(self.history) > 2:
                text += ("\n(cascade: each step's max error is against the model it compressed, the step "
                         "before; params and MACs are against the original)")
        if latency:
            text += "\n\n" + self.latency_report(repeats=repeats, threads=threads)
        return text

    def error_reference(self) -> str | None:
        """What the plan's layer errors are relative to, when it is not the original model.

        In a cascade schedule step ``s`` compresses the fine-tuned model of step ``s - 1``,
        so its errors measure that step's change only (a layer kept at the rank it already
        had shows error 0), while params and MACs compare with the original layer.
        """
        sched = self.plan.config.get("schedule") or {}
        step = sched.get("step")
        if sched.get("mode") == "cascade" and isinstance(step, int) and step > 1:
            return f"step {step - 1}"
        return None

    def latency_report(self, repeats: int = 20, threads: int | None = None) -> str:
        """Measured forward latency: whole model and per factorised layer, original vs compressed."""
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
    lines = [line.format(*head), line.format(*("-" * w for w in widths))] + [line.format(*r) for r in rows]
    return "\n".join(ln.rstrip() for ln in lines)
