"""Figures of budget sweeps and plans (matplotlib, imported only when a figure is built).

Every ``*_figure`` function builds and returns a ``matplotlib.figure.Figure`` from
plain data (so it can be inspected or saved by the caller); :func:`save_figure`
writes it as PNG and SVG; :func:`plot_sweep` draws all figures of a sweep directory
written by :func:`autorank.apps.sweep.run_sweep`, :func:`plot_result` those of one
``autorank optimize`` directory.

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
    "graph_figure", "save_figure", "plot_sweep", "plot_result", "kept_fractions", "plan_allocation_figure",
    "zoom_range", "hyper_text",
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


def zoom_range(rows: Sequence[Mapping[str, Any]], higher_is_better: bool = True,
               baseline: float | None = None) -> tuple[float, float] | None:
    """The value range that matters in a sweep, or None when the full range is already it.

    At every budget the best method's value is taken.  With higher-is-better values, the
    range runs from the best value of any row (or the original model's) down to the worst
    of these per-budget bests, and 60 % of that span again below it, so that methods close
    to the best stay inside; a method that collapses (e.g. uniform at 10 % accuracy) falls
    outside.  Mirrored for lower-is-better values.  None when there are no values, or when
    the range would cover more than half of the full range of the values.
    """
    vals = [(r["budget"], _quality(r)[0]) for r in rows]
    vals = [(b, v) for b, v in vals if v is not None]
    if not vals:
        return None
    pick = max if higher_is_better else min
    best_at: dict[float, float] = {}
    for b, v in vals:
        best_at[b] = v if b not in best_at else pick(best_at[b], v)
    everything = [v for _, v in vals] + ([baseline] if baseline is not None else [])
    if higher_is_better:
        best, edge = max(everything), min(best_at.values())
    else:
        best, edge = min(everything), max(best_at.values())
    span = abs(best - edge) or 0.02 * max(abs(best), 1e-12)
    lo, hi = (edge - 0.6 * span, best + 0.12 * span) if higher_is_better else (best - 0.12 * span, edge + 0.6 * span)
    full = max(everything) - min(everything)
    if full <= 0 or hi - lo > 0.5 * full:
        return None
    return lo, hi


def _quality_panel(ax, rows, methods, key: str, unit: str, base: Mapping[str, Any], label: str,
                   higher: bool, ylim: tuple[float, float] | None = None) -> None:
    for i, m in enumerate(methods):
        mr = sorted((r for r in rows if r["method"] == m), key=lambda r: r[key])
        # distinct markers and dashes, so methods that coincide stay visible
        ax.plot([r[key] for r in mr], [_quality(r)[0] for r in mr], marker=_MARKERS[i % len(_MARKERS)],
                ms=7 - 1.5 * (i % 3), ls=_DASHES[i % len(_DASHES)], label=m)
    pts = [(r[key], _quality(r)[0]) for r in rows if _quality(r)[0] is not None]
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
    ax.grid(alpha=0.3)
    if ylim is None:
        ax.set_ylabel(label)
        ax.legend(fontsize="small")
        return
    import textwrap

    ax.set_ylim(*ylim)
    ax.set_ylabel(f"{label}\n(zoom)")
    off = sorted({(r["method"], r["budget"], _quality(r)[0]) for r in rows
                  if _quality(r)[0] is not None and not ylim[0] <= _quality(r)[0] <= ylim[1]},
                 key=lambda t: (t[0], -t[1]))
    note = "zoom on the competitive range"
    if off:
        note = f"{'below' if higher else 'above'} this panel: " + ", ".join(f"{m} @ {b:g} ({v:.3g})" for m, b, v in off)
    ax.set_title("\n".join(textwrap.wrap(note, 70)), fontsize="small", color="dimgrey")


def metric_vs_budget_figure(state: Mapping[str, Any]):
    """Quality vs size of every sweep row: a params axis and a MACs axis, one line per method.

    A sweep with ``metric = "latency"`` gets a third axis: quality vs the measured latency.

    The Pareto front over all methods is drawn as a dashed black line with open markers,
    and the original model as a grey horizontal line (when it was evaluated).  When one
    method's values are far from the others' (see :func:`zoom_range`), a second row of
    panels zooms to the range that matters and lists the points left outside it.
    """
    rows = [r for r in state.get("rows", []) if r.get("status") == "ok"]
    base = state.get("baseline") or {}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    label, higher = _quality(rows[0])[1:] if rows else ("metric", True)
    zoom = zoom_range(rows, higher, base.get("metric") if higher else None)
    panels = [("params", "parameters"), ("flops", "MACs")]
    if (state.get("config") or {}).get("metric") == "latency":  # a latency sweep: quality vs measured latency too
        panels.append(("latency_ms", "latency (ms)"))
    fig = _figure(5.5 * len(panels), 8.4 if zoom else 4.4)
    axes = fig.subplots(2 if zoom else 1, len(panels), squeeze=False)
    for col, (key, unit) in enumerate(panels):
        _quality_panel(axes[0][col], rows, methods, key, unit, base, label, higher)
        if zoom:
            _quality_panel(axes[1][col], rows, methods, key, unit, base, label, higher, ylim=zoom)
    model = (state.get("config") or {}).get("model", "model")
    fig.suptitle(f"{model}: quality vs size per method (budget metric: "
                 f"{(state.get('config') or {}).get('metric', '?')})"
                 + ("; bottom row: zoom on the competitive range" if zoom else ""))
    return fig


def kept_fractions(plan: Mapping[str, Any], metric: str | None = None) -> dict[str, float]:
    """``{layer: compressed / dense}`` cost of a plan dict (``Plan.to_dict()``), in the plan's metric."""
    metric = metric or plan.get("metric", "params")
    key = "params" if metric == "params" else "flops"
    return {lp["name"]: lp[key] / lp[f"dense_{key}"] if lp[f"dense_{key}"] else 1.0 for lp in plan["layers"]}


def hyper_text(layer: Mapping[str, Any]) -> str:
    """A layer's chosen family and hyperparameters in a few characters: ``k2 j8`` (ALDS), ``tucker2 21,37``."""
    hyper = layer.get("hyper") or {}
    if layer.get("family") == "alds" and {"groups", "rank"} <= set(hyper):
        return f"k{hyper['groups']} j{hyper['rank']}"
    values = ",".join(str(v) for v in hyper.values())
    return f"{layer.get('family', '?')} {values}".strip()


def _allocation_bars(fracs: Mapping[str, Mapping[str, float]], metric: str, title: str,
                     notes: Mapping[str, str] | None = None):
    layers = list(dict.fromkeys(n for f in fracs.values() for n in f))
    n = max(1, len(fracs))
    fig = _figure(min(16.0, max(6.0, 0.45 * len(layers) * max(1.0, n / 1.5) + 2.5)), 4.6)
    ax = fig.subplots()
    width = 0.8 / n
    for i, (m, f) in enumerate(fracs.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(layers))]
        bars = ax.bar(xs, [f.get(name, 1.0) for name in layers], width, label=m)
        if notes and n == 1:
            ax.bar_label(bars, [notes.get(name, "") for name in layers], fontsize=7, rotation=90, padding=2)
    rotate = len(layers) > 6
    ax.set_xticks(range(len(layers)), layers, rotation=35 if rotate else 0, ha="right" if rotate else "center",
                  rotation_mode="anchor" if rotate else "default", fontsize=8 if len(layers) > 12 else 9)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, 1.25 if notes and n == 1 else 1.08)
    ax.set_ylabel(f"kept fraction of the layer's {'parameters' if metric == 'params' else 'MACs'}")
    ax.set_xlabel("layer")
    ax.set_title(title)
    if n > 1:
        ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return fig


