"""Latency measurement: positive figures, and the caller's settings left as they were."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import autorank
from autorank.latency import layer_latencies, measure_latency
from tiny_models import build


@pytest.mark.parametrize("name", ["mlp", "residual_cnn", "transformer_block"])
@pytest.mark.parametrize("training", [True, False], ids=["train-mode", "eval-mode"])
def test_measure_latency_positive_and_restores_mode(name, training):
    model, x = build(name)
    model.train(training)
    modes = [m.training for m in model.modules()]
    out = measure_latency(model, x, repeats=5, warmup=1)
    assert out["median_s"] > 0 and out["iqr_s"] >= 0 and out["q25_s"] <= out["median_s"] <= out["q75_s"]
    assert out["repeats"] == 5
    assert [m.training for m in model.modules()] == modes


def test_threads_are_fixed_during_and_restored_after():
    model, x = build("mlp")
    before = torch.get_num_threads()
    seen = []
    model.register_forward_hook(lambda *a: seen.append(torch.get_num_threads()))
    out = measure_latency(model, x, repeats=3, warmup=0, threads=1)
    assert set(seen) == {1} and out["threads"] == 1
    assert torch.get_num_threads() == before


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_restores_on_error():
    model = Boom().train()
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        measure_latency(model, torch.zeros(1), repeats=2, threads=1)
    assert model.training and torch.get_num_threads() == before


@pytest.mark.parametrize("kw, needle", [
    ({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"), ({"threads": 0}, "threads"),
    ({"repeats": 2.5}, "repeats"),
])
def test_bad_arguments(kw, needle):
    model, x = build("mlp")
    with pytest.raises(ValueError, match=needle):
        measure_latency(model, x, **kw)


@pytest.mark.parametrize("name", ["mlp", "residual_cnn"])
def test_layer_latencies_cover_every_compressed_layer(name):
    model, x = build(name)
    result = autorank.optimize(model, 0.4, x)
    rows = layer_latencies(model, result.model, result.plan, x, repeats=3, warmup=1)
    compressed = [n for n, lp in result.plan.layers.items() if lp.compressed]
    assert [r["name"] for r in rows] == compressed and compressed
    info = autorank.analyze(model, x).layers
    for r in rows:
        assert r["dense_ms"] > 0 and r["compressed_ms"] > 0
        assert r["slower"] == (r["compressed_ms"] > r["dense_ms"])
        assert tuple(r["in_shape"]) == info[r["name"]].in_shape


# ---- metric="latency": the measured cost column --------------------------------------------------

import dataclasses  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from autorank import latency as lat  # noqa: E402
from autorank.config import Compression, CurveConfig, LatencyConfig  # noqa: E402
from autorank.families import get_family  # noqa: E402
from autorank.families.alds import GroupedLowRankConv, GroupedLowRankLinear  # noqa: E402
from autorank.registry import FAMILIES  # noqa: E402


def wide_mlp():
    """Two 256-wide layers on a batch of 64: rank 16-48 factorisations are measurably faster than dense."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return model, torch.randn(64, 256)


def fast_latency(tmp_path, **kw):
    return LatencyConfig(**{"cache": str(tmp_path / "lat"), "repeats": 3, "warmup": 1, "min_time_s": 2e-4,
                            "final_repeats": 5, **kw})


