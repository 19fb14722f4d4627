r"""Block-by-block (streamed) calibration: one block's moments in memory at a time.

Transformers, and many other models, are a *chain of blocks*: a ``ModuleList`` (or
``Sequential``) of blocks of one type, each called once per forward pass on the
previous block's output, with the same other arguments (masks, position
embeddings).  For such a model the calibration data need not flow through the
whole model at once: the inputs of block ``b`` are enough to build the moments of
its layers, compress them, and compute the inputs of block ``b + 1``.

**Which models.**  :func:`find_chain` picks the ``ModuleList``/``Sequential`` of two
or more blocks of one type that holds the most compressible layers, and checks on
the first calibration batch, by hooks, that the chain is real: every block is
called once, in order; block ``b + 1``'s first argument *is* block ``b``'s output
(its first tensor); its other arguments and keyword arguments equal block 0's; and
every compressible layer is called only inside its own block, or only before the
first block (the *prefix*: embeddings, a patch convolution), or only after the last
(the *suffix*: a final norm and an ``lm_head``, a pooler, a classifier).  Any other
model, or a failed check, runs the whole-model path (:mod:`autorank.calibration`),
and the log says why.  A model with ``config.use_cache`` runs with it off.

**Pass 1, the curves** (:func:`stream_curves`).  The first block's inputs are
captured by running the prefix alone (a hook ends the pass at block 0), which also
gives the prefix layers' moments.  Then, for ``b = 0, 1, ...``: the moments of block
``b``'s layers on its inputs ``X_b`` (:func:`autorank.calibration.collect_moments`),
their error curves (:func:`autorank.curves.build_curves`), then ``X_{b+1} = B_b(X_b)``
-- and block ``b``'s moments are dropped.  Only the candidate tables of every layer
are kept, so the global solver sees every layer of the model at once while the
memory holds one block's moments (``O(sum n^2)`` over one block's layers, instead of
over all of them), the block inputs of the calibration batches, and the suffix's
moments, taken with the blocks *replayed* (each block returns the stored output of
the last block, so only the prefix and the suffix compute).

**Pass 2, the build** (:func:`stream_build`), after the global solve, in the same
order: the prefix layers are realised (and refitted); then for every block, with
``X_b`` the original model's inputs and ``X_hat_b`` the compressed model's:

* with the sequential refit: a copy of the original block (one block, not the
  model) is the reference; the block's layers are replaced by the plan's modules and
  refitted stage by stage (:func:`autorank.sequential.sequential_refit`, the
  reference run on ``X_b``, the block on ``X_hat_b``), then ``X_{b+1} = B_b(X_b)`` and
  ``X_hat_{b+1} = B_hat_b(X_hat_b)``;
* without it: the moments of ``X_b`` again and the plan's data-aware factors
  (:func:`autorank.realize`) -- exactly the whole-model path's factors.

then the suffix, refitted against a copy of the suffix layers only, with the blocks
replayed (the original outputs for the reference, the compressed outputs for the
model).  The refit sees the same paired inputs as the whole-model refit, layer by
layer, so the two agree up to floating point; the forward passes of a stage run
through one block instead of the whole prefix of the model, which is where the
whole-model refit spends its time.

Output weighting needs the output moments ``G`` of every layer, from backward passes
through the whole model; when it is on they are collected whole-model first (they
are ``f x f`` per layer: :mod:`autorank.pipeline` turns the output-aware parts off by
default on models where they would not fit, see :func:`output_moment_bytes`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from .calibration import Moments, StopForward, collect_moments
from .curves import LayerCurves, build_curves
from .families import get_family
from .graph import LayerGraph
from .layers import get_layer_handler
from .nested import Call, entry, map_tensors, primary_tensor, run_model, tensors
from .plan import Plan
from .realize import realize, spill_to_disk
from .sequential import sequential_refit

__all__ = ["Chain", "find_chain", "Streamed", "stream_curves", "stream_build", "input_moment_bytes",
           "output_moment_bytes", "block_replay"]

log = logging.getLogger(__name__)


@dataclass
class Chain:
    """A model's chain of blocks (:func:`find_chain`).

    container: qualified name of the ``ModuleList``/``Sequential`` holding the blocks.
    blocks:    qualified names of the blocks, in call order.
    inside:    ``{block: [its compressible layers]}``.
    before:    compressible layers called before the first block (the prefix).
    after:     compressible layers called after the last block, or never (the suffix).
    """

    container: str
    blocks: list[str]
    inside: dict[str, list[str]]
    before: list[str]
    after: list[str]


@dataclass
class Streamed:
    """What pass 1 keeps for pass 2: the chain, the first block's inputs, the prefix's and suffix's moments."""

    chain: Chain
    inputs: list[Call]
    outer: dict[str, Moments]
    reached: set[str]
    batches: list[Any]
    mask_key: str = "attention_mask"
    timings: dict[str, float] = field(default_factory=dict)


