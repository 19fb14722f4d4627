"""Block-by-block calibration (autorank.stream) against the whole-model path, and the shared moments."""

from __future__ import annotations

import copy
import gc
import os
import weakref

import pytest
import torch
from torch import nn

import autorank
from autorank import calibration, pipeline, stream
from autorank.calibration import Moments, collect_moments
from autorank.graph import analyze

transformers = pytest.importorskip("transformers")

VOCAB = 64


def tiny_llama() -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert() -> nn.Module:
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=VOCAB, max_position_embeddings=32, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, scale):
        return x + self.b(torch.relu(self.a(x))) * scale


class Stack(nn.Module):
    """A Linear before the blocks, three blocks called with a keyword argument, a head after them."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(3))
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, scale=0.5)
        return self.head(h)


class Shuffled(Stack):
    """The same blocks, called out of order: not a chain."""

    def forward(self, x):
        h = self.inp(x)
        for i in (0, 2, 1):
            h = self.blocks[i](h, scale=0.5)
        return self.head(h)


def token_batches(n: int = 3, pad: bool = True) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        mask = torch.ones(2, 12, dtype=torch.long)
        if pad and i == 1:
            mask[1, 8:] = 0
        out.append({"input_ids": torch.randint(1, VOCAB, (2, 12), generator=g) * mask, "attention_mask": mask})
    return out


def vector_batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 6, 8, generator=g) for _ in range(n)]


CASES = {
    "llama": (tiny_llama, token_batches),
    "gpt2": (tiny_gpt2, token_batches),
    "bert": (tiny_bert, token_batches),
    "stack": (Stack, vector_batches),
}


def first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def run(model, batch):
    with torch.no_grad():
        return first(model(**batch) if isinstance(batch, dict) else model(batch))


# ---- the chain -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, container, before, after", [
    ("llama", "model.layers", [], ["lm_head"]),
    ("gpt2", "transformer.h", [], []),  # lm_head is tied to the embedding: skipped
    ("bert", "encoder.layer", [], ["pooler.dense"]),
    ("stack", "blocks", ["inp"], ["head"]),
])
def test_find_chain_finds_the_blocks_and_what_runs_before_and_after(name, container, before, after):
    make, data = CASES[name]
    model = make()
    batch = data()[0]
    graph = analyze(model, batch)
    chain = stream.find_chain(model, list(graph.layers), batch)
    assert isinstance(chain, stream.Chain), chain
    assert chain.container == container
    assert chain.blocks == [f"{container}.{i}" for i in range(len(model.get_submodule(container)))]
    assert chain.before == before and chain.after == after
    inside = [n for b in chain.blocks for n in chain.inside[b]]
    assert sorted(inside + before + after) == sorted(graph.layers)


def test_find_chain_refuses_blocks_called_out_of_order_and_models_without_blocks():
    model = Shuffled()
    x = vector_batches()[0]
    reason = stream.find_chain(model, list(analyze(model, x).layers), x)
    assert isinstance(reason, str) and "in order" in reason
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    reason = stream.find_chain(mlp, ["0", "2"], x)
    assert isinstance(reason, str) and "blocks of one type" in reason


def test_streaming_true_on_a_model_without_a_chain_is_an_error_naming_the_reason():
    model = Shuffled()
    batches = vector_batches()
    with pytest.raises(ValueError, match="cannot be streamed block by block: .*in order"):
        autorank.optimize(model, 0.5, batches[0], calibration=batches, data=autorank.DataAware(streaming=True),
                          progress=False)


# ---- the same result as the whole-model path ------------------------------------------------------

def _pair(name, heavy, monkeypatch, **data):
    make, batches_of = CASES[name]
    model = make()
    batches = batches_of()
    if heavy:  # every model is "too big" for all its moments at once: one block's moments at a time
        monkeypatch.setattr(pipeline, "OUTPUT_MOMENTS_LIMIT", -1)
    results = [autorank.optimize(model, 0.5, batches[0], calibration=batches, progress=False,
                                 data=autorank.DataAware(streaming=s, **data)) for s in (False, True)]
    return model, batches, results


@pytest.mark.parametrize("heavy", [False, True], ids=["kept", "one-block"])
@pytest.mark.parametrize("name", list(CASES))
def test_without_the_refit_the_streamed_plan_and_model_are_the_whole_model_ones(name, heavy, monkeypatch):
    model, batches, (whole, streamed) = _pair(name, heavy, monkeypatch, sequential=False)
    assert list(whole.plan.layers) == list(streamed.plan.layers)
    for n, lp in whole.plan.layers.items():
        other = streamed.plan.layers[n]
        assert (lp.family, lp.hyper) == (other.family, other.hyper), n
        assert lp.error == pytest.approx(other.error, rel=1e-9, abs=1e-12), n
    assert whole.plan.config == streamed.plan.config
    for b in batches:
        torch.testing.assert_close(run(streamed.model, b), run(whole.model, b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heavy", [False, True], ids=["kept", "one-block"])
@pytest.mark.parametrize("name", list(CASES))
def test_with_the_refit_the_streamed_model_matches_the_whole_model_refit(name, heavy, monkeypatch):
    model, batches, (whole, streamed) = _pair(name, heavy, monkeypatch)
    assert {n: lp.hyper for n, lp in whole.plan.layers.items()} == \
           {n: lp.hyper for n, lp in streamed.plan.layers.items()}
    ref = [run(model, b) for b in batches]
    for b, r in zip(batches, ref):
        a, s = run(whole.model, b), run(streamed.model, b)
        # the same paired moments, accumulated in another order: equal up to rounding (stated tolerance 1e-4)
        assert float((a - s).norm() / r.norm()) < 1e-4
        # and the refit did something: closer to the original than the refit-free model of the same plan
    plain = autorank.optimize(model, 0.5, batches[0], calibration=batches, progress=False,
                              data=autorank.DataAware(sequential=False, streaming=True,
                                                      output_weighting=not heavy and None,
                                                      output_allocation=not heavy and None))
    err = lambda m: sum(float((run(m, b) - r).norm() / r.norm()) for b, r in zip(batches, ref))  # noqa: E731
    assert err(streamed.model) < err(plain.model)


def test_heavy_models_default_to_no_output_parts_and_record_it(monkeypatch):
    _, _, (whole, streamed) = _pair("llama", True, monkeypatch)
    for r in (whole, streamed):
        assert r.plan.config["output_weighting"] is False
        assert r.plan.config["allocator"] == "alds"
    monkeypatch.setattr(pipeline, "OUTPUT_MOMENTS_LIMIT", 2 ** 40)
    model, batches = tiny_llama(), token_batches()
    light = autorank.optimize(model, 0.5, batches[0], calibration=batches, progress=False)
    assert light.plan.config["output_weighting"] is True and light.plan.config["allocator"] == "alds_output"


def test_only_one_blocks_moments_are_alive_at_a_time(monkeypatch):
    """Instrumented, not timed: every Moments object is tracked, and counted whenever a block's are made."""
    monkeypatch.setattr(pipeline, "OUTPUT_MOMENTS_LIMIT", -1)
    alive: list[weakref.ref] = []  # (Moments is a dataclass with __eq__: unhashable, so no WeakSet)
    counts: list[int] = []
    init = Moments.__init__

    def tracked(self, *a, **k):
        init(self, *a, **k)
        alive.append(weakref.ref(self))

    real = stream.collect_moments

    def counting(model, layers, *a, **k):
        gc.collect()
        live = [m for r in alive if (m := r()) is not None]
        counts.append(len({id(m.sum) for m in live}))  # distinct sums: shared ones count once
        return real(model, layers, *a, **k)

    monkeypatch.setattr(Moments, "__init__", tracked)
    monkeypatch.setattr(stream, "collect_moments", counting)
    model, batches = tiny_llama(), token_batches()
    autorank.optimize(model, 0.5, batches[0], calibration=batches, progress=False,
                      data=autorank.DataAware(sequential=False))
    # pass 1 counts before the prefix and before each of the 3 blocks, pass 2 before each block's
    # re-collection; alive then: nothing, or the suffix's lm_head moment (kept for pass 2)
    assert len(counts) >= 7
    assert max(counts) <= 1, counts