def counting(monkeypatch, name="_time_candidates"):
    calls = []
    real = getattr(lat, name)

    def wrapped(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(lat, name, wrapped)
    return calls


def test_latency_table_is_reused_from_the_disk_cache(tmp_path, monkeypatch):
    layer, x = nn.Linear(128, 96), torch.randn(32, 128)
    cands = [("dense", {})] + [("alds", {"groups": k, "rank": r}) for k in (1, 2) for r in range(8, 65, 8)]
    build = lambda fam, hyper: get_family(fam).skeleton(layer, hyper)  # noqa: E731
    timed = counting(monkeypatch, "time_callables")
    kw = dict(threads=1, repeats=2, warmup=0, min_time_s=0.0, grid_linear=3, grid_ratio=1.5)
    first, s1 = lat.latency_column(layer, x, cands, build, cache=lat.LatencyCache(tmp_path), **kw)
    n_first = len(timed)
    assert n_first > 0 and s1["timed"] > 0 and s1["interpolated"] > 0 and s1["cached"] == 0
    second, s2 = lat.latency_column(layer, x, cands, build, cache=lat.LatencyCache(tmp_path), **kw)
    assert len(timed) == n_first and s2["timed"] == 0 and s2["cached"] == s1["timed"]
    np.testing.assert_array_equal(first, second)
    # another input shape or thread count is another key: timed again
    lat.latency_column(layer, torch.randn(16, 128), cands, build, cache=lat.LatencyCache(tmp_path), **kw)
    assert len(timed) > n_first


def test_optimize_reuses_the_cached_tables(tmp_path, monkeypatch):
    model, x = wide_mlp()
    comp = Compression(latency=fast_latency(tmp_path))
    timed = counting(monkeypatch)
    autorank.optimize(model, 0.6, x, metric="latency", compression=comp)
    assert len(timed) > 0
    before = len(timed)
    result = autorank.optimize(model, 0.6, x, metric="latency", compression=comp)
    assert len(timed) == before  # no candidate was timed the second time
    t = result.plan.totals
    assert t["latency"] > 0 and t["latency_before"] > 0 and t["latency_iqr"] >= 0 and t["latency_predicted"] > 0
    assert result.plan.metric == "latency" and "latency:" in result.plan.summary()


@pytest.mark.parametrize("seed", range(5))
def test_step_up_never_predicts_below_a_measured_point(seed):
    rng = np.random.default_rng(seed)
    ranks = np.unique(rng.integers(1, 300, size=60))
    grid = lat.rank_grid(ranks, linear=4, ratio=1.3)
    assert grid[-1] == ranks.max() and set(ranks[:4]) <= set(grid) and set(grid) <= set(ranks)
    times = rng.random(len(grid))  # not monotone: noise
    pred = lat.step_up(grid, times, ranks)
    for r, p in zip(ranks, pred):
        assert p >= times[grid <= r].max(initial=-np.inf)
    np.testing.assert_array_equal(lat.step_up(grid, times, grid), np.maximum.accumulate(times))
    with pytest.raises(ValueError, match="above the largest timed rank"):
        lat.step_up(grid, times, np.array([grid[-1] + 1]))


class Sleepy(nn.Module):
    """A stand-in factorisation made slow (tests only): it sleeps 10 ms per call, or spins 10 ms of CPU."""

    def __init__(self, inner, spin):
        super().__init__()
        self.inner, self.spin = inner, spin

    def forward(self, x):
        if self.spin:  # the CPU clock does not count a sleep, only work
            end = time.thread_time() + 1e-2
            while time.thread_time() < end:
                pass
        else:
            time.sleep(1e-2)
        return self.inner(x)


@pytest.mark.parametrize("clock", [pytest.param("wall", marks=pytest.mark.slow), "cpu"])
def test_a_factorisation_slower_than_dense_is_never_chosen(tmp_path, monkeypatch, clock):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 384))  # geometries differ: two cache keys
    x = torch.randn(128, 512)
    model[0].sleepy = True  # survives optimize's copy of the model
    alds = get_family("alds")
    slow = dataclasses.replace(
        alds, name="slow_alds",
        skeleton=lambda m, h: Sleepy(alds.skeleton(m, h), clock == "cpu") if getattr(m, "sleepy", False)
        else alds.skeleton(m, h),
        realize=lambda m, h, moment=None, **kw: alds.realize(m, h, moment, **kw))
    monkeypatch.setitem(FAMILIES._entries, "slow_alds", slow)
    curves = CurveConfig(families=("slow_alds",), groups=(1,), rank_multiple=64)  # ranks 64, 128, 192
    comp = Compression(curves=curves, latency=fast_latency(tmp_path, clock=clock))
    result = autorank.optimize(model, 0.9, x, metric="latency", compression=comp)
    assert "0" in result.plan.skipped and "faster than dense" in result.plan.skipped["0"]
    assert isinstance(result.model[0], nn.Linear)
    # the other layer (6x to 2x fewer MACs, timed honestly) is factorised
    assert result.plan.layers["2"].compressed and isinstance(result.model[2], GroupedLowRankLinear)


