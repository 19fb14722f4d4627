"""Sweep figures: the right number of series, and files that exist."""

from __future__ import annotations

import json

import pytest

from autorank.apps.plots import (
    allocation_figure, error_curves_figure, graph_figure, hyper_text, kept_fractions, metric_vs_budget_figure,
    pareto_front, plan_allocation_figure, plot_result, plot_sweep, zoom_range,
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
    assert len(axes) in (2, 4)  # 4: with the zoom row
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
    fig.canvas.draw()
    for ax in visible:  # plain decimals on the log axis, never 8x10^-1
        lo, hi = ax.get_ylim()
        shown = [(t.get_position()[1], t.get_text()) for t in ax.get_yticklabels() if lo <= t.get_position()[1] <= hi]
        assert len(shown) >= 2, shown
        assert all(float(text) == pytest.approx(y) for y, text in shown), shown


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


def _row(method, budget, value, frac=None, key="metric_before"):
    frac = budget if frac is None else frac
    return {"method": method, "budget": budget, "status": "ok", "params": int(1000 * frac),
            "flops": int(5000 * frac), key: value}


COLLAPSE = {"config": {"model": "m", "metric": "params"}, "baseline": {"params": 1000, "flops": 5000, "metric": 98.5},
            "rows": [_row("alds", 0.5, 98.0), _row("alds", 0.3, 97.0), _row("alds", 0.1, 95.0, frac=0.099),
                     _row("alds-sum", 0.5, 98.1), _row("alds-sum", 0.3, 96.5), _row("alds-sum", 0.1, 94.0),
                     _row("uniform", 0.5, 97.0), _row("uniform", 0.3, 90.0), _row("uniform", 0.1, 10.0, 0.098)]}


def test_zoom_range_keeps_the_competitive_methods_apart():
    lo, hi = zoom_range(COLLAPSE["rows"], True, 98.5)
    assert lo < 94.0 < 98.5 < hi and lo > 90.0  # under the worst best-at-a-budget (alds @ 0.1: 95), not uniform
    fig = metric_vs_budget_figure(COLLAPSE)
    panels = [ax for ax in fig.axes if ax.get_xlabel().endswith("compressed model")]
    assert len(panels) == 4
    zoomed = [ax for ax in panels if "zoom" in ax.get_ylabel()]
    assert len(zoomed) == 2 and all(ax.get_ylim() == pytest.approx((lo, hi)) for ax in zoomed)
    assert zoomed[0].get_title() == "below this panel: uniform @ 0.3 (90), uniform @ 0.1 (10)"  # alds-sum's 94 stays
    full = [ax for ax in panels if "zoom" not in ax.get_ylabel()]
    assert full[0].get_ylim()[0] < 10.0  # the top row still shows everything


@pytest.mark.parametrize("rows, higher, expected", [
    ([_row("a", 0.5, 98.0), _row("b", 0.5, 97.0), _row("a", 0.2, 96.0), _row("b", 0.2, 95.5)], True, None),
    ([_row("a", 0.5, 0.2, key="max_error"), _row("u", 0.5, 0.25, key="max_error"),
      _row("a", 0.2, 0.3, key="max_error"), _row("u", 0.2, 0.99, key="max_error")], False, (0.2, 0.3)),
    ([], True, None),
], ids=["close-no-zoom", "error-lower-is-better", "empty"])
def test_zoom_range_cases(rows, higher, expected):
    got = zoom_range(rows, higher)
    if expected is None:
        assert got is None
    else:
        assert got[0] < expected[0] and expected[1] < got[1] < 0.99


def test_error_curves_star_the_chosen_rank(sweep_dir, state):
    curves = json.loads((sweep_dir / "curves.json").read_text())
    plan = next(r for r in state["rows"] if r["method"] == "alds")["plan"]
    chosen = {lp["name"]: lp for lp in plan["layers"]}
    fig = error_curves_figure(curves, chosen)
    for ax in (a for a in fig.axes if a.get_visible()):
        lp = chosen[ax.get_title()]
        stars = [ln for ln in ax.get_lines() if ln.get_label().startswith("chosen")]
        if lp["family"] != "alds":  # e.g. a layer kept dense: said in words
            assert stars == [] and [t.get_text() for t in ax.texts] == ["kept dense" if lp["family"] == "dense"
                                                                         else f"chosen: {hyper_text(lp)}"]
            continue
        assert len(stars) == 1 and list(stars[0].get_xdata()) == [lp["hyper"]["rank"]]
        assert list(stars[0].get_ydata()) == [pytest.approx(lp["error"])]


def _chain(n):
    import networkx as nx

    return nx.DiGraph([(f"layer{i}.conv", f"layer{i + 1}.conv") for i in range(n - 1)])


def test_graph_figure_fits_a_page():
    g = _chain(40)
    fig = graph_figure(g, {n: 0.5 for n in list(g)[::2]})
    w, h = fig.get_size_inches()
    assert w <= 13 and 0.4 < h / w < 2.5  # not 24 x 3.5 inches of white with tiny labels
    ax = fig.axes[0]
    assert min(t.get_fontsize() for t in ax.texts) >= 9
    pos = {n: tuple(p) for n, p in zip(g.nodes, ax.collections[-1].get_offsets())}
    assert len({y for _, y in pos.values()}) >= 4  # wrapped into rows
    for u, v in g.edges:  # boustrophedon: every edge joins neighbours, also from one row to the next
        (x0, y0), (x1, y1) = pos[u], pos[v]
        assert abs(x0 - x1) + abs(y0 - y1) <= 2.0


def test_graph_figure_with_a_reused_module_is_layered():
    import networkx as nx

    # one ReLU module called twice makes a cycle in the module graph (as in torchvision's BasicBlock)
    g = nx.DiGraph([("<input>", "conv1"), ("conv1", "relu"), ("relu", "conv2"), ("conv2", "relu"),
                    ("relu", "fc"), ("fc", "<output>")])
    fig = graph_figure(g, {"conv1": 0.3, "conv2": 0.4, "fc": 0.9})
    xs = [p[0] for p in fig.axes[0].collections[-1].get_offsets()]
    assert all(float(x).is_integer() for x in xs)  # generations, not a spring layout


def test_plan_allocation_labels_each_bar(state):
    plan = state["rows"][0]["plan"]
    fig = plan_allocation_figure(plan)
    ax = fig.axes[0]
    assert [b.get_height() for b in ax.containers[0]] == pytest.approx(list(kept_fractions(plan).values()))
    labels = [t.get_text() for t in ax.texts]
    assert labels == [hyper_text(lp) for lp in plan["layers"]]
    assert hyper_text({"family": "alds", "hyper": {"groups": 2, "rank": 8}}) == "k2 j8"
    assert hyper_text({"family": "tucker2", "hyper": {"rank_in": 21, "rank_out": 37}}) == "tucker2 21,37"


def test_plot_result_needs_layers(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps({"budget": 0.5}))
    with pytest.raises(ValueError, match="no 'layers' list"):
        plot_result(tmp_path)
    with pytest.raises(FileNotFoundError, match="plan.json"):
        plot_result(tmp_path / "nothing")


@pytest.mark.parametrize("name, expected", [
    ("conv1", "conv1"),
    ("layer2.0.conv2", "layer2.0.\nconv2"),
    ("layer2.0.downsample.0", "layer2.0.\ndownsample.0"),
    ("averyveryverylongname", "averyveryverylongname"),
])
def test_graph_labels_wrap_at_a_dot(name, expected):
    from autorank.apps.plots import _wrap_name

    assert _wrap_name(name) == expected
