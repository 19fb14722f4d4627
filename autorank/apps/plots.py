"""Figures of budget sweeps and plans (matplotlib, imported only when a figure is built).

Every ``*_figure`` function builds and returns a ``matplotlib.figure.Figure`` from
plain data (so it can be inspected or saved by the caller); :func:`save_figure`
writes it as PNG and SVG; :func:`plot_sweep` draws all figures of a sweep directory
written by :func:`autorank.apps.sweep.run_sweep`.

Figures use the non-interactive ``Agg`` canvas directly, so nothing global
(matplotlib's backend, pyplot state) is touched.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = [
    "pareto_front", "metric_vs_budget_figure", "allocation_figure", "error_curves_figure",
    "graph_figure", "save_figure", "plot_sweep", "kept_fractions",
]

log = logging.getLogger(__name__)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def pareto_front(costs: Sequence[float], values: Sequence[float], higher_is_better: bool = True) -> list[int]:
    """Indices of the points not dominated by another (lower or equal cost and better or equal value).

    Sorted by increasing cost.  Ties in both coordinates keep the first point.
    """
    sign = 1.0 if higher_is_better else -1.0
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -sign * values[i]))
    front, best = [], float("-inf")
    for i in order:
        v = sign * values[i]
        if v > best:
            front.append(i)
            best = v
    return front


def _quality(row: Mapping[str, Any]) -> tuple[float | None, str, bool]:
    """(value, label, higher_is_better) of a row: accuracy after fine-tuning, before, else max error."""
    if row.get("metric_after") is not None:
        return row["metric_after"], "held-out accuracy after fine-tuning (%)", True
    if row.get("metric_before") is not None:
        return row["metric_before"], "held-out accuracy, no fine-tuning (%)", True
    return row.get("max_error"), "largest predicted layer error (lower is better)", False


_MARKERS = ("o", "s", "^", "D", "v", "P")
_DASHES = ("-", "--", "-.", ":")


def metric_vs_budget_figure(state: Mapping[str, Any]):
    """Quality vs size of every sweep row: a params axis and a MACs axis, one line per method.

    A sweep with ``metric = "latency"`` gets a third axis: quality vs the measured latency.

    The Pareto front over all methods is drawn as a dashed black line with open markers,
    and the original model as a grey horizontal line (when it was evaluated).
    """
    rows = [r for r in state.get("rows", []) if r.get("status") == "ok"]
    base = state.get("baseline") or {}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    panels = [("params", "parameters"), ("flops", "MACs")]
    if (state.get("config") or {}).get("metric") == "latency":  # a latency sweep: quality vs measured latency too
        panels.append(("latency_ms", "latency (ms)"))
    fig = _figure(5.5 * len(panels), 4.4)
    axes = fig.subplots(1, len(panels))
    label, higher = "metric", True
    for ax, (key, unit) in zip(axes, panels):
        for i, m in enumerate(methods):
            mr = sorted((r for r in rows if r["method"] == m), key=lambda r: r[key])
            ys = [_quality(r)[0] for r in mr]
            # distinct markers and dashes, so methods that coincide stay visible
            ax.plot([r[key] for r in mr], ys, marker=_MARKERS[i % len(_MARKERS)], ms=7 - 1.5 * (i % 3),
                    ls=_DASHES[i % len(_DASHES)], label=m)
        pts = [(r[key], _quality(r)[0]) for r in rows if _quality(r)[0] is not None]
        if rows:
            label, higher = _quality(rows[0])[1:]
        if pts:
            idx = pareto_front([p[0] for p in pts], [p[1] for p in pts], higher)
            ax.plot([pts[i][0] for i in idx], [pts[i][1] for i in idx], ls="-", color="black", lw=0.8,
                    alpha=0.6, marker="o", mfc="none", ms=13, label="Pareto front")
        if higher and base.get("metric") is not None:
            ax.axhline(base["metric"], color="grey", lw=1, ls=":", label=f"original ({base['metric']:.2f})")
        if base.get(key):
            top = ax.secondary_xaxis("top", functions=(lambda v, b=base[key]: v / b, lambda f, b=base[key]: f * b))
            top.set_xlabel(f"fraction of the original {unit}")
        ax.set_xlabel(f"{unit} of the compressed model")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    model = (state.get("config") or {}).get("model", "model")
    fig.suptitle(f"{model}: quality vs size per method (budget metric: "
                 f"{(state.get('config') or {}).get('metric', '?')})")
    return fig


def kept_fractions(plan: Mapping[str, Any], metric: str | None = None) -> dict[str, float]:
    """``{layer: compressed / dense}`` cost of a plan dict (``Plan.to_dict()``), in the plan's metric."""
    metric = metric or plan.get("metric", "params")
    key = "params" if metric == "params" else "flops"
    return {lp["name"]: lp[key] / lp[f"dense_{key}"] if lp[f"dense_{key}"] else 1.0 for lp in plan["layers"]}


