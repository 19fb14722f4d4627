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