def _within(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) + 1:] if prefix else name


def output_moment_bytes(graph: LayerGraph) -> int:
    """Bytes of the output moments of output weighting: ``8 f^2`` (float64) per layer, ``f`` its output width."""
    return sum(8 * info.out_features ** 2 for info in graph.layers.values() if info.kind != "embedding")


def input_moment_bytes(graph: LayerGraph) -> int:
    """Bytes of the input moments of every layer at once: ``8 n^2`` per layer (``8 n`` for an embedding),
    ``n`` its input width (``c k_h k_w`` for a convolution)."""
    return sum(8 * info.weight_params // info.out_features * (1 if info.kind == "embedding" else
                                                             info.weight_params // info.out_features)
               for info in graph.layers.values())


def _same(a: Any, b: Any) -> bool:
    """``a`` and ``b`` are the same call argument: the same tensors (or equal ones), equal plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return a is b or (a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is None or isinstance(a, (bool, int, float, str)):
        return type(a) is type(b) and a == b
    return False  # a cache object or anything else: a block cannot be replayed with it


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(_plain(v) for v in value.values())
    return False


def _containers(model: nn.Module, layers: Sequence[str]) -> list[tuple[str, nn.Module, int]]:
    """``(name, container, layers inside)`` of every ModuleList/Sequential of >= 2 same-type blocks, most first."""
    found = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 2:
            continue
        kids = list(mod)
        if len({type(k) for k in kids}) != 1:
            continue
        names = [f"{name}.{i}" if name else str(i) for i in range(len(kids))]
        counts = [sum(_within(l, b) for l in layers) for b in names]
        if min(counts) >= 1:
            found.append((name, mod, sum(counts)))
    found.sort(key=lambda t: -t[2])
    return found


@contextlib.contextmanager
def _no_cache(model: nn.Module) -> Iterator[None]:
    """``model.config.use_cache = False`` while streaming (a key/value cache would grow across replays)."""
    config = getattr(model, "config", None)
    had = config is not None and getattr(config, "use_cache", None) is not None
    old = getattr(config, "use_cache", None) if had else None
    if had:
        config.use_cache = False
    try:
        yield
    finally:
        if had:
            config.use_cache = old


@torch.no_grad()
def find_chain(model: nn.Module, layers: Sequence[str], batch: Any) -> Chain | str:
    """The chain of blocks of ``model`` (module docstring), checked on ``batch``; or why there is none."""
    found = _containers(model, list(layers))
    if not found:
        return "no ModuleList/Sequential of two or more blocks of one type holds the compressible layers"
    cname, container, _ = found[0]
    blocks = [f"{cname}.{i}" if cname else str(i) for i in range(len(container))]
    index = {id(b): i for i, b in enumerate(container)}
    calls: list[tuple[int, tuple, dict]] = []
    outs: dict[int, Any] = {}
    snaps: dict[int, torch.Tensor] = {}
    where: dict[str, set[Any]] = {name: set() for name in layers}
    state: dict[str, Any] = {"active": None, "started": False}
    handles = []

    def pre(mod, args, kwargs):
        i = index[id(mod)]
        calls.append((i, args, kwargs))
        state["active"], state["started"] = i, True

    def post(mod, args, kwargs, out):
        i = index[id(mod)]
        if i not in outs:
            outs[i] = out
            try:  # its values now: the next block must see them unchanged (no in-place edit between)
                snaps[i] = primary_tensor(out).detach().clone()
            except TypeError:
                pass
        state["active"] = None

    def layer_hook(name):
        def fn(mod, args):
            a = state["active"]
            where[name].add(("block", a) if a is not None else (("after",) if state["started"] else ("before",)))
        return fn

    try:
        for b in container:
            handles.append(b.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(b.register_forward_hook(post, with_kwargs=True))
        for name in layers:
            handles.append(model.get_submodule(name).register_forward_pre_hook(layer_hook(name)))
        was = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with _no_cache(model):
                run_model(model, batch)
        finally:
            for m, mode in was.items():
                m.training = mode
    except Exception as exc:  # the check's forward fails: the whole-model path reports it properly
        return f"the forward pass on the first calibration batch failed ({type(exc).__name__}: {exc})"
    finally:
        for h in handles:
            h.remove()
    order = [i for i, _, _ in calls]
    if order != list(range(len(blocks))):
        return f"the blocks of {cname!r} are not called once each, in order (calls: {order[:8]})"
    first_args, first_kwargs = calls[0][1], calls[0][2]
    if not first_args or not isinstance(first_args[0], torch.Tensor):
        return f"block {blocks[0]!r} does not take its hidden state as its first positional argument"
    for key, value in {**dict(enumerate(first_args[1:])), **first_kwargs}.items():
        if not _plain(value):
            return f"block {blocks[0]!r} is called with {key!r} = a {type(value).__name__}, which cannot be replayed"
    for i in range(1, len(blocks)):
        _, args, kwargs = calls[i]
        try:
            prev = primary_tensor(outs[i - 1])
        except TypeError:
            return f"block {blocks[i - 1]!r} returns no tensor"
        if not args or not _same(args[0], prev):
            return f"block {blocks[i]!r} is not called on block {blocks[i - 1]!r}'s output"
        if not _same(args[0].detach(), snaps[i - 1]):
            return (f"block {blocks[i - 1]!r}'s output is changed in place before block {blocks[i]!r} "
                    "runs on it")
        if not (_same(tuple(args[1:]), tuple(first_args[1:])) and _same(kwargs, first_kwargs)):
            return f"block {blocks[i]!r} is called with other arguments than block {blocks[0]!r}"
    inside: dict[str, list[str]] = {b: [] for b in blocks}
    before, after = [], []
    for name in layers:
        seen = where[name]
        if len(seen) > 1:
            return f"layer {name!r} is called in more than one place of the chain ({sorted(map(str, seen))})"
        place = next(iter(seen)) if seen else ("after",)
        if place[0] == "block":
            if not _within(name, blocks[place[1]]):
                return f"layer {name!r} is called inside block {blocks[place[1]]!r} but does not belong to it"
            inside[blocks[place[1]]].append(name)
        elif any(_within(name, b) for b in blocks):
            return f"layer {name!r} belongs to a block but is called outside it"
        elif place[0] == "before":
            before.append(name)
        else:
            after.append(name)
    return Chain(container=cname, blocks=blocks, inside=inside, before=before, after=after)


# ---- running pieces of the chain -------------------------------------------------------------------

@torch.no_grad()
def capture_inputs(model: nn.Module, chain: Chain, batches: Sequence[Any], layers: Mapping[str, Any],
                   progress: bool | None = None, mask_key: str = "attention_mask"
                   ) -> tuple[list[Call], dict[str, Moments]]:
    """The first block's inputs on every batch (the prefix alone runs), and the moments of ``layers`` in the prefix."""
    first = model.get_submodule(chain.blocks[0])
    captured: list[Call] = []

    def grab(mod, args, kwargs):
        captured.append(Call(tuple(args), dict(kwargs)))
        raise StopForward

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with _no_cache(model):
            moments = collect_moments(model, layers, batches, progress, mask_key, quiet_missing=True)
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError(f"block {chain.blocks[0]!r} was reached on {len(captured)} of {len(batches)} batches")
    inputs = [Call(c.args, c.kwargs, entry(b, mask_key)) for c, b in zip(captured, batches)]
    return inputs, moments


