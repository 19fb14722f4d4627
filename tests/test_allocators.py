"""Rank-selection allocators: the baselines of autorank.allocators beside "alds" and "uniform"."""

from __future__ import annotations

import functools
import itertools
import json
import logging
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import autorank
from autorank.allocators import AllocationContext
from autorank.allocators.alds import alds_output_allocation
from autorank.allocators.evaluated import (SENSITIVITY_CACHE_KEY, output_gains, sensitivity_allocation,
                                           sensitivity_table)
from autorank.allocators.ranks import bisect_sorted, bisect_threshold, rank_table, rank_tables
from autorank.allocators.spectral import (SPECTRUM_CACHE_KEY, layer_spectrum, lrank_allocation, lrank_choice,
                                          pca_allocation, svd_energy_allocation, vbmf_allocation, vbmf_ranks)
from autorank.pipeline import CompressStep, Settings
from autorank.curves import LayerCurves
from autorank.solver import Infeasible
from tiny_models import build

ALLOCATORS = ["alds", "uniform", "svd_energy", "lrank", "vbmf", "pca", "sensitivity", "alds_output"]
BASELINES = ["svd_energy", "lrank", "vbmf", "pca", "sensitivity", "alds_output"]
MODELS = ["mlp", "residual_cnn"]
BUDGETS = (0.25, 0.5, 0.8)


def _calibration(name: str, x):
    return [x] if name == "pca" else None


def _context(model, x, budget=0.5, metric="params", calibration=None, **fields) -> AllocationContext:
    prep = CompressStep(x, Settings(metric), calibration=calibration).prepare(model)
    return AllocationContext(curves=prep.curves, budget=budget, metric=metric, total=prep.total, fixed=prep.fixed,
                             model=model, example_inputs=x, moments=prep.moments, **fields)


def _ranks(ctx: AllocationContext, picked) -> dict[str, int]:
    """Plain-SVD rank per layer (0 = dense)."""
    out = {}
    for name, i in picked.items():
        cand = ctx.curves[name].candidate(i)
        assert cand["family"] in ("dense", "alds")
        assert cand["family"] == "dense" or cand["hyper"]["groups"] == 1
        out[name] = 0 if cand["family"] == "dense" else cand["hyper"]["rank"]
    return out


def _orthogonal(n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(max(n, m), max(n, m), generator=gen))
    return q[:n, :m]


def _with_spectrum(layer: nn.Linear, svals, gen: torch.Generator, noise: float = 0.0) -> nn.Linear:
    f, n = layer.weight.shape
    r = len(svals)
    w = _orthogonal(f, r, gen) @ torch.diag(torch.as_tensor(svals, dtype=torch.float32)) @ _orthogonal(n, r, gen).T
    with torch.no_grad():
        layer.weight.copy_(w + noise * torch.randn(f, n, generator=gen))
    return layer


# ---- registry, budgets, infeasibility, read-only model ---------------------------------------


def test_all_allocators_are_registered():
    assert set(ALLOCATORS) <= set(autorank.available_allocators())


