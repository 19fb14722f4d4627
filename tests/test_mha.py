"""nn.MultiheadAttention: its q/k/v and output projections are compressed through an unfused copy.

The unfused module must compute what ``nn.MultiheadAttention`` computes for every option and
call form; the projections must go through the analyser, the curves, the global step, the
data-aware path, realise and save/load like any Linear.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn

import autorank
from autorank import CompressStep
from autorank.families.attention import UnfusedMultiheadAttention, unfuse_attention
from autorank.modules import Factorized
from autorank.pipeline import Settings
from autorank.plan import LayerPlan, Plan

E, HEADS, T, S, B = 16, 4, 6, 5, 3


# ---- the module: every option and call form, against nn.MultiheadAttention ----------------------------

def _mha_inputs(mha: nn.MultiheadAttention, batched: bool, self_attention: bool, gen: torch.Generator):
    def shape(n, d):
        if not batched:
            return (n, d)
        return (B, n, d) if mha.batch_first else (n, B, d)

    q = torch.randn(shape(T, E), generator=gen, dtype=torch.float64)
    if self_attention:
        return q, q, q, T
    src = T if mha.kdim == E else S  # a causal mask needs as many keys as queries
    return (q, torch.randn(shape(src, mha.kdim), generator=gen, dtype=torch.float64),
            torch.randn(shape(src, mha.vdim), generator=gen, dtype=torch.float64), src)


CONFIGS = [  # (batch_first, kdim/vdim, bias, add_bias_kv, add_zero_attn)
    (True, None, True, False, False),
    (False, (6, 10), False, True, False),
    (True, (6, 10), True, False, True),
    (False, None, True, True, True),
]
CALLS = [(need, not batched, kpm, mask, batched)  # (need_weights, average_attn_weights, key_padding_mask, attn_mask,
         for need, kpm, mask, batched in itertools.product(  # batched)
             (True, False), (False, True), (None, "float", "bool", "causal"), (True, False))]


@pytest.mark.parametrize("batch_first,kv,bias,bias_kv,zero", CONFIGS)
def test_unfused_attention_computes_what_mha_computes(batch_first, kv, bias, bias_kv, zero):
    torch.manual_seed(0)
    kdim, vdim = kv or (None, None)
    mha = nn.MultiheadAttention(E, HEADS, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero, kdim=kdim,
                                vdim=vdim, batch_first=batch_first, dtype=torch.float64).eval()
    rng = torch.get_rng_state()
    unfused = UnfusedMultiheadAttention.from_attention(mha)
    assert torch.equal(torch.get_rng_state(), rng), "unfusing must not draw from the global RNG"
    back = unfused.to_attention()
    assert torch.equal(torch.get_rng_state(), rng)
    assert sum(p.numel() for p in unfused.parameters()) == sum(p.numel() for p in mha.parameters())
    gen = torch.Generator().manual_seed(1)
    for need, avg, kpm, mask, batched in CALLS:
        self_attention = kv is None and (need or mask == "causal")
        q, k, v, src = _mha_inputs(mha, batched, self_attention, gen)
        kw = {"need_weights": need, "average_attn_weights": avg}
        if kpm:
            pad = torch.zeros((B, src) if batched else (src,), dtype=torch.bool)
            pad[..., -1] = True
            kw["key_padding_mask"] = pad
        if mask == "float":
            kw["attn_mask"] = torch.randn(T, src, generator=gen, dtype=torch.float64)
        elif mask == "bool":
            kw["attn_mask"] = torch.rand(T, src, generator=gen) < 0.3
            kw["attn_mask"][:, 0] = False  # no fully masked row (NaN on both sides)
        elif mask == "causal":
            if src != T:
                continue
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
            kw["is_causal"] = True
        if kpm and mask in ("float", "causal"):  # a float key_padding_mask with a float attn_mask
            kw["key_padding_mask"] = kw["key_padding_mask"].to(torch.float64).masked_fill(
                kw["key_padding_mask"], float("-inf"))
        with torch.no_grad():
            want_out, want_w = mha(q, k, v, **kw)
            got_out, got_w = unfused(q, k, v, **kw)
            round_out, round_w = back(q, k, v, **kw)
        case = (need, avg, kpm, mask, batched, self_attention)
        assert got_out.shape == want_out.shape, case
        assert torch.allclose(got_out, want_out, rtol=0, atol=1e-12), case
        assert torch.allclose(round_out, want_out, rtol=0, atol=1e-12), case
        if need:
            assert torch.allclose(got_w, want_w, rtol=0, atol=1e-12) and torch.allclose(round_w, want_w), case
        else:
            assert got_w is None and want_w is None, case


def test_unfused_attention_dropout_and_flags_match():
    mha = nn.MultiheadAttention(E, HEADS, dropout=0.3, batch_first=True, dtype=torch.float64)
    mha.out_proj.bias.requires_grad_(False)
    unfused = UnfusedMultiheadAttention.from_attention(mha)
    assert unfused.training and not unfused.out_proj.bias.requires_grad and unfused.q_proj.weight.requires_grad
    x = torch.randn(B, T, E, dtype=torch.float64)
    for need in (True, False):
        torch.manual_seed(3)
        want = mha(x, x, x, need_weights=need)[0]
        torch.manual_seed(3)
        got = unfused(x, x, x, need_weights=need)[0]
        assert torch.allclose(got, want, atol=1e-12), need


# ---- a tiny model: a self-attention with masks and a cross-attention with kdim/vdim ---------------------

class TinyAttention(nn.Module):
    def __init__(self, batch_first: bool = True, need_weights: bool = False) -> None:
        super().__init__()
        self.batch_first, self.need_weights = batch_first, need_weights
        self.embed = nn.Linear(12, E)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, dropout=0.1)
        self.cross = nn.MultiheadAttention(E, 2, kdim=6, vdim=10, add_bias_kv=True, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(E, 32), nn.GELU(), nn.Linear(32, E))
        self.head = nn.Linear(E, 5)

    def forward(self, x, mem_k, mem_v, key_padding_mask, attn_mask):
        h = self.embed(x)
        a, w = self.attn(h, h, h, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                         need_weights=self.need_weights, average_attn_weights=False)
        h = h + a
        c, _ = self.cross(h, mem_k, mem_v, need_weights=self.need_weights)
        h = h + c + self.mlp(h + c)
        out = self.head(h)
        return out if w is None else (out, w)


def tiny_inputs(batch_first: bool, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def t(n, d):
        return torch.randn((B, n, d) if batch_first else (n, B, d), generator=g).to(dtype)

    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, -2:] = True
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    return t(T, 12), t(S, 6), t(S, 10), pad, causal


MODELS = [(True, False), (False, False), (True, True), (False, True)]  # (batch_first, need_weights)


def _outputs(model, x):
    with torch.no_grad():
        out = model(*x)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("batch_first,need_weights", MODELS)
def test_full_rank_plan_is_exact(batch_first, need_weights):
    """Every projection (and every other layer) at full rank: the realised model computes the dense one."""
    torch.manual_seed(0)
    model = TinyAttention(batch_first, need_weights).double().eval()
    x = tiny_inputs(batch_first, dtype=torch.float64)
    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not name.startswith("attn.") and not name.startswith("cross."):
            layers[name] = mod
    for att in ("attn", "cross"):
        unfused = UnfusedMultiheadAttention.from_attention(model.get_submodule(att))
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            layers[f"{att}.{p}"] = getattr(unfused, p)
    plan = Plan(metric="params", budget=1.0, objective="max", attention=["attn", "cross"], layers={
        n: LayerPlan(name=n, kind="linear", shape=list(m.weight.shape), family="alds",
                     hyper={"groups": 1, "rank": min(m.weight.shape)}, error=0.0, error_lower=0.0, dense_params=0,
                     params=0, dense_flops=0, flops=0) for n, m in layers.items()})
    realised = autorank.realize(model, plan)
    assert type(model.attn) is nn.MultiheadAttention, "realize must not change the caller's model"
    assert isinstance(realised.attn, UnfusedMultiheadAttention) and isinstance(realised.cross.k_proj, Factorized)
    for want, got in zip(_outputs(model, x), _outputs(realised, x)):
        assert torch.allclose(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("batch_first,need_weights", MODELS[1:3])
def test_budget_0_3_is_reachable_and_met(batch_first, need_weights, tmp_path):
    torch.manual_seed(0)
    model = TinyAttention(batch_first, need_weights).eval()
    x = tiny_inputs(batch_first)
    reference = copy.deepcopy(model)
    # with the attention left fused (excluded), 0.3 is out of reach: its weights are a fixed cost
    with pytest.raises(ValueError):
        autorank.optimize(model, 0.3, x, compression=autorank.Compression(exclude=["attn", "cross"]))
    result = autorank.optimize(model, 0.3, x)
    t = result.plan.totals
    assert t["params"] <= 0.3 * t["params_before"]
    assert t["params"] == sum(p.numel() for p in result.model.parameters())
    compressed = {n for n, lp in result.plan.layers.items() if lp.compressed}
    assert {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "cross.k_proj"} <= set(result.plan.layers)
    assert any(n.startswith(("attn.", "cross.")) for n in compressed)
    assert type(model.attn) is nn.MultiheadAttention and all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert sorted(result.plan.attention) == sorted(
        n for n in ("attn", "cross") if any(c.startswith(n + ".") for c in compressed))
    # the realised model runs other masks too
    with torch.no_grad():
        result.model(*tiny_inputs(batch_first, seed=5)[:3], None, None)
    # save / load: bit-identical
    result.save(tmp_path / "out")
    loaded = autorank.load(tmp_path / "out", TinyAttention(batch_first, need_weights))
    for xs in (x, tiny_inputs(batch_first, seed=7)):
        for want, got in zip(_outputs(result.model.eval(), xs), _outputs(loaded.eval(), xs)):
            assert torch.equal(got, want)


def test_a_failed_inplace_call_leaves_the_callers_attention_fused():
    torch.manual_seed(0)
    model = TinyAttention().eval()
    x = tiny_inputs(True)
    before = _outputs(model, x)
    with pytest.raises(ValueError):  # far below the smallest reachable budget: fails after the unfusing
        autorank.optimize(model, 0.01, x, inplace=True)
    assert type(model.attn) is nn.MultiheadAttention and type(model.cross) is nn.MultiheadAttention
    for a, b in zip(_outputs(model, x), before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dense_attention_is_fused_back_and_loads(tmp_path):
    """An attention none of whose projections is compressed is an nn.MultiheadAttention again."""
    torch.manual_seed(0)
    model = TinyAttention().eval()
    x = tiny_inputs(True)
    result = autorank.optimize(model, 0.6, x, compression=autorank.Compression(exclude=["cross.*"]))
    assert type(result.model.cross) is nn.MultiheadAttention
    assert "cross" not in result.plan.attention
    assert result.plan.skipped["cross.k_proj"] == "excluded by pattern 'cross.*'"
    result.save(tmp_path / "out")
    loaded = autorank.load(tmp_path / "out", TinyAttention())
    assert torch.equal(_outputs(loaded.eval(), x)[0], _outputs(result.model.eval(), x)[0])


def test_calibration_shares_the_self_attention_moment(tmp_path):
    torch.manual_seed(0)
    model = TinyAttention().eval()
    x = tiny_inputs(True)
    batches = [tiny_inputs(True, seed=s) for s in range(1, 3)]
    step = CompressStep(x, Settings(), calibration=batches)
    work = copy.deepcopy(model)
    prep = step.prepare(work)
    m = prep.moments
    assert m["attn.q_proj"].sum is m["attn.k_proj"].sum is m["attn.v_proj"].sum
    assert m["attn.q_proj"] is not m["attn.k_proj"]  # own Moments (own output moment)
    assert m["cross.k_proj"].sum is not m["cross.v_proj"].sum  # different tensors (kdim != vdim)
    assert m["cross.q_proj"].sum is not m["attn.q_proj"].sum
    # the shared moment is that of the attention's input, embed(x), with padded rows included
    rows = torch.cat([work.embed(b[0]).detach().reshape(-1, E).double() for b in batches])
    assert m["attn.q_proj"].count == rows.shape[0]
    assert torch.allclose(m["attn.q_proj"].matrix, rows.T @ rows / rows.shape[0], rtol=1e-10, atol=1e-12)
    result = step(work, 0.3, prepared=prep)  # whitened factors and the sequential refit
    assert result.plan.totals["params"] <= 0.3 * result.plan.totals["params_before"]
    assert result.plan.config["data_aware"] and result.plan.config["sequential"]
    result.save(tmp_path / "cal")
    loaded = autorank.load(tmp_path / "cal", TinyAttention())
    assert torch.equal(_outputs(loaded.eval(), x)[0], _outputs(result.model.eval(), x)[0])


class Subclassed(nn.MultiheadAttention):
    pass


class Unfusable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.add_module("0", nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=32, batch_first=True))
        self.sub = Subclassed(E, HEADS, batch_first=True)
        self.lin = nn.Linear(E, E)

    def forward(self, x):
        h = self.get_submodule("0")(x)
        return self.lin(h + self.sub(h, h, h)[0])


def test_attention_that_cannot_be_unfused_is_named_with_a_reason():
    model = Unfusable()
    done, left = unfuse_attention(copy.deepcopy(model))
    assert done == []
    assert "reads in_proj_weight and out_proj.weight directly" in left["0.self_attn"]
    assert "subclasses nn.MultiheadAttention" in left["sub"]
    shared = nn.Module()
    shared.a = nn.MultiheadAttention(E, HEADS)
    shared.b = shared.a
    assert "also registered as b" in unfuse_attention(copy.deepcopy(shared))[1]["a"]
    # the analyser names the functional out_proj of an attention it sees fused
    graph = autorank.analyze(TinyAttention(), tiny_inputs(True))
    assert "unfusing the attention" in graph.skipped["attn.out_proj"]
    # what optimize left fused is in the result's skip list with the reason
    x = torch.randn(2, T, E)
    result = autorank.optimize(model, 0.97, x)  # the fused attention weights are a fixed cost
    assert "reads in_proj_weight" in result.plan.skipped["0.self_attn"]
    assert result.plan.skipped["0.self_attn.out_proj"] == "called functionally by the attention 0.self_attn, left fused"
    assert "subclasses" in result.plan.skipped["sub"] and result.plan.attention == []


def test_cascade_schedule_keeps_attention_unfused_consistently(tmp_path):
    torch.manual_seed(0)
    model = TinyAttention().eval()
    x = tiny_inputs(True)
    result = autorank.optimize(model, 0.4, x, steps=2, finetune=lambda m, step: None)
    assert result.plan.totals["params"] <= 0.4 * result.plan.totals["params_before"]
    result.save(tmp_path / "c")
    loaded = autorank.load(tmp_path / "c", TinyAttention())
    assert torch.equal(_outputs(loaded.eval(), x)[0], _outputs(result.model.eval(), x)[0])


# ---- torchvision ViT-B/16 (untrained) ---------------------------------------------------------------------

@pytest.mark.slow
def test_vit_b_16_attention_budgets():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = tv.models.vit_b_16(weights=None, image_size=64).eval()  # 16 patches: the same weights, fewer tokens
    nn.init.normal_(vit.heads.head.weight, std=0.02)  # torchvision initialises the head to zero (output 0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = vit(x)
    step = CompressStep(x, Settings())
    base = copy.deepcopy(vit)
    prep = step.prepare(base)
    n_attn = sum(isinstance(m, nn.MultiheadAttention) for m in vit.modules())
    assert len(prep.attention) == n_attn == 12
    projections = [n for n in prep.curves if n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "out_proj")]
    assert len(projections) == 4 * n_attn
    rows = []
    for budget in (0.3, 0.5, 0.7, 0.9):
        result = step(copy.deepcopy(base), budget, prepared=prep)
        t = result.plan.totals
        ratio = t["params"] / t["params_before"]
        with torch.no_grad():
            err = ((result.model(x) - want).norm() / want.norm()).item()
        rows.append((budget, ratio, err, len(result.plan.attention)))
        assert ratio <= budget
    # full rank: every projection factorised at full rank reproduces the model
    plan = Plan(metric="params", budget=1.0, objective="max", attention=list(prep.attention), layers={
        n: LayerPlan(name=n, kind="linear", shape=[lc.info.out_features, lc.info.in_channels], family="alds",
                     hyper={"groups": 1, "rank": min(lc.info.out_features, lc.info.in_channels)}, error=0.0,
                     error_lower=0.0, dense_params=0, params=0, dense_flops=0, flops=0)
        for n, lc in prep.curves.items() if n in projections})
    full = autorank.realize(vit, plan)
    with torch.no_grad():
        full_err = ((full(x) - want).norm() / want.norm()).item()
    for budget, ratio, err, unfused in rows:
        print(f"vit_b_16 budget {budget:.1f}: params ratio {ratio:.4f}, output rel. error {err:.4f}, "
              f"{unfused} attention modules unfused")
    print(f"vit_b_16 full rank: output rel. error {full_err:.2e}")
    assert full_err < 1e-5
