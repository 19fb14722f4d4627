"""The layer-graph analyser on awkward topologies."""

import pytest
import torch
import torch.nn as nn

import autorank
from autorank.graph import INPUT, OUTPUT
from tiny_models import build


def test_residual_and_concat_edges():
    model, x = build("residual_cnn")
    g = autorank.analyze(model, x)
    edges = set(g.graph.edges)
    assert (INPUT, "stem") in edges
    assert ("stem", "bn") in edges
    assert ("a", "b") in edges
    # h = relu(bn(stem)) + b(...) feeds both branches: the skip path comes from bn
    assert {("bn", "left"), ("b", "left"), ("bn", "right"), ("b", "right")} <= edges
    # concat of both branches feeds the pool, pool feeds fc, fc is the output
    assert {("left", "pool"), ("right", "pool"), ("pool", "fc"), ("fc", OUTPUT)} <= edges
    assert set(g.layers) == {"stem", "a", "b", "left", "right", "fc"}


def test_shapes_positions_and_flops():
    model, x = build("residual_cnn")
    g = autorank.analyze(model, x)
    right = g.layers["right"]
    assert right.out_shape == (2, 8, 8, 8) and right.kernel == (3, 3)
    assert right.positions == 2 * 8 * 8
    assert right.dense_flops == 2 * 8 * 8 * 8 * 16 * 9
    assert g.total_flops == autorank.count_flops(model, x)
    assert g.total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,layer,reason", [
    ("depthwise", "dw", "depthwise convolution"),
    ("depthwise", "gc", "grouped convolution (groups=4)"),
    ("tied_lm", "out", "tied with emb.weight"),
    ("tied_lm", "unused", "not called"),
], ids=["depthwise", "grouped", "tied", "unused"])
def test_skip_reasons(name, layer, reason):
    model, x = build(name)
    g = autorank.analyze(model, x)
    assert layer not in g.layers
    assert reason in g.skipped[layer]


def test_exclude_patterns():
    model, x = build("transformer_block")
    g = autorank.analyze(model, x, exclude=["q", "k*"])
    assert "excluded by pattern 'q'" in g.skipped["q"]
    assert "excluded by pattern 'k*'" in g.skipped["k"]
    assert {"v", "o", "up", "down"} <= set(g.layers)


def test_dict_inputs_and_token_positions():
    model, x = build("transformer_block")
    g = autorank.analyze(model, x)
    assert g.layers["up"].positions == 2 * 6  # batch * tokens
    assert g.layers["up"].in_shape == (2, 6, 32)
    assert (INPUT, "norm1") in g.graph.edges


def test_shared_module_registered_twice_is_skipped():
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    g = autorank.analyze(model, torch.randn(2, 8))
    assert "also registered as 2" in g.skipped["0"]
    assert g.layers == {}


class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        self.fc(x)
        raise KeyError("kaboom")


def test_failed_forward_restores_model():
    model = Boom().train()
    for p in model.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="forward pass of Boom.*KeyError.*kaboom"):
        autorank.analyze(model, torch.randn(2, 4))
    assert model.training and model.fc.training
    assert not model.fc._forward_hooks and not model.fc._forward_pre_hooks
    assert all(not p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("inputs,exc,msg", [
    (None, ValueError, "example_inputs is required"),
    ("abc", TypeError, "example_inputs must be a tensor"),
    (3, TypeError, "got int"),
])
def test_bad_example_inputs(inputs, exc, msg):
    model, _ = build("mlp")
    with pytest.raises(exc, match=msg):
        autorank.analyze(model, inputs)


def test_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        autorank.analyze(lambda x: x, torch.randn(1))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x, y):
        return self.head(self.a(x) * self.b(y))


def test_tuple_inputs():
    g = autorank.analyze(TwoInputs(), (torch.randn(2, 6), torch.randn(2, 4)))
    assert {(INPUT, "a"), (INPUT, "b"), ("a", "head"), ("b", "head")} <= set(g.graph.edges)
    assert set(g.layers) == {"a", "b", "head"}