@torch.no_grad()
def run_block(block: nn.Module, inputs: Sequence[Call]) -> tuple[list[Call], list[Any]]:
    """``block`` on every call: the next block's calls, and the raw outputs."""
    was = {m: m.training for m in block.modules()}
    block.eval()
    try:
        outs = [run_model(block, c) for c in inputs]
    finally:
        for m, mode in was.items():
            m.training = mode
    return [c.with_first(primary_tensor(o)) for c, o in zip(inputs, outs)], outs


class _Replay(nn.Module):
    """Stands in for one block: returns a copy of its stored output (``outputs[batch]``) for the batch being run.

    The first block's replay tells the batch by its input (the prefix's output, compared with
    the first block's recorded inputs ``keys``), so the batches may be run in any order.  The
    output is copied on every call, so a forward that changes it in place cannot change the
    stored one."""

    def __init__(self, keys: Sequence[torch.Tensor], outputs: Sequence[Any], state: dict[str, int],
                 first: bool) -> None:
        super().__init__()
        self._keys, self._outputs, self._state, self._first = keys, outputs, state, first

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._first:
            x = args[0] if args else next(iter(kwargs.values()))
            n = len(self._keys)
            for i in [(self._state["batch"] + 1 + j) % n for j in range(n)]:  # the next batch first
                key = self._keys[i]
                if key.shape == x.shape and bool(torch.equal(key, x)):
                    self._state["batch"] = i
                    break
            else:
                raise RuntimeError("a replayed block was called on an input that no calibration batch gave")
        return map_tensors(self._outputs[self._state["batch"]], torch.clone, keep_types=True)