# ---- shared moments ---------------------------------------------------------------------------------

def test_layers_reading_the_same_tensor_share_one_moment_that_equals_their_own():
    model = tiny_llama()
    batches = token_batches()
    graph = analyze(model, batches[0])
    moms = collect_moments(model, graph.layers, batches)
    q, k, v = (moms[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert q.sum is k.sum is v.sum and q is not k  # one sum; own Moments objects (their output moments differ)
    gate, up = moms["model.layers.0.mlp.gate_proj"], moms["model.layers.0.mlp.up_proj"]
    assert gate.sum is up.sum and gate.sum is not q.sum
    alone = collect_moments(model, {"model.layers.0.self_attn.k_proj": graph.layers["model.layers.0.self_attn.k_proj"]},
                            batches)
    torch.testing.assert_close(alone["model.layers.0.self_attn.k_proj"].matrix, k.matrix)
    assert alone["model.layers.0.self_attn.k_proj"].count == k.count


class Fork(nn.Module):
    """``b`` reads ``a``'s input on the first two passes, then a different tensor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.a(x) + self.b(x if self.calls <= 2 else x * 2 + 1)


def test_a_layer_that_stops_reading_the_shared_tensor_gets_its_own_exact_moment():
    batches = vector_batches(4)
    batches = [b.reshape(-1, 8)[:, :4] for b in batches]
    model = Fork()
    layers = analyze(Fork(), batches[0]).layers
    moms = collect_moments(model, layers, batches)
    rows = torch.cat([b if i < 2 else b * 2 + 1 for i, b in enumerate(batches)]).double()
    torch.testing.assert_close(moms["b"].matrix, rows.T @ rows / rows.shape[0])
    assert moms["b"].sum is not moms["a"].sum and moms["b"].count == rows.shape[0]
    xs = torch.cat(batches).double()
    torch.testing.assert_close(moms["a"].matrix, xs.T @ xs / xs.shape[0])


# ---- the dense layers a rollback holds live in a mapped file, not in memory -------------------------

NEEDS_MAPS = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")


def _spilled(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage lies in a mapping of an (unlinked) autorank spill file."""
    ptr = t.untyped_storage().data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return "autorank-spill-" in line
    return False


@NEEDS_MAPS
def test_spill_to_disk_keeps_values_and_objects_and_leaves_live_shared_and_small_tensors(tmp_path):
    from autorank.realize import spill_to_disk

    torch.manual_seed(0)
    big, small = nn.Linear(256, 128), nn.Linear(4, 4)
    tied, shared, sliced = nn.Linear(256, 128), nn.Linear(256, 128), nn.Linear(128, 128)
    live = nn.Sequential(nn.Linear(128, 256), nn.Linear(256, 128))
    tied.weight = nn.Parameter(live[0].weight.detach().T.contiguous())
    live[0].weight = tied.weight  # a replaced layer's weight that the live model still holds
    shared.weight = nn.Parameter(live[1].weight.data)  # another Parameter object on the same storage
    flat = torch.randn(2 * 128 * 128)
    sliced.weight = nn.Parameter(flat[: 128 * 128].view(128, 128))  # a view of a larger (flat) storage
    modules = (big, small, tied, shared, sliced)
    before = {id(t): t.detach().clone() for m in modules for t in m.parameters()}
    objects = [t for m in modules for t in m.parameters()]
    moved = spill_to_disk(modules, live=live, directory=tmp_path)
    assert moved == big.weight.numel() * 4  # only the big weight: the bias and small are under 64 KiB
    assert [t for m in modules for t in m.parameters()] == objects  # the same Parameter objects
    assert _spilled(big.weight) and not any(_spilled(t) for t in (big.bias, tied.weight, shared.weight, sliced.weight))
    assert shared.weight.data_ptr() == live[1].weight.data_ptr()  # still one storage: the tie holds
    for t in objects:
        assert torch.equal(t, before[id(t)])
    assert list(tmp_path.iterdir()) == []  # the file is unlinked once mapped
    big.weight.data.mul_(2)  # a private mapping: writable, and the writes stay in this process
    assert torch.equal(big.weight, 2 * before[id(big.weight)])


def test_spill_to_disk_that_cannot_write_warns_and_moves_nothing(tmp_path, caplog):
    from autorank.realize import spill_to_disk

    lin = nn.Linear(256, 128)
    ptr = lin.weight.data_ptr()
    with caplog.at_level("WARNING", logger="autorank.realize"):
        assert spill_to_disk([lin], directory=tmp_path / "missing") == 0
    assert lin.weight.data_ptr() == ptr
    assert "stay in memory" in caplog.text


@NEEDS_MAPS
def test_a_heavy_inplace_stream_spills_the_replaced_layers_and_a_failure_still_restores_them(monkeypatch):
    import importlib

    realize_mod = importlib.import_module("autorank.realize")  # (autorank.realize is also the function)
    monkeypatch.setattr(pipeline, "OUTPUT_MOMENTS_LIMIT", -1)  # heavy: one block's moments at a time
    monkeypatch.setattr(realize_mod, "SPILL_MIN_BYTES", 0)  # the tiny model's weights count as big
    model, batches = tiny_llama(), token_batches()
    ref = [run(model, b) for b in batches]
    dense = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    spilled_at_failure = {}

    def fail(*a, **k):
        spilled_at_failure.update({n: _spilled(m.weight) for n, m in dense.items()})
        raise RuntimeError("injected after the build")
    monkeypatch.setattr(pipeline, "measure_totals", fail)
    with pytest.raises(RuntimeError, match="injected"):
        autorank.optimize(model, 0.5, batches[0], calibration=batches, progress=False, inplace=True)
    replaced = [n for n, s in spilled_at_failure.items() if s]
    assert any(".self_attn." in n for n in replaced) and any(".mlp." in n for n in replaced), spilled_at_failure
    # the rollback put the very same (now mapped) modules back: the model is as it was
    assert {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)} == dense
    for b, r in zip(batches, ref):
        assert torch.equal(run(model, b), r)


# ---- probes skip the unchanged blocks before the changed layer ---------------------------------------

@pytest.mark.parametrize("name", ["llama", "bert", "stack"])
def test_block_replay_gives_the_full_runs_output_and_skips_the_blocks_before_the_layer(name):
    make, batches_of = CASES[name]
    model = make()
    example = batches_of()[0]
    chain = stream.find_chain(model, list(analyze(model, example).layers), example)
    assert isinstance(chain, stream.Chain), chain
    replay = stream.block_replay(model, chain, example)
    work = copy.deepcopy(model)
    calls = {b: 0 for b in chain.blocks}
    for b in chain.blocks:
        work.get_submodule(b).register_forward_pre_hook(lambda m, a, b=b: calls.__setitem__(b, calls[b] + 1))
    last = chain.blocks[-1]
    layer = chain.inside[last][0]
    with torch.no_grad():
        work.get_submodule(layer).weight.mul_(0.5)  # the copy differs in that layer only
    full = run(work, example)
    counted = dict(calls)
    with replay(work, layer):
        part = run(work, example)
    assert torch.equal(part, full)  # exact: the skipped blocks replay the same values
    assert {b: calls[b] - counted[b] for b in chain.blocks} == {b: int(b == last) for b in chain.blocks}
    assert isinstance(work.get_submodule(chain.blocks[0]), type(model.get_submodule(chain.blocks[0])))  # put back
    if chain.before:  # a prefix layer: nothing to skip
        with replay(work, chain.before[0]):
            torch.testing.assert_close(run(work, example), full)


class EveryBlock(Stack):
    """Reads every block's output (as ``output_hidden_states`` does); the head's input is changed in place."""

    def forward(self, x):
        h = self.inp(x)
        seen = []
        for blk in self.blocks:
            h = blk(h, scale=0.5)
            seen.append(h)
        h = h.mul_(0.9)  # in place, on the last block's own output (not idempotent)
        return self.head(h) + sum(s.mean() for s in seen)


class EditedBetween(Stack):
    """Changes a block's output in place before the next block runs on it: not a chain to replay."""

    def forward(self, x):
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, scale=0.5)
            h.mul_(0.9)
        return self.head(h)