@pytest.mark.parametrize("metric", ["params", "flops"])
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_meets_budget_on_realised_model(allocator, model_name, metric, tmp_path):
    model, x = build(model_name)
    alloc = allocator
    if allocator == "sensitivity":  # one table for all budgets, through the disk cache
        alloc = functools.partial(sensitivity_allocation, cache_path=tmp_path / "sens.json")
    if allocator == "alds_output":
        alloc = functools.partial(alds_output_allocation, cache_path=tmp_path / "gains.json")
    used = []
    for budget in BUDGETS:
        res = autorank.optimize(model, budget, x, metric=metric, compression=autorank.Compression(allocator=alloc),
                                calibration=_calibration(allocator, x))
        totals = res.plan.totals
        assert totals[metric] <= budget * totals[f"{metric}_before"]
        assert any(lp.compressed for lp in res.plan.layers.values())
        used.append(totals[metric])
    assert used == sorted(used), f"a looser budget must not cost less: {used}"
    assert used[-1] > used[0]


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_infeasible_budget_names_smallest_reachable(allocator):
    model, x = build("mlp")
    cal = _calibration(allocator, x)
    with pytest.raises(ValueError, match="smallest reachable budget is") as err:
        autorank.optimize(model, 0.02, x, compression=autorank.Compression(allocator=allocator), calibration=cal)
    smallest = float(re.search(r"smallest reachable budget is ([0-9.]+)", str(err.value)).group(1))
    ctx = _context(model, x)
    rank1 = ctx.fixed + sum(float(lc.cost("params")[lc.find("alds", groups=1, rank=1)]) for lc in ctx.curves.values())
    assert smallest == pytest.approx(rank1 / ctx.total, abs=1e-4)
    res = autorank.optimize(model, smallest + 1e-3, x, compression=autorank.Compression(allocator=allocator),
                            calibration=cal)
    assert res.plan.totals["params"] <= (smallest + 1e-3) * ctx.total


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_model_is_left_untouched(allocator):
    model, x = build("residual_cnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = {n: type(m) for n, m in model.named_modules()}
    ctx = _context(model, x, 0.4, calibration=_calibration(allocator, x))
    picked, _ = autorank.allocate(ctx.curves, 0.4, "params", ctx.total, ctx.fixed, allocator=allocator,
                                  model=model, example_inputs=x, moments=ctx.moments)
    assert ctx.cost(picked) <= ctx.room
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: type(m) for n, m in model.named_modules()} == kinds


@pytest.mark.parametrize("allocator", BASELINES)
def test_layers_without_alds_candidates_stay_dense(allocator):
    model, x = build("mlp")
    ctx = _context(model, x, 0.5, calibration=_calibration(allocator, x))
    lc = ctx.curves["fc2"]
    dense = {c: getattr(lc, c)[:1].copy() for c in ("family", "row", "error", "error_lower", "params", "flops")}
    curves = dict(ctx.curves)
    curves["fc2"] = LayerCurves(name="fc2", info=lc.info, families=("dense",), hyper=[{}], **dense)
    picked, _ = autorank.allocate(curves, 0.75, "params", ctx.total, ctx.fixed, allocator=allocator,
                                  model=model, example_inputs=x, moments=ctx.moments)
    assert picked["fc2"] == 0
    assert any(picked[n] != 0 for n in ("fc1", "head"))


# ---- known answers -------------------------------------------------------------------------------


def _spectra_model():
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 40))
    for idx, decay in ((0, 0.6), (2, 0.85), (4, 0.97)):
        _with_spectrum(model[idx], decay ** np.arange(40), gen)
    return model.eval(), torch.randn(8, 40, generator=gen)


@pytest.mark.parametrize("budget", [0.25, 0.4])
def test_svd_energy_equalises_discarded_fraction(budget):
    model, x = _spectra_model()
    ctx = _context(model, x, budget)
    ranks = _ranks(ctx, svd_energy_allocation(ctx))
    assert all(j > 0 for j in ranks.values())
    e = {}
    for name in ranks:
        s2 = torch.linalg.svdvals(model.get_submodule(name).weight.detach().double()).numpy() ** 2
        e[name] = np.array([s2[j:].sum() / s2.sum() for j in range(len(s2) + 1)])  # e[j]: rank j
    kept = max(e[n][j] for n, j in ranks.items())
    one_less = min(e[n][j - 1] for n, j in ranks.items() if j >= 2)
    assert kept <= one_less + 1e-12  # one threshold t with e(j_l) <= t < e(j_l - 1) in every layer
    assert ranks["0"] < ranks["2"] < ranks["4"]  # fast decay needs fewer ranks for the same fraction