def allocation_figure(state: Mapping[str, Any], budget: float):
    """Kept fraction of every layer at one budget, grouped bars, one colour per method."""
    rows = [r for r in state.get("rows", []) if r.get("status") == "ok" and abs(r["budget"] - budget) < 1e-12]
    if not rows:
        raise ValueError(f"no finished row at budget {budget:g}; budgets: "
                         f"{sorted({r['budget'] for r in state.get('rows', [])})}")
    fracs = {r["method"]: kept_fractions(r["plan"]) for r in rows}
    metric = rows[0]["plan"].get("metric", "params")
    fig = _allocation_bars(fracs, metric, f"per-layer allocation at budget {budget:g} of {metric}")
    if len(rows) == 1:  # one method: the legend names it
        fig.axes[0].legend(fontsize="small")
    return fig


def plan_allocation_figure(plan: Mapping[str, Any], title: str | None = None):
    """Kept fraction of every layer of one plan (``Plan.to_dict()``), each bar labelled with its choice."""
    metric = plan.get("metric", "params")
    notes = {lp["name"]: hyper_text(lp) for lp in plan["layers"]}
    budget = plan.get("budget")
    title = title or (f"per-layer allocation at budget {budget:g} of {metric}" if budget is not None
                      else "per-layer allocation")
    return _allocation_bars({"plan": kept_fractions(plan)}, metric, title, notes)