@contextlib.contextmanager
def replayed(model: nn.Module, chain: Chain, inputs: Sequence[Call], outputs: Sequence[Any],
             block_outputs: Sequence[Sequence[Any]] | None = None) -> Iterator[None]:
    """Blocks of ``model`` replaced by replays, keyed by the first block's calls ``inputs[i]``.

    By default every block, each returning ``outputs[i]`` (the last block's output on batch
    ``i``: only the prefix and the suffix compute).  With ``block_outputs`` (``[block][batch]``,
    the first ``len(block_outputs)`` blocks), block ``b`` returns ``block_outputs[b][i]`` and the
    blocks after them run on the last one's; ``outputs`` is then unused.  Caches are off inside.
    """
    container = model.get_submodule(chain.container) if chain.container else model
    saved = list(container)
    per_block = [outputs] * len(saved) if block_outputs is None else list(block_outputs)
    state = {"batch": -1}
    keys = [c.args[0] for c in inputs]
    try:
        for i, outs in enumerate(per_block):
            container[i] = _Replay(keys, outs, state, first=(i == 0))
        with _no_cache(model):
            yield
    finally:
        for i, block in enumerate(saved):
            container[i] = block


def block_replay(model: nn.Module, chain: Chain, example: Any,
                 mask_key: str = "attention_mask") -> Callable[[nn.Module, str | None], ContextManager[None]]:
    """``replay(work, layer)``: a context in which ``work`` -- a copy of ``model`` that differs from it
    in ``layer`` only -- skips the blocks before ``layer``'s own on ``example`` (they replay the
    dense model's outputs on it, block by block, computed once here on first use).

    For allocators that score one changed layer at a time (:func:`autorank.allocators.output_gains`):
    a layer in block ``b`` costs blocks ``b ..`` instead of the whole model, with the same output
    as a full run.  A layer of the prefix runs everything; one of the suffix replays every block.
    Caches (``use_cache``) are off inside every such context, ``layer=None`` (the reference run)
    included, so that every run returns the same structure.
    """
    where = {n: i for i, b in enumerate(chain.blocks) for n in chain.inside[b]}
    where.update({n: len(chain.blocks) for n in chain.after})
    stored: dict[str, Any] = {}

    def outputs() -> tuple[list[Call], list[list[Any]]]:
        if not stored:
            with _no_cache(model):
                inputs, _ = capture_inputs(model, chain, [example], {}, False, mask_key)
                calls, outs = inputs, []
                for bname in chain.blocks:
                    calls, out = run_block(model.get_submodule(bname), calls)
                    outs.append(out)
            stored.update(inputs=inputs, outs=outs)
        return stored["inputs"], stored["outs"]

    def replay(work: nn.Module, layer: str | None) -> ContextManager[None]:
        b = 0 if layer is None else where.get(layer, 0)
        if b == 0:
            return _no_cache(work)
        inputs, outs = outputs()
        return replayed(work, chain, inputs, outs[-1], block_outputs=outs[:b])

    return replay