def test_lrank_matches_brute_force_at_fixed_lambda():
    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).eval()
    x = torch.randn(3, 8, generator=gen)
    ctx = _context(model, x, 0.5)
    options = {}
    for name, lc in ctx.curves.items():
        s2 = torch.linalg.svdvals(model.get_submodule(name).weight.detach().double()).numpy() ** 2
        opts = [(0, 0.0, float(lc.params[0]))]
        for j in range(1, len(s2) + 1):
            i = lc.find("alds", groups=1, rank=j)
            if i is not None:
                opts.append((i, float(s2[j:].sum()), float(lc.params[i])))
        options[name] = opts
    assert all(len(o) >= 3 for o in options.values())
    names = list(options)
    seen = set()
    for lam in (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1):
        choice = lrank_choice(ctx, lam)
        objective = {n: {i: err + lam * cost for i, err, cost in options[n]} for n in names}
        brute = min(sum(objective[n][i] for n, i in zip(names, combo))
                    for combo in itertools.product(*[[o[0] for o in options[n]] for n in names]))
        assert sum(objective[n][choice[n]] for n in names) == pytest.approx(brute, rel=1e-12, abs=1e-12)
        seen.add(tuple(choice[n] for n in names))
    assert len(seen) >= 3  # the multiplier really moves the choice


def test_lrank_bisection_is_the_smallest_feasible_multiplier():
    model, x = build("mlp")
    ctx = _context(model, x, 0.4)
    picked = lrank_allocation(ctx)
    assert ctx.cost(picked) <= ctx.room
    tables, _ = rank_tables(ctx)
    # any choice L-Rank makes at a smaller multiplier is over budget (or the same choice)
    for lam in np.geomspace(1e-6, 1.0, 60):
        other = lrank_choice(ctx, float(lam))
        assert ctx.cost(other) > ctx.room or ctx.cost(other) <= ctx.cost(picked)


def _vbmf_model():
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32)).eval()
    _with_spectrum(model[0], np.linspace(3, 1, 5), gen, noise=0.01)
    _with_spectrum(model[2], np.linspace(3, 1, 3), gen, noise=0.01)
    return model, torch.randn(4, 64, generator=gen)


def test_vbmf_recovers_true_rank():
    model, x = _vbmf_model()
    truth = {"0": 5, "2": 3}
    ctx = _context(model, x, 0.9)
    assert vbmf_ranks(ctx) == truth
    # loose budget, VBMF ranks kept as they are (alpha = 1 fits)
    capped = functools.partial(vbmf_allocation, max_alpha=1.0)
    assert _ranks(ctx, capped(ctx)) == truth
    # by default alpha grows past 1 and spends the loose budget ...
    grown = _ranks(ctx, vbmf_allocation(ctx))
    assert all(grown[n] >= truth[n] for n in truth) and grown != truth
    # ... and at a budget that just fits the VBMF ranks, they are exactly what is chosen
    exact = ctx.fixed + sum(float(ctx.curves[n].params[ctx.curves[n].find("alds", groups=1, rank=j)])
                            for n, j in truth.items())
    tight = _context(model, x, (exact + 0.5) / ctx.total)
    assert _ranks(tight, vbmf_allocation(tight)) == truth


