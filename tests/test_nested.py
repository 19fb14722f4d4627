"""autorank.nested: the walkers over nested inputs and outputs, on every kind of container."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from autorank import nested

Pair = collections.namedtuple("Pair", "a b")
A, B, C, I = torch.ones(2), torch.zeros(3), torch.full((1,), 2.0), torch.arange(3)


class ToTuple:
    """An output object that is not a mapping but has ``to_tuple()`` (as some ModelOutputs)."""

    def __init__(self, *parts):
        self.parts = parts

    def to_tuple(self):
        return self.parts


def ids(ts):
    return [id(t) for t in ts]


@pytest.mark.parametrize("obj, expected", [
    (A, [A]),
    ((A, [B, None, "x"], {"z": C}), [A, B, C]),
    ({"b": B, "a": A}, [B, A]),  # insertion order
    (Pair(A, (B, C)), [A, B, C]),
    (ToTuple(A, {"k": B}), [A, B]),
    (None, []),
], ids=["tensor", "mixed", "dict-order", "namedtuple", "to_tuple", "none"])
def test_tensors_in_order(obj, expected):
    assert ids(nested.tensors(obj)) == ids(expected)


def test_tensors_sort_keys():
    assert ids(nested.tensors({"b": B, "a": (A, C)}, sort_keys=True)) == ids([A, C, B])


def test_map_tensors_rebuilds_plain_containers_unless_keep_types():
    obj = {"p": Pair(A, [B]), "n": None, "s": "x"}
    out = nested.map_tensors(obj, lambda t: t + 1)
    assert type(out["p"]) is tuple and torch.equal(out["p"][1][0], B + 1) and out["n"] is None and out["s"] == "x"
    kept = nested.map_tensors(collections.OrderedDict(obj), lambda t: t + 1, keep_types=True)
    assert type(kept) is collections.OrderedDict and type(kept["p"]) is Pair and torch.equal(kept["p"].a, A + 1)


def test_to_device_keeps_types():
    out = nested.to_device([Pair(A, {"i": I})], "cpu")
    assert type(out) is list and type(out[0]) is Pair and out[0].b["i"] is I  # already there: the same tensor


def test_flat_output():
    flat = nested.flat_output((A, {"ints": I, "c": C}))
    assert flat.dtype == torch.float64 and flat.tolist() == [1.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="no floating-point tensor"):
        nested.flat_output({"ints": I})


def test_primary_tensor():
    assert nested.primary_tensor(I) is I
    assert nested.primary_tensor({"ids": I, "logits": C, "h": A}) is C
    assert nested.primary_tensor((I, A)) is A
    with pytest.raises(TypeError, match=r"in a list; do this") as info:
        nested.primary_tensor([[A]], hint="do this")
    assert str(info.value) == "cannot find a floating-point output tensor in a list; do this"


def test_run_model_and_entry():
    class Two(nn.Module):
        def forward(self, x, y=0):
            return x + y

    m = Two()
    assert torch.equal(nested.run_model(m, A), A)
    assert torch.equal(nested.run_model(m, (A, A)), 2 * A)
    assert torch.equal(nested.run_model(m, {"x": A, "y": C}), A + C)
    assert nested.entry({"attention_mask": I}, "attention_mask") is I
    assert nested.entry({}, "attention_mask") is None and nested.entry(A, "attention_mask") is None