def _attach(moments: dict[str, Moments], outputs: Mapping[str, Moments]) -> dict[str, Moments]:
    """``moments`` with each layer's output moment set where ``outputs`` has one (a function: no loop
    variable outlives it to keep a block's moment alive)."""
    for name, mom in moments.items():
        if name in outputs:
            mom.output = outputs[name]
    return moments


def _sub(mapping: Mapping[str, Any], names: Sequence[str], prefix: str) -> dict[str, Any]:
    return {_relative(n, prefix): mapping[n] for n in names if n in mapping}


def _subgraph(graph: LayerGraph, names: Sequence[str]) -> LayerGraph:
    return LayerGraph(layers={n: graph.layers[n] for n in names if n in graph.layers}, skipped={},
                      total_params=graph.total_params, total_flops=graph.total_flops, graph=graph.graph,
                      module_types=graph.module_types)


# ---- pass 1: curves ----------------------------------------------------------------------------------

@torch.no_grad()
def stream_curves(
    model: nn.Module,
    graph: LayerGraph,
    chain: Chain,
    batches: Sequence[Any],
    config: Any,
    metric: str,
    progress: bool | None = None,
    outputs: Mapping[str, Moments] | None = None,
    mask_key: str = "attention_mask",
    keep: bool = False,
) -> tuple[dict[str, LayerCurves], dict[str, str], Streamed]:
    """Pass 1 (module docstring): every layer's curves, one block's moments at a time.

    ``keep``: keep every block's moments too (``Streamed.outer`` then holds all of them), for
    allocators that read them and for a build without the refit; a model whose moments fit
    in memory keeps them (:mod:`autorank.pipeline`), the stream then saves time, not memory.
    """
    from ._util import progress_bar

    batches = list(batches)
    outputs = outputs or {}
    curves: dict[str, LayerCurves] = {}
    skipped: dict[str, str] = {}
    reached: set[str] = set()

    def curves_of(moms: dict[str, Moments], names: Sequence[str]) -> None:
        _attach(moms, outputs)
        reached.update(moms)
        got, no_gain = build_curves(model, _subgraph(graph, names), config, metric, False, moms)
        curves.update(got)
        skipped.update(no_gain)

    with _no_cache(model):
        inputs, outer = capture_inputs(model, chain, batches, {n: graph.layers[n] for n in chain.before},
                                       progress, mask_key)
        curves_of(outer, chain.before)
        calls, outs = inputs, None
        for i, bname in enumerate(progress_bar(chain.blocks, "blocks (curves)", progress)):
            t = time.perf_counter()
            block = model.get_submodule(bname)
            names = chain.inside[bname]
            moms = collect_moments(block, {_relative(n, bname): graph.layers[n] for n in names}, calls,
                                   False, mask_key, quiet_missing=True)
            moms = {f"{bname}.{n}": m for n, m in moms.items()}
            curves_of(moms, names)
            if keep:
                outer.update(moms)
            del moms
            calls, outs = run_block(block, calls)
            log.info("block %d/%d %s: moments and curves of %d layers, %.2fs", i + 1, len(chain.blocks), bname,
                     len(names), time.perf_counter() - t)
        if chain.after:
            with replayed(model, chain, inputs, outs):
                after = collect_moments(model, {n: graph.layers[n] for n in chain.after}, batches, False, mask_key,
                                        quiet_missing=True)
            curves_of(after, chain.after)
            outer.update(after)
    missing = [n for n in graph.layers if n not in reached]
    if missing:
        log.warning("no calibration inputs reached %d layer(s): %s", len(missing), ", ".join(missing[:5]))
    order = {n: i for i, n in enumerate(graph.layers)}
    curves = dict(sorted(curves.items(), key=lambda kv: order[kv[0]]))
    return curves, skipped, Streamed(chain=chain, inputs=inputs, outer=outer, reached=reached, batches=batches,
                                     mask_key=mask_key)