@pytest.mark.parametrize("kw, needle", [
    ({"threads": 0}, "threads"), ({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"),
    ({"grid_ratio": 1.0}, "grid_ratio"), ({"min_time_s": -1}, "min_time_s"), ({"clock": "sundial"}, "clock"),
])
def test_bad_latency_settings(kw, needle):
    with pytest.raises(ValueError, match=needle):
        LatencyConfig(**kw)


def test_cpu_clock_does_not_count_waiting():
    slept = lat.time_callables([lambda: time.sleep(5e-3)], repeats=2, warmup=0, threads=1, clock="cpu")
    walled = lat.time_callables([lambda: time.sleep(5e-3)], repeats=2, warmup=0, threads=1, clock="wall")
    assert slept.max() < 2e-3 <= walled.min()
    assert lat.resolve_clock("auto", "cpu", 1) == "cpu" and lat.resolve_clock("auto", "cpu", 2) == "wall"
    assert lat.resolve_clock("auto", "cuda", 1) == "wall"


def test_unwritable_cache_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    model, x = wide_mlp()
    comp = Compression(latency=LatencyConfig(cache=str(blocker / "sub")))
    with pytest.raises(ValueError, match="not writable"):
        autorank.optimize(model, 0.5, x, metric="latency", compression=comp)
    with pytest.raises(TypeError, match="cache"):
        LatencyConfig(cache=3)


@pytest.mark.parametrize("metric", ["params", "flops"])
@pytest.mark.parametrize("m", [2, 4])
def test_rank_multiple_on_any_metric(metric, m):
    model, x = build("mlp")
    step = autorank.CompressStep(x, autorank.Settings(metric, Compression(curves=CurveConfig(rank_multiple=m))))
    prep = step.prepare(model)
    ranks = [lc.candidate(i)["hyper"]["rank"] for lc in prep.curves.values() for i in range(1, len(lc.family))]
    # multiples of m, and the ranks inside the first tile
    assert ranks and all(r % m == 0 or r < m for r in ranks) and {r for r in ranks if r < m} == set(range(1, m))
    assert any(r > m and r % m == 0 for r in ranks) and not any(r > m and r % m for r in ranks)
    result = step(model, 0.5, prepared=prep)
    assert all(lp.hyper["rank"] in ranks for lp in result.plan.layers.values() if lp.compressed)
    with pytest.raises(ValueError, match="rank_multiple"):
        CurveConfig(rank_multiple=0)


def test_a_layer_narrower_than_one_tile_keeps_its_low_ranks():
    # 16 -> 16: rank 16 saves nothing, so with only multiples of 16 the layer would have no candidate
    model, x = nn.Sequential(nn.Linear(16, 16)), torch.randn(4, 16)
    step = autorank.CompressStep(x, autorank.Settings("params", Compression(curves=CurveConfig(rank_multiple=16))))
    curves = step.prepare(model).curves["0"]
    ranks = sorted({curves.candidate(i)["hyper"]["rank"] for i in range(1, len(curves.family))})
    assert ranks == list(range(1, 8))  # rank * (16 + 16) < 256 up to rank 7


@pytest.mark.parametrize("shape, groups", [((5, 24), 3), ((2, 7, 24), 4), ((24,), 2), ((3, 24), 1)])
def test_grouped_linear_matches_its_dense_form(shape, groups):
    torch.manual_seed(0)
    layer = GroupedLowRankLinear(24, 10, rank=3, groups=groups)
    x = torch.randn(*shape)
    expected = layer.to_dense()(x)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_conv_pair_in_channels_last():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    pair = GroupedLowRankConv.from_dense(conv, rank=8, groups=2)
    x = torch.randn(2, 16, 9, 9)
    ref = pair(x)
    out = pair.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_factorised_modules_under_torch_compile():
    torch.manual_seed(0)
    model = nn.Sequential(GroupedLowRankConv.from_dense(nn.Conv2d(8, 16, 3, padding=1), rank=4, groups=2), nn.ReLU(),
                          nn.Flatten(), GroupedLowRankLinear(16 * 6 * 6, 10, rank=8, groups=4)).eval()
    x = torch.randn(2, 8, 6, 6)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: no graph break allowed
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_timing_is_synchronised(tmp_path):
    model, x = wide_mlp()
    model, x = model.cuda(), x.cuda()
    out = measure_latency(model, x, repeats=3, warmup=1)
    assert out["median_s"] > 0
    result = autorank.optimize(model, 0.6, x, metric="latency", compression=Compression(latency=fast_latency(tmp_path)))
    assert result.plan.totals["latency"] > 0


def test_the_default_latency_cache_is_in_the_user_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORANK_CACHE", str(tmp_path / "mine"))
    assert LatencyConfig().cache is True
    cache = lat.LatencyCache(LatencyConfig().cache)
    assert cache.directory == tmp_path / "mine" / "latency" and cache.directory.is_dir()
    assert lat.LatencyCache(None).directory is None and lat.LatencyCache(False).directory is None
    assert LatencyConfig(cache=False).cache is None


# ---- the closed loop: re-plan when the realised model measures over the budget ------------------

def _fake_final_latency(monkeypatch, ratios):
    """The realised model's measured latency, as the given sequence of ratios to the original (the last one
    repeats): a stand-in for a model whose layers are slower together than one at a time, which no tiny
    model on a shared CI machine shows reliably.  Returns ``(state, seen)``: set ``state["before"]`` to the
    original's time; ``seen`` lists the ratios handed out, one per build."""
    import autorank.pipeline as pipeline_mod

    seen = []
    state = {"before": None}

    def fake(model, example, repeats, warmup, threads, clock):
        r = ratios[min(len(seen), len(ratios) - 1)]
        seen.append(r)
        return {"median_s": r * state["before"], "iqr_s": 0.0, "min_s": r * state["before"]}

    monkeypatch.setattr(pipeline_mod, "measure_latency", fake)
    return state, seen


# (budget, measured ratios of the successive builds, corrections allowed, re-plans made, builds): the
# targets stay well above the smallest reachable latency of wide_mlp (about 0.4), except in the last row
LOOP_CASES = [
    (0.8, [0.90, 0.78], 2, 1, 2, 0.0),        # one re-plan brings it under the budget
    (0.8, [0.90, 0.85, 0.84], 2, 2, 3, 0.0),  # still over after the allowed two: kept, with a warning
    (0.8, [0.90], 0, 0, 1, 0.0),              # corrections off: the first build is the result
    (0.8, [0.81, 0.79], 2, 1, 2, 0.0),        # just over, with no spread: one re-plan
    (0.8, [0.81], 2, 0, 1, 0.02),             # just over, within the original's spread (0.02): kept as it is
    (0.8, [0.79], 2, 0, 1, 0.0),              # within the budget: nothing to correct
    (0.6, [1.50, 0.70], 2, 1, 2, 0.0),        # 0.6 * 0.6 / 1.5 = 0.24 is below the smallest reachable: clamped
]


@pytest.mark.parametrize("budget, ratios, corrections, replans, builds, spread_iqr", LOOP_CASES)
def test_latency_over_budget_is_re_planned_tighter(tmp_path, monkeypatch, caplog, budget, ratios, corrections,
                                                    replans, builds, spread_iqr):
    import copy

    from autorank import CompressStep, Settings

    model, x = wide_mlp()
    comp = Compression(latency=fast_latency(tmp_path, corrections=corrections))
    step = CompressStep(x, Settings(compression=comp, metric="latency"))
    prep = step.prepare(copy.deepcopy(model))
    state, seen = _fake_final_latency(monkeypatch, ratios)
    state["before"] = prep.latency["whole_s"]
    prep.latency["whole_iqr_s"] = spread_iqr * prep.latency["whole_s"]  # the original's spread; the fake has none
    asked, predicted = [], []
    choose, finish = CompressStep.choose, CompressStep.finish
    monkeypatch.setattr(CompressStep, "choose",
                        lambda self, w, p, b, **kw: (asked.append(b), choose(self, w, p, b, **kw))[1])

    def finishing(self, *a, **kw):
        res = finish(self, *a, **kw)
        predicted.append(res.plan.totals["latency_predicted"] / res.plan.totals["latency_before"])
        return res

    monkeypatch.setattr(CompressStep, "finish", finishing)
    work = copy.deepcopy(model)
    originals = dict(work.named_children())
    with caplog.at_level("INFO", logger="autorank.pipeline"):
        result = step(work, budget, prepared=prep)
    t = result.plan.totals
    assert len(seen) == builds  # one final measurement per build
    final = ratios[min(builds - 1, len(ratios) - 1)]
    assert t["latency"] / t["latency_before"] == pytest.approx(final)
    if corrections:
        assert t["latency_corrections"] == replans and len(asked) == replans + 1
        # each re-plan asks for the built plan's predicted ratio (at most its target) times budget / measured
        for i in range(replans):
            f = min(asked[i], predicted[i]) * budget / ratios[i]
            clamped = f < 0.3 and f < asked[i + 1] < asked[i]  # raised to the smallest reachable ratio
            assert asked[i + 1] == pytest.approx(f) or clamped
        assert t["latency_target"] == pytest.approx(asked[-1])
        # the plan that was built fits its target in the predicted latency
        assert predicted[-1] <= asked[-1] * (1 + 1e-9)
    else:
        assert "latency_corrections" not in t and len(asked) == 1
    warned = any("over the budget" in rec.getMessage() and rec.levelname == "WARNING" for rec in caplog.records)
    assert warned == (final > budget + spread_iqr)
    assert result.model is work and result.plan.budget == budget
    # every layer the last plan compresses is factorised in the model, every other one is the original object
    for name, lp in result.plan.layers.items():
        assert (work.get_submodule(name) is originals[name]) != lp.compressed


def test_latency_corrections_must_be_a_count():
    with pytest.raises(ValueError, match="corrections"):
        LatencyConfig(corrections=-1)


def test_latency_re_plan_on_a_model_with_attention(tmp_path, monkeypatch):
    """Re-plans on a model with nn.MultiheadAttention (unfused by prepare): each rebuild starts from the model
    as it was before the first build, and the result runs.  (Here the plans compress 4, 2 and 4 of the
    projections; a first plan that leaves them all dense, so that the build fuses the attention back, is
    not reached by this model.)"""
    import copy

    from autorank import CompressStep, Settings

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(128, 4, batch_first=True)
            self.fc = nn.Linear(128, 512)
            self.out = nn.Linear(512, 128)

        def forward(self, x):
            return self.out(torch.relu(self.fc(x + self.attn(x, x, x, need_weights=False)[0])))

    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(8, 32, 128)
    step = CompressStep(x, Settings(compression=Compression(latency=fast_latency(tmp_path)), metric="latency"))
    work = copy.deepcopy(model)
    prep = step.prepare(work)  # unfuses the attention of work itself, as optimize does
    state, seen = _fake_final_latency(monkeypatch, [0.99, 0.99, 0.5])
    state["before"] = prep.latency["whole_s"]
    prep.latency["whole_iqr_s"] = 0.0
    result = step(work, 0.9, prepared=prep)
    assert len(seen) >= 2 and result.plan.totals["latency_corrections"] >= 1
    out = work(x)  # the rebuilt model runs
    assert out.shape == (8, 32, 128) and torch.isfinite(out).all()
    for name, lp in result.plan.layers.items():
        dense = type(work.get_submodule(name)).__name__ in ("Linear", "NonDynamicallyQuantizableLinear")
        assert lp.compressed != dense
