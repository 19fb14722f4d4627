"""Sweep figures: the right number of series, and files that exist."""

from __future__ import annotations

import json

import pytest

from autorank.apps.plots import (
    allocation_figure, error_curves_figure, graph_figure, kept_fractions, metric_vs_budget_figure,
    pareto_front, plot_sweep,
)
from autorank.apps.sweep import ModelSpec, SweepConfig, run_sweep
from tiny_models import build

pytest.importorskip("matplotlib")

METHODS = [{"name": "alds"}, {"name": "uniform", "allocator": "uniform"},
           {"name": "alds-sum", "solver": {"objective": "sum"}}]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    model, x = build("residual_cnn")
    cfg = SweepConfig.from_dict({"model": "tiny", "budgets": [0.7, 0.4], "methods": METHODS,
                                 "latency": {"repeats": 2, "threads": 1}})
    run_sweep(cfg, out, model_spec=ModelSpec(model, x))
    return out


@pytest.fixture(scope="module")
def state(sweep_dir):
    return json.loads((sweep_dir / "results.json").read_text())


@pytest.mark.parametrize("costs, values, higher, expected", [
    ([1, 2, 3], [1, 2, 3], True, [0, 1, 2]),
    ([1, 2, 3], [3, 2, 1], True, [0]),
    ([3, 1, 2], [5, 1, 4], True, [1, 2, 0]),
    ([1, 2, 3], [3, 2, 1], False, [0, 1, 2]),
    ([1, 1, 2], [1, 2, 2], True, [1]),
], ids=["all", "first-dominates", "unsorted", "lower-better", "tie-on-cost"])
def test_pareto_front(costs, values, higher, expected):
    assert pareto_front(costs, values, higher) == expected


def test_metric_vs_budget_has_one_line_per_method_and_a_front(state):
    fig = metric_vs_budget_figure(state)
    axes = [ax for ax in fig.axes if ax.get_xlabel().endswith("compressed model")]
    assert len(axes) == 2
    for ax in axes:
        labels = [line.get_label() for line in ax.get_lines()]
        assert labels == ["alds", "uniform", "alds-sum", "Pareto front"]
        assert all(len(line.get_xdata()) == 2 for line in ax.get_lines()[:3])


def test_allocation_has_grouped_bars_per_method(state):
    fig = allocation_figure(state, 0.4)
    ax = fig.axes[0]
    n_layers = len(state["rows"][0]["plan"]["layers"])
    assert len(ax.containers) == 3 and all(len(c) == n_layers for c in ax.containers)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["alds", "uniform", "alds-sum"]
    heights = [b.get_height() for b in ax.containers[0]]
    row = next(r for r in state["rows"] if r["method"] == "alds" and r["budget"] == 0.4)
    assert heights == pytest.approx(list(kept_fractions(row["plan"]).values()))
    with pytest.raises(ValueError, match="0.123"):
        allocation_figure(state, 0.123)


def test_error_curves_one_panel_per_layer(sweep_dir):
    curves = json.loads((sweep_dir / "curves.json").read_text())
    fig = error_curves_figure(curves)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == list(curves)
    for ax, (name, c) in zip(visible, curves.items()):
        assert len(ax.get_lines()) == len([k for k in c if k != "dense"]) >= 1


def test_graph_colours_compressed_layers(sweep_dir, state):
    import networkx as nx

    g = nx.node_link_graph(json.loads((sweep_dir / "graph.json").read_text()), edges="edges")
    kept = kept_fractions(state["rows"][0]["plan"])
    fig = graph_figure(g, kept)
    nodes = fig.axes[0].collections[-1]
    assert len(nodes.get_offsets()) == g.number_of_nodes()
    greys = sum(1 for c in nodes.get_facecolors() if c[0] == c[1] == c[2])
    assert greys == g.number_of_nodes() - len(kept)


def test_plot_sweep_writes_png_and_svg(sweep_dir):
    paths = plot_sweep(sweep_dir)
    assert len(paths) == 8
    assert {p.suffix for p in paths} == {".png", ".svg"}
    assert all(p.is_file() and p.stat().st_size > 1000 for p in paths)
    assert (sweep_dir / "plots" / "allocation_0p4.png").is_file()
