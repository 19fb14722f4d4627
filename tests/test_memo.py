"""The per-compression memo of kernel decompositions (autorank.families.memo): exact keys, bounded, invisible in results."""

from __future__ import annotations

import copy

import pytest
import torch

import autorank
import autorank.pipeline as pipeline
from autorank.families.memo import FitMemo, memo_scope, memoized, weight_key
from autorank.pipeline import CompressStep
from tiny_models import build


def _counting():
    calls = []

    def compute(t):
        calls.append(1)
        return t * 2

    return calls, compute


def test_outside_a_scope_it_always_computes():
    calls, compute = _counting()
    w = torch.randn(4, 3)
    for _ in range(2):
        memoized("x", w, lambda: compute(w))
    assert len(calls) == 2


# (how the second tensor differs from the first, hit?)
CHANGES = [("a deep copy", lambda w: copy.deepcopy(w), True),
           ("one entry moved by an ulp", lambda w: w.index_put((torch.tensor([0]), torch.tensor([0])),
                                                                torch.nextafter(w[0, 0], w[0, 0] + 1)), False),
           ("another dtype", lambda w: w.double(), False),
           ("the same values in another shape", lambda w: w.reshape(3, 4), False)]


@pytest.mark.parametrize("what, change, hit", CHANGES, ids=[c[0] for c in CHANGES])
def test_the_key_is_the_exact_value(what, change, hit):
    calls, compute = _counting()
    w = torch.randn(4, 3)
    other = change(w)
    with memo_scope(FitMemo()) as memo:
        first = memoized("x", w, lambda: compute(w))
        second = memoized("x", other, lambda: compute(other))
    assert len(calls) == (1 if hit else 2) and memo.hits == int(hit)
    assert (second is first) == hit
    assert (weight_key(w) == weight_key(other)) == hit


def test_tags_do_not_share_entries():
    calls, compute = _counting()
    w = torch.randn(5)
    with memo_scope(FitMemo()):
        memoized("a", w, lambda: compute(w))
        memoized("b", w, lambda: compute(w))
    assert len(calls) == 2


def test_least_recently_used_entries_go_past_the_bound():
    memo = FitMemo(max_bytes=3 * 400)  # three 10x10 float32 tensors
    ws = [torch.full((10, 10), float(i)) for i in range(4)]
    with memo_scope(memo):
        for w in ws[:3]:
            memoized("x", w, lambda w=w: w.clone())
        memoized("x", ws[0], lambda: pytest.fail("ws[0] was evicted"))  # a hit: now the most recent
        memoized("x", ws[3], lambda: ws[3].clone())  # evicts ws[1], the least recently used
        assert memo.bytes <= memo.max_bytes and len(memo) == 3
        calls, compute = _counting()
        memoized("x", ws[1], lambda: compute(ws[1]))
        assert calls == [1]
    too_big = FitMemo(max_bytes=10)
    with memo_scope(too_big):
        memoized("x", ws[0], lambda: ws[0].clone())
    assert len(too_big) == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "1"])
def test_a_bad_bound_is_named(bad):
    with pytest.raises(ValueError, match=f"max_bytes={bad!r}"):
        FitMemo(bad)


def _compress(families):
    model, x = build("residual_cnn")
    step = CompressStep(x, autorank.Settings(compression=autorank.Compression(
        curves=autorank.CurveConfig(families=families))))
    prep = step.prepare(copy.deepcopy(model))
    results = [step(copy.deepcopy(model), b, prepared=prep) for b in (0.5, 0.3)]
    return prep, results


@pytest.mark.parametrize("families", [("tucker2",), ("spatial_svd", "cp"), ("alds", "spatial_svd", "tucker2")])
def test_the_memo_changes_no_result(monkeypatch, families):
    prep, results = _compress(families)
    assert prep.memo.hits > 0  # the builds (on fresh copies) read what the curves computed
    monkeypatch.setattr(pipeline, "FIT_MEMO_BYTES", 0)  # keeps nothing
    bare, again = _compress(families)
    assert len(bare.memo) == 0 and bare.memo.hits == 0
    for a, b in zip(results, again):
        assert a.plan.to_dict() == b.plan.to_dict()
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