def test_find_chain_refuses_a_block_output_edited_in_place_before_the_next_block():
    model = EditedBetween()
    x = vector_batches()[0]
    why = stream.find_chain(model, list(analyze(model, x).layers), x)
    assert isinstance(why, str) and "changed in place" in why


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "stack", "every-block"])
def test_probe_scores_with_block_replay_equal_the_full_runs(name):
    from autorank.allocators.base import AllocationContext
    from autorank.allocators.evaluated import DEFAULT_RATIOS, _score_layers, rank_tables
    from autorank.curves import build_curves

    make, batches_of = CASES.get(name, (EveryBlock, vector_batches))
    model = make()
    example = batches_of()[0]
    graph = analyze(model, example)
    chain = stream.find_chain(model, list(graph.layers), example)
    assert isinstance(chain, stream.Chain), chain
    curves, _ = build_curves(model, graph, progress=False)

    def scores(replay):
        ctx = AllocationContext(curves=curves, budget=0.5, metric="params", total=graph.total_params, fixed=0,
                                model=model, example_inputs=example, replay=replay)
        tables, _ = rank_tables(ctx)
        return _score_layers(ctx, tables, DEFAULT_RATIOS)

    full = scores(None)
    replay = stream.block_replay(model, chain, example)
    assert scores(replay) == full  # every layer (every block, the prefix and the suffix), every rank: exact
    assert scores(replay) == full  # and again, from the same stored outputs
    assert len(full) == len(curves) and all(len(rows) >= 2 for rows in full.values())
