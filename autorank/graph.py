"""Layer-graph analyser: one hooked forward pass over the example inputs.

It records, for every leaf module, its input/output shapes and how many output
positions it produced (summed over calls), and builds a ``networkx.DiGraph`` of
the data flow between modules by walking the autograd graph from each module's
inputs back to the modules that produced them.  No ``torch.fx`` tracing and no
wrapper class are needed, so any model that runs forward on the example inputs
works, including Hugging Face models called with a dict of keyword inputs.

The whole model's FLOPs are measured by :func:`count_flops` -- the same function
that measures the realised model, so before and after are counted alike:
:class:`torch.utils.flop_counter.FlopCounterMode` in eval mode under
``torch.no_grad`` (multiply-accumulates, i.e. the counter's figure divided by two).
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from .layers import get_layer_handler, kernel_numel, unsupported_reason
from .nested import map_tensors, run_model, tensors

__all__ = ["LayerInfo", "LayerGraph", "analyze", "run_model", "replace_module", "count_params", "count_flops"]

log = logging.getLogger(__name__)

INPUT, OUTPUT = "<input>", "<output>"

# Parents whose forward reads their children's ``.weight`` directly (the fused fast path of
# PyTorch's transformer layers), so those children cannot be replaced by factorised modules.
PARENTS_READING_CHILD_WEIGHTS: tuple[type, ...] = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


@dataclass
class LayerInfo:
    """A compressible layer, as seen in the forward pass."""

    name: str
    kind: str
    out_features: int  # f
    in_channels: int  # c
    kernel: tuple[int, ...]  # () for Linear
    positions: int  # output positions over all calls (batch * spatial / tokens)
    calls: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    has_bias: bool

    @property
    def taps(self) -> int:
        return kernel_numel(self.kernel)

    @property
    def weight_params(self) -> int:
        return self.out_features * self.in_channels * self.taps

    @property
    def dense_params(self) -> int:
        return self.weight_params + (self.out_features if self.has_bias else 0)

    @property
    def dense_flops(self) -> int:
        """Multiply-accumulates of the dense layer over the example inputs (0 for an embedding lookup)."""
        if self.kind == "embedding":
            return 0
        return self.positions * self.weight_params


@dataclass
class LayerGraph:
    """Result of :func:`analyze`."""

    layers: dict[str, LayerInfo]
    skipped: dict[str, str]
    total_params: int
    total_flops: int
    graph: Any  # networkx.DiGraph
    module_types: dict[str, str] = field(default_factory=dict)

    @property
    def fixed_params(self) -> int:
        """Parameters outside the compressible layers (they count towards the budget)."""
        return self.total_params - sum(l.dense_params for l in self.layers.values())

    @property
    def fixed_flops(self) -> int:
        return max(0, self.total_flops - sum(l.dense_flops for l in self.layers.values()))


def module_aliases(model: nn.Module) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """``({id(module): every name it has}, {id(parameter): every qualified name it has})``: shared
    modules and tied parameters show up as ids with more than one name."""
    aliases: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(n)
    owners: dict[int, list[str]] = {}
    for n, m in model.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{n}.{pn}" if n else pn)
    return aliases, owners


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the qualified ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_inputs(example_inputs: Any) -> None:
    if example_inputs is None:
        raise ValueError("example_inputs is required: a tensor, a tuple of tensors or a dict of keyword inputs")
    if not isinstance(example_inputs, (torch.Tensor, Mapping, tuple, list)):
        raise TypeError(
            "example_inputs must be a tensor, a tuple/list of positional inputs or a dict of "
            f"keyword inputs, got {type(example_inputs).__name__}"
        )


def _last_first(obj: Any) -> list[torch.Tensor]:
    """The tensors of ``obj``, last first: the order analyze has always read them in (``in_shape``, edges)."""
    return tensors(obj)[::-1]




def count_params(model: nn.Module) -> int:
    """Unique parameters of ``model`` (tied tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass over ``example_inputs``, measured by FlopCounterMode.

    The pass runs in eval mode with autograd on and floating-point inputs that require
    grad, so that fused inference-only kernels (``nn.TransformerEncoderLayer``'s fast
    path, for one), which the counter cannot see into, are not taken: a dense model and
    its compressed copy are then counted alike.  Only the forward pass is run.
    """
    from torch.utils.flop_counter import FlopCounterMode

    inputs = map_tensors(example_inputs,
                         lambda t: t.detach().requires_grad_(True) if t.is_floating_point() else t)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.enable_grad(), FlopCounterMode(display=False) as counter:
            run_model(model, inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return counter.get_total_flops() // 2


def _matches(name: str, patterns: Sequence[str]) -> str | None:
    for p in patterns:
        if fnmatch.fnmatchcase(name, p) or name == p:
            return p
    return None


def analyze(
    model: nn.Module,
    example_inputs: Any,
    exclude: Iterable[str] = (),
    embeddings: bool = False,
) -> LayerGraph:
    """Find the compressible layers of ``model`` and the data flow between modules.

    Args:
        model: any ``nn.Module``; it is run once in eval mode and left exactly as it was
            (hooks removed, training mode and ``requires_grad`` flags restored, even on error).
        example_inputs: a tensor, a tuple/list of positional inputs, or a dict of keyword inputs.
        exclude: ``fnmatch`` patterns of qualified module names to leave dense.
        embeddings: also treat ``nn.Embedding`` tables as compressible matrices
            (``dim x num_embeddings``, see :class:`autorank.families.alds.LowRankEmbedding`).

    Raises:
        TypeError / ValueError: bad arguments.
        RuntimeError: the forward pass on ``example_inputs`` failed (the cause is chained).
    """
    import networkx as nx

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_inputs(example_inputs)
    if isinstance(exclude, str):
        exclude = (exclude,)
    exclude = tuple(exclude)
    for p in exclude:
        if not isinstance(p, str):
            raise TypeError(f"exclude must contain name patterns (str), got {p!r}")

    named = dict(model.named_modules())
    leaves = {n: m for n, m in named.items() if n and not any(True for _ in m.children())}
    hooked = dict(leaves)
    for n, m in named.items():
        if n and get_layer_handler(m) is not None:
            hooked[n] = m

    records: dict[str, dict[str, Any]] = {
        n: {"calls": 0, "positions": 0, "inputs": [], "input_leaves": []} for n in hooked
    }
    producer: dict[Any, str] = {}

    def pre_hook(name):
        def hook(mod, args, kwargs):
            rec = records[name]
            ts = _last_first((args, kwargs))
            rec["inputs"].extend(t.grad_fn for t in ts if t.grad_fn is not None)
            rec["input_leaves"].extend(id(t) for t in ts if t.requires_grad and t.grad_fn is None)
            if ts and "in_shape" not in rec:
                rec["in_shape"] = tuple(ts[0].shape)

        return hook

    def post_hook(name):
        def hook(mod, args, kwargs, output):
            rec = records[name]
            rec["calls"] += 1
            outs = _last_first(output)
            if outs:
                rec.setdefault("out_shape", tuple(outs[0].shape))
                handler = get_layer_handler(mod)
                if handler is not None:
                    f = handler.geometry(mod)[0]
                    rec["positions"] += outs[0].numel() // max(f, 1)
            for t in outs:
                if t.grad_fn is not None and t.grad_fn not in producer:
                    producer[t.grad_fn] = name

        return hook

    params = list(model.parameters())
    grad_flags = [p.requires_grad for p in params]
    was_training = {n: m.training for n, m in named.items()}
    handles = []
    inputs_req = map_tensors(
        example_inputs,
        lambda t: t.detach().requires_grad_(True) if t.is_floating_point() else t,
    )
    input_leaves = tensors(inputs_req)  # only their ids count
    try:
        for p in params:
            p.requires_grad_(True)
        model.eval()
        for n, m in hooked.items():
            handles.append(m.register_forward_pre_hook(pre_hook(n), with_kwargs=True))
            handles.append(m.register_forward_hook(post_hook(n), with_kwargs=True))
        try:
            with torch.enable_grad():
                output = run_model(model, inputs_req)
        except Exception as exc:  # the user's forward pass failed: say so plainly
            raise RuntimeError(
                f"the forward pass of {type(model).__name__} on example_inputs failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, grad_flags):
            p.requires_grad_(flag)
        for n, m in named.items():
            m.training = was_training[n]

    total_flops = count_flops(model, example_inputs)

    # ---- data-flow graph: nearest producing modules of every autograd node --------------
    input_ids = {id(t) for t in input_leaves}
    memo: dict[Any, frozenset[str]] = {}

    def sources(root) -> frozenset[str]:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in memo:
                continue
            if node in producer:
                memo[node] = frozenset((producer[node],))
                continue
            var = getattr(node, "variable", None)
            if var is not None:
                memo[node] = frozenset((INPUT,)) if id(var) in input_ids else frozenset()
                continue
            children = [c for c, _ in getattr(node, "next_functions", ()) if c is not None]
            if expanded:
                acc: set[str] = set()
                for c in children:
                    acc |= memo.get(c, frozenset())
                memo[node] = frozenset(acc)
            else:
                stack.append((node, True))
                stack.extend((c, False) for c in children if c not in memo)
        return memo[root]

    g = nx.DiGraph()
    g.add_node(INPUT, type="input")
    g.add_node(OUTPUT, type="output")
    for name, rec in records.items():
        if rec["calls"] == 0:
            continue
        mod = hooked[name]
        g.add_node(name, type=type(mod).__name__, in_shape=rec.get("in_shape"),
                   out_shape=rec.get("out_shape"), calls=rec["calls"])
        srcs: set[str] = set()
        for node in rec["inputs"]:
            srcs |= sources(node)
        if any(i in input_ids for i in rec["input_leaves"]):
            srcs.add(INPUT)
        for s in srcs:
            if s != name:
                g.add_edge(s, name)
    for t in _last_first(output):
        if t.grad_fn is not None:
            for s in sources(t.grad_fn):
                g.add_edge(s, OUTPUT)
        elif id(t) in input_ids:
            g.add_edge(INPUT, OUTPUT)

    # ---- compressible layers -----------------------------------------------------------
    aliases, owners = module_aliases(model)

    layers: dict[str, LayerInfo] = {}
    skipped: dict[str, str] = {}
    if get_layer_handler(model) is not None:
        skipped["<model>"] = (f"the model itself is a single {type(model).__name__}; autorank replaces submodules, "
                       "so wrap it, e.g. nn.Sequential(model)")
    for name, mod in named.items():
        handler = get_layer_handler(mod)
        if handler is None or not name:
            if name and unsupported_reason(mod) is not None:
                skipped[name] = unsupported_reason(mod)
            continue
        reason = handler.skip_reason(mod)
        pat = _matches(name, exclude)
        weight = getattr(mod, "weight", None)
        sharers = [o for o in owners.get(id(weight), []) if o != f"{name}.weight"] if weight is not None else []
        other_names = [a for a in aliases.get(id(mod), []) if a != name]
        parent = named.get(name.rpartition(".")[0]) if "." in name else model
        if pat is not None:
            reason = f"excluded by pattern {pat!r}"
        elif reason is None and handler.kind == "embedding" and not embeddings:
            reason = "embedding table (pass embeddings=True to factorise it)"
        elif reason is None and isinstance(parent, nn.MultiheadAttention):
            reason = ("nn.MultiheadAttention reads out_proj.weight in its functional forward; optimize compresses "
                      "it, and q/k/v, by unfusing the attention (autorank.families.attention)")
        elif reason is None and isinstance(parent, PARENTS_READING_CHILD_WEIGHTS):
            reason = f"its parent {type(parent).__name__} reads .weight directly (fused fast path)"
        elif reason is None and other_names:
            reason = f"the same module is also registered as {', '.join(other_names)}"
        elif reason is None and sharers:
            reason = f"weight is tied with {', '.join(sharers)}"
        elif reason is None and records[name]["calls"] == 0:
            reason = "not called in the forward pass on example_inputs"
        elif reason is None and not weight.is_floating_point():
            reason = f"weight dtype {weight.dtype} is not floating point"
        if reason is not None:
            skipped[name] = reason
            continue
        f, c, kernel = handler.geometry(mod)
        rec = records[name]
        layers[name] = LayerInfo(
            name=name, kind=handler.kind, out_features=f, in_channels=c, kernel=kernel,
            positions=rec["positions"], calls=rec["calls"], in_shape=rec.get("in_shape", ()),
            out_shape=rec.get("out_shape", ()), has_bias=getattr(mod, "bias", None) is not None,
        )
        g.nodes[name]["compressible"] = True

    log.info("analysed %s: %d compressible layers, %d skipped, %d params, %d MACs",
             type(model).__name__, len(layers), len(skipped), count_params(model), total_flops)
    return LayerGraph(
        layers=layers, skipped=skipped, total_params=count_params(model), total_flops=total_flops,
        graph=g, module_types={n: type(m).__name__ for n, m in named.items() if n},
    )