def _plain_log_ticks(ax) -> None:
    """Plain decimal tick labels (0.05, 0.1, 0.5) on a log y-axis, never ``8x10^-1``.

    Ticks at 1, 2 and 5 per decade; where the axis spans too little for two of them,
    at every integer multiple of the decade.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = ax.get_ylim()
    fmt = FuncFormatter(lambda v, _: f"{v:.6g}")
    for subs in ((1.0, 2.0, 5.0), tuple(float(i) for i in range(1, 10))):
        loc = LogLocator(base=10, subs=subs)
        if sum(lo <= t <= hi for t in loc.tick_values(lo, hi)) >= 2:
            break
    ax.yaxis.set_major_locator(loc)
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(NullFormatter())


def error_curves_figure(curves: Mapping[str, Mapping[str, Any]], chosen: Mapping[str, Mapping[str, Any]] | None = None,
                        max_panels: int | None = None):
    """Error eps(j, k) vs rank j of every layer, one line per number of groups k.

    ``curves`` is :func:`autorank.apps.sweep.curves_data` output: ``{layer: {k: {"rank", "error"}}}``;
    ``chosen`` (optional) the plan's layers by name (``Plan.to_dict()["layers"]``): the chosen
    ALDS point of each layer is starred.  ``max_panels`` keeps the first layers only.
    """
    names = list(curves)[:max_panels] if max_panels else list(curves)
    if not names:
        raise ValueError("no layer curves to plot")
    cols = min(4 if len(names) > 9 else 3, len(names))
    nrows = -(-len(names) // cols)
    fig = _figure(3.6 * cols, 2.9 * nrows + 0.4)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        for k, c in curves[name].items():
            if k == "dense":
                continue
            ax.plot(c["rank"], c["error"], label=f"k={k}")
        lp = (chosen or {}).get(name)
        if lp is not None and lp.get("family") == "alds" and lp.get("error"):
            h = lp["hyper"]
            ax.plot([h["rank"]], [lp["error"]], marker="*", ms=13, color="crimson", ls="none", zorder=5,
                    label=f"chosen: k={h['groups']}, j={h['rank']}")
        elif lp is not None:
            what = "kept dense" if lp.get("family") == "dense" else f"chosen: {hyper_text(lp)}"
            ax.text(0.03, 0.05, what, transform=ax.transAxes, ha="left", va="bottom", fontsize="small",
                    color="crimson")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("rank j per group")
        ax.set_ylabel("relative error eps(j)")
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="x-small")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle("per-layer error curves (ALDS, k input-channel groups)"
                 + ("; star: the chosen rank" if chosen else ""))
    return fig


def _wrap_name(name: str, width: int = 13) -> str:
    """Break a long dotted module name at a dot near its middle."""
    if len(name) <= width or "." not in name:
        return name
    dots = [i for i, ch in enumerate(name) if ch == "."]
    cut = min(dots, key=lambda i: (abs(i - len(name) / 2), -i)) + 1  # ties: the later dot (layer2.0. conv2)
    return name[:cut] + "\n" + name[cut:]


def _generations(g) -> list[list[Any]]:
    """Topological generations of ``g``; a module called more than once (e.g. one ReLU reused in a
    block) makes cycles, so the edges that close a cycle (DFS back edges) are ignored first."""
    import networkx as nx

    if not nx.is_directed_acyclic_graph(g):
        g = g.copy()
        while True:
            try:
                cycle = nx.find_cycle(g)
            except nx.NetworkXNoCycle:
                break
            g.remove_edge(*cycle[-1][:2])  # the edge that closes the cycle
    return [list(nodes) for nodes in nx.topological_generations(g)]


def _layered_positions(g, cols: int | None = None) -> tuple[dict[Any, tuple[float, float]], dict[Any, int], int, float]:
    """Node positions in topological generations, wrapped into rows of ``cols`` generations
    (default: as many rows as 8 per row needs, filled evenly).

    Rows run alternately left-to-right and right-to-left (boustrophedon), so the edge from the
    end of one row to the start of the next is short.  Returns the positions, each node's row,
    the columns used, and the height of the drawing in node units.
    """
    gens = [sorted(nodes, key=str) for nodes in _generations(g)]
    if cols is None:  # at most 8 per row, the rows as even as they can be (18 -> 3 rows of 6)
        rows = -(-len(gens) // 8)
        cols = max(1, -(-len(gens) // rows))
    pos, band, top = {}, {}, 0.0
    for start in range(0, len(gens), cols):
        chunk = gens[start:start + cols]
        tall = max(len(nodes) for nodes in chunk)
        row = start // cols
        centre = top - (tall - 1) / 2
        for c, nodes in enumerate(chunk):
            x = c if row % 2 == 0 else cols - 1 - c
            for i, n in enumerate(nodes):
                pos[n] = (float(x), centre + (len(nodes) - 1) / 2 - i)
                band[n] = row
        top -= tall + 0.9  # room for the labels under the lowest node of the row
    return pos, band, cols, -top


def graph_figure(graph, kept: Mapping[str, float], title: str = "layer graph"):
    """The layer graph (``LayerGraph.graph``) with compressed layers coloured by their kept fraction.

    Compressible layers get a viridis colour (dark: little kept); other modules are grey.
    Long graphs are wrapped into rows (see :func:`_layered_positions`), so the figure fits a page.
    """
    import matplotlib as mpl
    import networkx as nx

    pos, band, cols, height = _layered_positions(graph)
    fig = _figure(1.25 * cols + 0.8, 0.85 * height + 1.6)
    ax = fig.subplots()
    cmap, norm = mpl.colormaps["viridis"], mpl.colors.Normalize(0, 1)
    colours = [cmap(norm(kept[n])) if n in kept else "lightgrey" for n in graph.nodes]
    size = 520
    far = [(u, v) for u, v in graph.edges if band[u] == band[v] and abs(pos[u][0] - pos[v][0]) > 1]
    near = [e for e in graph.edges if e not in set(far)]
    nx.draw_networkx_edges(graph, pos, edgelist=near, ax=ax, arrows=True, edge_color="grey", node_size=size)
    if far:  # skip connections along a row: curved, so they do not run through the nodes between
        nx.draw_networkx_edges(graph, pos, edgelist=far, ax=ax, arrows=True, edge_color="grey", node_size=size,
                               connectionstyle="arc3,rad=0.35")
    nx.draw_networkx_nodes(graph, pos, ax=ax, node_color=colours, node_size=size, edgecolors="black",
                           linewidths=0.5)
    for n, (x, y) in pos.items():
        text = f"{_wrap_name(str(n))}\n{kept[n]:.2f}" if n in kept else _wrap_name(str(n))
        ax.text(x, y - 0.2, text, fontsize=9, va="top", ha="center", linespacing=1.1,
                fontweight="bold" if n in kept else "normal")
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, orientation="horizontal",
                 fraction=0.05 if height > 6 else 0.08, aspect=50, pad=0.02,
                 label="kept fraction of the layer (grey: not compressible)")
    ax.set_title(title)
    ax.set_axis_off()
    xs, ys = [p[0] for p in pos.values()], [p[1] for p in pos.values()]
    ax.set_ylim(min(ys) - 0.9, max(ys) + 0.4)
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
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
    pick = [r for r in rows if r["budget"] == budget and (method is None or r["method"] == method)]
    if not pick:
        raise ValueError(f"no finished row for method {method!r} at budget {budget:g}; methods: "
                         f"{sorted({r['method'] for r in rows})}")
    r = pick[0]
    if (root / "curves.json").is_file():
        curves = _read_json(root / "curves.json")
        # no chosen points: the methods of a sweep may have computed their curves differently
        paths += save_figure(error_curves_figure(curves), plots / "error_curves", formats)
    if (root / "graph.json").is_file():
        fig = graph_figure(_graph(root / "graph.json"), kept_fractions(r["plan"]),
                           f"layer graph: {r['method']} at budget {budget:g}")
        paths += save_figure(fig, plots / f"graph_{r['method']}_{budget:g}".replace(".", "p"), formats)
    log.info("wrote %d figure files to %s", len(paths), plots)
    return paths


def _read_json(path: Path) -> Any:
    import json

    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from None


def _graph(path: Path):
    import networkx as nx

    return nx.node_link_graph(_read_json(path), edges="edges")


def plot_result(out_dir: str | os.PathLike, formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """The figures of one compressed model's directory (``autorank optimize --out DIR``), in ``DIR/plots/``.

    ``allocation``: every layer's kept fraction, labelled with its chosen family and ranks (from
    ``plan.json``); ``error_curves``: each layer's ALDS error curves with the chosen point starred
    (when ``curves.json`` is there); ``graph``: the layer graph coloured by the kept fractions
    (when ``graph.json`` is there).  Returns the file paths.
    """
    root = Path(out_dir)
    f = root / "plan.json"
    if not f.is_file():
        raise FileNotFoundError(f"no plan.json in {str(root)!r}; was it written by autorank optimize?")
    plan = _read_json(f)
    if not isinstance(plan, dict) or not isinstance(plan.get("layers"), list) or not plan["layers"]:
        raise ValueError(f"{str(f)!r} has no 'layers' list to plot")
    plots = root / "plots"
    budget, metric = plan.get("budget"), plan.get("metric", "params")
    where = f"budget {budget:g} of {metric}" if isinstance(budget, (int, float)) else metric
    paths = save_figure(plan_allocation_figure(plan, f"{root.name}: per-layer allocation at {where}"),
                        plots / "allocation", formats)
    if (root / "curves.json").is_file():
        curves = _read_json(root / "curves.json")
        if curves:
            chosen = {lp["name"]: lp for lp in plan["layers"]}
            paths += save_figure(error_curves_figure(curves, chosen), plots / "error_curves", formats)
    else:
        log.info("no curves.json in %s: no error-curve figure", root)
    if (root / "graph.json").is_file():
        fig = graph_figure(_graph(root / "graph.json"), kept_fractions(plan), f"{root.name}: layer graph at {where}")
        paths += save_figure(fig, plots / "graph", formats)
    log.info("wrote %d figure files to %s", len(paths), plots)
    return paths