class TwoBranch(nn.Module):
    """Two identical Linear layers; ``a`` sees inputs on a 3-dimensional subspace, ``b`` isotropic ones."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)
            self.b.bias.copy_(self.a.bias)

    def forward(self, x):
        return torch.cat([self.a(x[:, :32]), self.b(x[:, 32:])], dim=1)


def test_pca_prefers_the_layer_whose_outputs_concentrate_variance():
    gen = torch.Generator().manual_seed(4)
    model = TwoBranch().eval()
    z = torch.randn(512, 3, generator=gen) @ torch.randn(3, 32, generator=gen)
    batch = torch.cat([z + 1e-3 * torch.randn(512, 32, generator=gen), torch.randn(512, 32, generator=gen)], 1)
    ctx = _context(model, batch[:4], 0.5, calibration=[batch])
    ranks = _ranks(ctx, pca_allocation(ctx))
    assert 3 <= ranks["a"] < ranks["b"]

    def kept(name):
        lam = layer_spectrum(ctx, name) ** 2
        return lam[: ranks[name]].sum() / lam.sum()

    assert kept("a") > 0.999 > kept("b")
    # the weights alone cannot tell the two layers apart
    plain = _context(model, batch[:4], 0.5)
    same = _ranks(plain, svd_energy_allocation(plain))
    assert same["a"] == same["b"]


def test_pca_without_calibration_raises():
    model, x = build("mlp")
    with pytest.raises(ValueError, match=re.escape(
            "allocator 'pca' needs calibration data: pass calibration=... to optimize")):
        autorank.optimize(model, 0.5, x, compression=autorank.Compression(allocator="pca"))


def test_spectrum_with_moments_is_that_of_w_m_wt():
    model, x = build("mlp")
    cal = [torch.randn(64, 32)]
    ctx = _context(model, x, calibration=cal)
    w = model.fc1.weight.detach().double()
    m = ctx.moments["fc1"].matrix
    expect = torch.linalg.svdvals(w @ torch.linalg.cholesky(m + 1e-12 * torch.eye(32, dtype=torch.float64)))
    assert np.allclose(layer_spectrum(ctx, "fc1"), expect.numpy(), rtol=1e-6, atol=1e-9)
    assert ctx.cache[SPECTRUM_CACHE_KEY]  # cached
    plain = _context(model, x)
    assert np.allclose(layer_spectrum(plain, "fc1"), torch.linalg.svdvals(w).numpy(), rtol=1e-6)


# ---- sensitivity: table once, disk cache ------------------------------------------------------


class CountingScore:
    def __init__(self, x):
        self.x, self.calls, self.ref = x, 0, None

    def __call__(self, model) -> float:
        self.calls += 1
        with torch.no_grad():
            y = model(self.x)
        return -float((y - self.ref).norm())


def _counting(model, x) -> CountingScore:
    score = CountingScore(x)
    with torch.no_grad():
        score.ref = model(x)
    return score


def test_sensitivity_table_is_computed_once_per_model():
    model, x = build("mlp")
    score = _counting(model, x)
    ctx = _context(model, x)
    cache: dict = {}
    args = (ctx.curves, "params", ctx.total, ctx.fixed)
    loose, _ = autorank.allocate(args[0], 0.6, *args[1:], allocator="sensitivity", model=model, example_inputs=x,
                                 evaluate=score, cache=cache)
    first = score.calls
    table = next(iter(cache[SENSITIVITY_CACHE_KEY].values()))
    assert first == sum(len(rows) for rows in table["scores"].values()) > 0
    tight, _ = autorank.allocate(args[0], 0.3, *args[1:], allocator="sensitivity", model=model, example_inputs=x,
                                 evaluate=score, cache=cache)
    assert score.calls == first
    assert ctx.cost(tight) < ctx.cost(loose)
    # every layer takes its cheapest scored rank above one common threshold
    ranks = _ranks(ctx, tight)
    scores = {n: dict((int(j), q) for j, q in rows) for n, rows in table["scores"].items()}
    t = min(scores[n][j] for n, j in ranks.items() if j)
    for n, j in ranks.items():
        assert all(q < t for r, q in scores[n].items() if (r < j or j == 0))


def test_sensitivity_default_score_is_output_fidelity():
    model, x = build("mlp")
    ctx = _context(model, x)
    table = sensitivity_table(ctx, ratios=(0.25, 0.5))
    assert set(table["scores"]) == set(ctx.curves)
    for rows in table["scores"].values():
        assert [j for j, _ in rows] == sorted(j for j, _ in rows) and rows[0][0] == 1
        assert all(q <= 1.0 for _, q in rows)
    # the fidelity of the truncated fc1 at rank j, recomputed by hand
    j, q = table["scores"]["fc1"][-1]
    work = autorank.realize(model, autorank.make_plan(ctx.curves, {"fc1": ctx.curves["fc1"].find(
        "alds", groups=1, rank=j), "fc2": 0, "head": 0}, "params", 0.5, "max"))
    with torch.no_grad():
        y, y_hat = model(x), work(x)
    assert q == pytest.approx(1 - float((y_hat - y).norm() / y.norm()), rel=1e-5)


def test_sensitivity_disk_cache_round_trips_and_rejects_other_model(tmp_path, caplog):
    path = tmp_path / "cache" / "sens.json"
    alloc = functools.partial(sensitivity_allocation, ratios=(0.25, 0.5, 0.75), cache_path=path)
    model, x = build("mlp")
    score = _counting(model, x)
    ctx = _context(model, x, 0.4, evaluate=score)
    first = alloc(ctx)
    n = score.calls
    assert n > 0 and path.is_file()
    saved = json.loads(path.read_text())
    assert saved["ratios"] == [0.25, 0.5, 0.75] and set(saved["scores"]) == set(ctx.curves)
    again = alloc(_context(model, x, 0.4, evaluate=score))  # a new run: empty ctx.cache
    assert again == first and score.calls == n

    other, _ = build("mlp", seed=1)
    score2 = _counting(other, x)
    with caplog.at_level(logging.WARNING, logger="autorank.allocators.cache"):
        alloc(_context(other, x, 0.4, evaluate=score2))
    assert score2.calls == n  # recomputed: the saved table belongs to another model
    assert "another model" in caplog.text
    assert json.loads(path.read_text())["fingerprint"] != saved["fingerprint"]

    path.write_text("{not json")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="autorank.allocators.cache"):
        assert alloc(_context(model, x, 0.4, evaluate=score)) == first
    assert "unreadable" in caplog.text and score.calls == 2 * n


@pytest.mark.parametrize("allocator, error, match", [
    (functools.partial(sensitivity_allocation, ratios=()), ValueError, "at least one"),
    (functools.partial(sensitivity_allocation, ratios=(0.0, 0.5)), ValueError, r"in \(0, 1\]"),
    (functools.partial(sensitivity_allocation, ratios=(0.5, 1.5)), ValueError, r"in \(0, 1\]"),
    (functools.partial(sensitivity_allocation, ratios="0.5"), TypeError, "sequence"),
    (functools.partial(sensitivity_allocation, ratios=(0.5, "a")), TypeError, "number"),
    (functools.partial(sensitivity_allocation, cache_path=3), TypeError, "cache_path"),
    (functools.partial(sensitivity_allocation, cache_path="."), ValueError, "directory"),
    (functools.partial(vbmf_allocation, max_alpha=0.0), ValueError, "max_alpha"),
    (functools.partial(vbmf_allocation, max_alpha="1"), TypeError, "max_alpha"),
], ids=["empty-ratios", "zero-ratio", "ratio-over-1", "str-ratios", "str-ratio", "int-path", "dir-path",
        "zero-alpha", "str-alpha"])
def test_bad_options_raise_clear_errors(allocator, error, match):
    model, x = build("mlp")
    with pytest.raises(error, match=match):
        autorank.optimize(model, 0.5, x, compression=autorank.Compression(allocator=allocator))


# ---- the shared bisection helpers ---------------------------------------------------------------


def test_bisect_threshold_finds_most_generous_setting():
    steps = lambda t: float(np.floor(10 * t))  # noqa: E731  non-decreasing, jumps at 0.1, 0.2, ...
    t = bisect_threshold(steps, 3.5, 0.0, 1.0, increasing=True)
    assert 0.4 - 1e-12 < t < 0.4 and steps(t) == 3.0
    falling = lambda lam: 100.0 / (1.0 + lam)  # noqa: E731
    lam = bisect_threshold(falling, 10.0, 1e-6, 1e6, increasing=False, geometric=True)
    assert lam == pytest.approx(9.0, rel=1e-12) and falling(lam) <= 10.0
    assert bisect_threshold(steps, 99.0, 0.0, 1.0, increasing=True) == 1.0
    with pytest.raises(Infeasible):
        bisect_threshold(lambda t: 5.0 + t, 1.0, 0.0, 1.0, increasing=True)


def test_bisect_sorted_is_exact():
    values = [0.5, 0.1, 0.9, 0.3, 0.7]
    assert bisect_sorted(lambda t: 10 * t, 5.0, values, increasing=True) == 0.5
    assert bisect_sorted(lambda t: 10 * (1 - t), 5.0, values, increasing=False) == 0.5
    assert bisect_sorted(lambda t: 10 * t, 100.0, values, increasing=True) == 0.9
    with pytest.raises(Infeasible):
        bisect_sorted(lambda t: 10 * t, 0.5, values, increasing=True)


def test_rank_table_maps_absent_ranks_to_dense():
    model, x = build("mlp")
    ctx = _context(model, x)
    for name, lc in ctx.curves.items():
        table = rank_table(lc, "params")
        assert table.full == min(lc.info.out_features, lc.info.in_channels)
        for j in range(1, table.full + 1):
            i = lc.find("alds", groups=1, rank=j)
            assert table.index[j] == (0 if i is None else i)
            assert table.cost[j] == lc.params[table.index[j]]
        assert table.cost[table.top] < table.dense_cost and table.top < table.full


class _TwoBranches(torch.nn.Module):
    """Two identical-looking branches; the output barely depends on the second one."""

    def __init__(self):
        super().__init__()
        self.loud = torch.nn.Linear(24, 24)
        self.quiet = torch.nn.Linear(24, 24)

    def forward(self, x):
        return self.loud(x) + 0.01 * self.quiet(x)


def test_alds_output_spends_the_budget_where_the_output_is_sensitive():
    torch.manual_seed(0)
    model, x = _TwoBranches(), torch.randn(64, 24)
    with torch.no_grad():  # the same spectrum for both, so weight-only ALDS cannot tell them apart
        model.quiet.weight.copy_(model.loud.weight)
    ctx = _context(model, x, 0.5)
    gains = output_gains(ctx)
    assert gains["quiet"] < 0.05 * gains["loud"]
    res = autorank.optimize(model, 0.5, x, compression=autorank.Compression(allocator="alds_output"))
    ranks = {n: lp.hyper.get("rank", 24) for n, lp in res.plan.layers.items()}
    plain = autorank.optimize(model, 0.5, x)
    plain_ranks = {n: lp.hyper.get("rank", 24) for n, lp in plain.plan.layers.items()}
    assert ranks["loud"] >= ranks["quiet"] + 4 and abs(plain_ranks["loud"] - plain_ranks["quiet"]) <= 1
    with torch.no_grad():
        ref = model(x)
        err = float((res.model(x) - ref).norm() / ref.norm())
        err_plain = float((plain.model(x) - ref).norm() / ref.norm())
    assert err < err_plain


# ---- the old import paths ------------------------------------------------------------------------


def test_baselines_is_a_deprecated_alias_of_the_allocators():
    import importlib
    import sys

    import autorank.allocators as allocators

    sys.modules.pop("autorank.baselines", None)  # import it afresh, so that the warning is issued here
    with pytest.warns(DeprecationWarning, match="autorank.allocators"):
        old = importlib.import_module("autorank.baselines")
    assert old.__all__ and all(getattr(old, name) is getattr(allocators, name) for name in old.__all__)


def test_global_step_keeps_its_old_homes():
    import importlib

    import autorank.allocators as allocators
    import autorank.api
    import autorank.graph

    assert autorank.api.allocate is autorank.allocate is allocators.allocate
    assert autorank.api.solve_curves is autorank.solve_curves is allocators.solve_curves
    realize_module = importlib.import_module("autorank.realize")  # autorank.realize is also the function
    assert realize_module.replace_module is autorank.graph.replace_module