def allocation_figure(state: Mapping[str, Any], budget: float):
    """Kept fraction of every layer at one budget, grouped bars, one colour per method."""
    rows = [r for r in state.get("rows", []) if r.get("status") == "ok" and abs(r["budget"] - budget) < 1e-12]
    if not rows:
        raise ValueError(f"no finished row at budget {budget:g}; budgets: "
                         f"{sorted({r['budget'] for r in state.get('rows', [])})}")
    fracs = {r["method"]: kept_fractions(r["plan"]) for r in rows}
    layers = list(dict.fromkeys(n for f in fracs.values() for n in f))
    metric = rows[0]["plan"].get("metric", "params")
    fig = _figure(max(6.0, 0.9 * len(layers) * max(1, len(rows)) / 2 + 3), 4.2)
    ax = fig.subplots()
    width = 0.8 / len(rows)
    for i, (m, f) in enumerate(fracs.items()):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(layers))]
        ax.bar(xs, [f.get(n, 1.0) for n in layers], width, label=m)
    ax.set_xticks(range(len(layers)), layers, rotation=30 if len(layers) > 6 else 0, ha="right" if
                  len(layers) > 6 else "center")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_ylabel(f"kept fraction of the layer's {'parameters' if metric == 'params' else 'MACs'}")
    ax.set_xlabel("layer")
    ax.set_title(f"per-layer allocation at budget {budget:g} of {metric}")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return fig