# ---- pass 2: build ------------------------------------------------------------------------------------

def _refitted(model: nn.Module, plan: Plan, names: Sequence[str], reached: set[str]) -> list[str]:
    """The layers of ``names`` that the sequential refit fits (as :func:`sequential_refit` chooses them)."""
    out = []
    for n in names:
        lp = plan.layers.get(n)
        if lp is None or not lp.compressed or not get_family(lp.family).fits_data or n not in reached:
            continue
        handler = get_layer_handler(model.get_submodule(n))
        if handler is not None and handler.kind != "embedding":
            out.append(n)
    return out


def _outer_reference(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A copy of ``model`` that shares every parameter and buffer except those of the layers ``names``."""
    own = {id(t) for n in names for t in (*model.get_submodule(n).parameters(), *model.get_submodule(n).buffers())}
    memo = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in own}
    return copy.deepcopy(model, memo)


def _realize_some(model: nn.Module, plan: Plan, names: Sequence[str], refit: Sequence[str],
                  moments: Mapping[str, Moments] | None) -> None:
    """Realise ``names``: the ones to be refitted as bare structure, the others with their moments."""
    later = set(refit)
    rest = [n for n in names if n not in later]
    if later:
        realize(model, plan, inplace=True, init=False, layers=later)
    if rest:
        realize(model, plan, inplace=True, layers=rest, moments=moments)


def _check_done(model: nn.Module, plan: Plan, wanted: Sequence[str], done: Sequence[str],
                moments: Mapping[str, Moments] | None) -> None:
    left = [n for n in wanted if n not in set(done)]
    if left:  # never left as uninitialised structure: the plain (or data-aware) factors instead
        log.warning("the sequential refit did not reach %s; realised without it", ", ".join(left[:5]))
        realize(model, plan, inplace=True, layers=left, moments=moments)


@torch.no_grad()
def stream_build(
    model: nn.Module,
    plan: Plan,
    graph: LayerGraph,
    streamed: Streamed,
    refit: bool,
    outputs: Mapping[str, Moments] | None = None,
    damping: float = 1e-6,
    progress: bool | None = None,
    spill: bool = False,
) -> list[str]:
    """Pass 2 (module docstring): realise ``plan`` in ``model`` (in place), block by block; the refitted layers.

    ``spill``: once a block is built, the dense layers it replaced -- held only by the
    rollback of :func:`autorank.realize.restore_on_error` -- are moved to an unlinked
    memory-mapped file (:func:`autorank.realize.spill_to_disk`), so the dense and the
    compressed copy of the model are never in memory together."""
    from ._util import progress_bar

    chain, batches, key = streamed.chain, streamed.batches, streamed.mask_key
    outputs = outputs or {}
    kinds = {n: info.kind for n, info in graph.layers.items()}
    outer = _attach(streamed.outer, outputs)
    # the very tensors the curves and the allocator used (``Moments.output_matrix``), where the
    # moments were kept: their square roots (an f x f eigh each) are then cached, not recomputed
    g_of = {n: outer[n].output_matrix if n in outer else m.matrix for n, m in outputs.items()}
    done: list[str] = []

    def originals(names: Sequence[str]) -> dict[str, nn.Module]:
        return {n: model.get_submodule(n) for n in names if n in plan.layers and plan.layers[n].compressed}

    def release(before: Mapping[str, nn.Module]) -> None:
        if spill:
            moved = spill_to_disk([m for n, m in before.items() if model.get_submodule(n) is not m], live=model)
            log.debug("moved %.1f MiB of replaced dense weights to a mapped file", moved / 2 ** 20)

    def outer_step(names: Sequence[str], run_ref: Any, run_new: Any) -> None:
        before = originals(names)
        wanted = _refitted(model, plan, names, streamed.reached) if refit else []
        if wanted:
            reference = _outer_reference(model, wanted)
        _realize_some(model, plan, [n for n in names if n in plan.layers], wanted, outer)
        if wanted:
            with run_ref(reference), run_new(model):
                got = sequential_refit(reference, model, _only(plan, wanted), batches, graph=graph.graph,
                                       kinds=kinds, damping=damping, progress=False, mask_key=key,
                                       output_moments=g_of)
            del reference
            done.extend(got)
            _check_done(model, plan, wanted, got, outer)
        release(before)

    with _no_cache(model):
        nothing = lambda m: contextlib.nullcontext()  # noqa: E731
        outer_step(chain.before, nothing, nothing)
        calls = streamed.inputs
        hat = calls  # the compressed model's inputs of the current block (tracked for the refit only)
        if refit and any(plan.layers[n].compressed for n in chain.before if n in plan.layers):
            hat, _ = capture_inputs(model, chain, batches, {}, False, key)
        first_hat = hat
        outs = outs_hat = None
        for i, bname in enumerate(progress_bar(chain.blocks, "blocks (build)", progress)):
            t = time.perf_counter()
            block = model.get_submodule(bname)
            names = [n for n in chain.inside[bname] if n in plan.layers]
            wanted = _refitted(model, plan, names, streamed.reached) if refit else []
            rest = [n for n in names if n not in set(wanted) and plan.layers[n].compressed]
            moms = {n: outer[n] for n in rest if n in outer} or None
            if rest and moms is None:  # the plan's data-aware factors need the original inputs' moments
                moms = collect_moments(block, {_relative(n, bname): graph.layers[n] for n in rest}, calls,
                                       False, key, quiet_missing=True)
                moms = _attach({f"{bname}.{n}": m for n, m in moms.items()}, outputs)
            before = originals(names)
            reference = copy.deepcopy(block) if wanted else block
            nxt, outs = run_block(reference, calls)
            _realize_some(model, plan, names, wanted, moms)
            if wanted:
                sub = _only(plan, wanted, bname)
                got = sequential_refit(reference, block, sub, calls, graph=_relabel(graph.graph, bname),
                                       kinds=_sub(kinds, wanted, bname), damping=damping, progress=False,
                                       mask_key=key, output_moments=_sub(g_of, wanted, bname), model_batches=hat)
                got = [f"{bname}.{n}" for n in got]
                done.extend(got)
                _check_done(model, plan, wanted, got, moms)
            del reference, moms
            if refit:
                hat, outs_hat = run_block(block, hat)
            release(before)
            calls = nxt
            log.info("block %d/%d %s: built%s, %.2fs", i + 1, len(chain.blocks), bname,
                     " and refitted" if wanted else "", time.perf_counter() - t)
        if chain.after:
            # both models run the current (compressed) prefix: their first block's inputs are ``first_hat``
            outer_step(chain.after, lambda m: replayed(m, chain, first_hat, outs),
                       lambda m: replayed(m, chain, first_hat, outs_hat))
    return done


def _only(plan: Plan, names: Sequence[str], prefix: str = "") -> Plan:
    """``plan`` restricted to ``names``, renamed relative to ``prefix``."""
    layers = {_relative(n, prefix): plan.layers[n] for n in names}
    return Plan(metric=plan.metric, budget=plan.budget, objective=plan.objective, layers=layers)


def _relabel(graph: Any, prefix: str) -> Any:
    """The data-flow graph's nodes inside ``prefix``, renamed relative to it."""
    if graph is None:
        return None
    nodes = [n for n in graph.nodes if isinstance(n, str) and _within(n, prefix) and n != prefix]
    sub = graph.subgraph(nodes)
    import networkx as nx

    return nx.relabel_nodes(sub, {n: _relative(n, prefix) for n in nodes}, copy=True)