def error_curves_figure(curves: Mapping[str, Mapping[str, Any]]):
    """Error eps(j, k) vs rank j of every layer, one line per number of groups k.

    ``curves`` is :func:`autorank.apps.sweep.curves_data` output: ``{layer: {k: {"rank", "error"}}}``.
    """
    names = list(curves)
    if not names:
        raise ValueError("no layer curves to plot")
    cols = min(3, len(names))
    nrows = -(-len(names) // cols)
    fig = _figure(4.2 * cols, 3.3 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        for k, c in curves[name].items():
            if k == "dense":
                continue
            ax.plot(c["rank"], c["error"], label=f"k={k}")
        ax.set_title(name)
        ax.set_xlabel("rank j per group")
        ax.set_ylabel("relative error eps(j)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle("per-layer error curves (ALDS, k input-channel groups)")
    return fig


def _layered_positions(g) -> dict[Any, tuple[float, float]]:
    import networkx as nx

    if nx.is_directed_acyclic_graph(g):
        pos = {}
        for depth, nodes in enumerate(nx.topological_generations(g)):
            nodes = sorted(nodes, key=str)
            for i, n in enumerate(nodes):
                pos[n] = (depth, (len(nodes) - 1) / 2 - i)
        return pos
    return nx.spring_layout(g, seed=0)


def graph_figure(graph, kept: Mapping[str, float], title: str = "layer graph"):
    """The layer graph (``LayerGraph.graph``) with compressed layers coloured by their kept fraction.

    Compressible layers get a viridis colour (dark: little kept); other modules are grey.
    """
    import matplotlib as mpl
    import networkx as nx

    pos = _layered_positions(graph)
    depth = max((x for x, _ in pos.values()), default=0) + 1
    height = max((abs(y) for _, y in pos.values()), default=0) * 2 + 1
    fig = _figure(min(24.0, max(6.0, 0.95 * depth)), 2.6 + 0.9 * height)
    ax = fig.subplots()
    cmap, norm = mpl.colormaps["viridis"], mpl.colors.Normalize(0, 1)
    colours = [cmap(norm(kept[n])) if n in kept else "lightgrey" for n in graph.nodes]
    nx.draw_networkx_edges(graph, pos, ax=ax, arrows=True, edge_color="grey", node_size=450)
    nx.draw_networkx_nodes(graph, pos, ax=ax, node_color=colours, node_size=450, edgecolors="black",
                           linewidths=0.5)
    for n, (x, y) in pos.items():
        text = f"{n}\n{kept[n]:.2f}" if n in kept else str(n)
        ax.text(x, y - 0.22, text, fontsize=8, va="top", ha="center",
                fontweight="bold" if n in kept else "normal")
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, orientation="horizontal",
                 fraction=0.08, aspect=40, label="kept fraction of the layer (grey: not compressible)")
    ax.set_title(title)
    ax.set_axis_off()
    ys = [p[1] for p in pos.values()]
    ax.set_ylim(min(ys) - 0.7, max(ys) + 0.4)
    ax.set_xlim(-0.6, depth - 0.4)
    return fig


def save_figure(fig, path: str | os.PathLike, formats: Sequence[str] = ("png", "svg"), dpi: int = 130) -> list[Path]:
    """Save ``fig`` as ``path.<fmt>`` for every format; returns the written paths."""
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        p = base.parent / f"{base.name}.{fmt}"
        fig.savefig(p, dpi=dpi)
        out.append(p)
    return out


def plot_sweep(out_dir: str | os.PathLike, budget: float | None = None, method: str | None = None,
               formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """All figures of a sweep directory, written to ``out_dir/plots/``; returns the file paths.

    ``budget`` picks the allocation comparison and the graph colouring (default: the
    smallest budget with results); ``method`` the plan the graph is coloured by (default: the first).
    """
    import json

    import networkx as nx

    from .sweep import read_results

    root = Path(out_dir)
    state = read_results(root)
    rows = [r for r in state.get("rows", []) if r.get("status") == "ok"]
    if not rows:
        raise ValueError(f"{str(root)!r} has no finished sweep rows to plot")
    plots = root / "plots"
    paths: list[Path] = []
    paths += save_figure(metric_vs_budget_figure(state), plots / "metric_vs_budget", formats)
    if budget is None:
        budget = min(r["budget"] for r in rows)
    paths += save_figure(allocation_figure(state, budget), plots / f"allocation_{budget:g}".replace(".", "p"), formats)
    if (root / "curves.json").is_file():
        curves = json.loads((root / "curves.json").read_text())
        paths += save_figure(error_curves_figure(curves), plots / "error_curves", formats)
    if (root / "graph.json").is_file():
        g = nx.node_link_graph(json.loads((root / "graph.json").read_text()), edges="edges")
        pick = [r for r in rows if r["budget"] == budget and (method is None or r["method"] == method)]
        if not pick:
            raise ValueError(f"no finished row for method {method!r} at budget {budget:g}")
        r = pick[0]
        fig = graph_figure(g, kept_fractions(r["plan"]), f"layer graph: {r['method']} at budget {budget:g}")
        paths += save_figure(fig, plots / f"graph_{r['method']}_{budget:g}".replace(".", "p"), formats)
    log.info("wrote %d figure files to %s", len(paths), plots)
    return paths
