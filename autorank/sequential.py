r"""Sequential refit: fit every factorised layer to the original layer's outputs, given the
compressed model's *own* inputs, in execution order.

The data-aware curves and factors (:mod:`autorank.calibration`) fit each layer
``W`` to the original model's inputs ``X``.  Once the earlier layers are
compressed, a layer sees different inputs ``X_hat``, and its error compounds the
errors upstream.  The sequential refit corrects for that, layer by layer in the
order the forward pass reaches them (the idea of GPTQ's and SVD-LLM's sequential
updates, applied to the plan's factorisations).

**One layer.**  With ``y = W x + b`` the original layer on the original input and
``y_hat = W_hat x_hat + b_hat`` the factorised one on the compressed model's input,
the refit minimises, over the calibration rows,

    E || W x + b - W_hat x_hat - b_hat ||^2      (W_hat of the plan's rank / groups).

With the means ``mu = E x``, ``mu_hat = E x_hat`` and the (cross-)covariances

    C = E[x_hat x_hat^T] - mu_hat mu_hat^T,     X = E[x x_hat^T] - mu mu_hat^T,

the free bias is ``b_hat = b + W mu - W_hat mu_hat``, and what remains is
``E || W (x - mu) - W_hat (x_hat - mu_hat) ||^2``.  Its unconstrained minimiser is
the least-squares (ridge-damped) map

    W_eff = W X (C + delta I)^{-1},

and since the residual of a least-squares fit is orthogonal to every ``Z x_hat``,

    E || W (x - mu) - W_hat (x_hat - mu_hat) ||^2 = const + tr((W_eff - W_hat) C (W_eff - W_hat)^T).

So the best ``W_hat`` of the plan's structure is the family's data-aware
realisation of ``W_eff`` under the moment ``C`` -- the whitened truncation of
:mod:`autorank.calibration`, exact for ``k = 1``; for ALDS with ``k > 1`` each input
group is whitened by its own block of ``C``, as in the curves, which is a good fit
but not the joint minimiser -- followed by the bias above.  A layer without a bias keeps ``b_hat = b = 0``; its fit uses the
uncentred moments (``mu = mu_hat = 0``).  When nothing upstream is compressed,
``x_hat = x`` and ``W_eff = W`` (up to the damping): the refit is then the plain
whitened fit with a re-centred bias.

**Cost.**  Layers whose inputs do not depend on each other (e.g. the query, key and
value projections of an attention block) are refitted together, in one *stage*;
the stages follow the data-flow graph of :func:`autorank.analyze`.  Every stage
streams the calibration batches through the original and the compressed model, up
to the stage's layers only (the forward passes stop there when every layer of the
stage is called once per forward).  Memory is ``O(n^2)`` per layer of the stage,
plus a second copy of the original model.

Only layers whose family fits the data (``Family.fits_data``: ALDS and
sparse + low-rank) are refitted; the others keep their weight-only factors.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from ._util import parallel_map, progress_bar
from .calibration import layer_rows
from .families import get_family, output_kwargs
from .layers import LINEAR_KINDS, get_layer_handler, set_weight_matrix
from .linalg import rows_matmul
from .modules import Factorized
from .nested import entry, run_model
from .plan import Plan
from .realize import replace_module

__all__ = ["refit_layer", "sequential_refit", "refit_stages", "CrossMoments", "paired_sums"]

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once every layer of the stage has run."""


class CrossMoments:
    """Streamed moments of paired rows ``(x, x_hat)``: ``E[x_hat x_hat^T]``, ``E[x x_hat^T]``, the means."""

    def __init__(self, n: int) -> None:
        z = dict(dtype=torch.float64)
        self.hh = torch.zeros(n, n, **z)
        self.xh = torch.zeros(n, n, **z)
        self.x = torch.zeros(n, **z)
        self.h = torch.zeros(n, **z)
        self.count = 0

    def update(self, x: torch.Tensor, h: torch.Tensor) -> None:
        self.add(paired_sums(x, h))

    def add(self, sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]) -> None:
        """Add the :func:`paired_sums` of a batch of rows (shared by the layers that read the same rows)."""
        hh, xh, x, h, count = sums
        self.hh += hh
        self.xh += xh
        self.x += x
        self.h += h
        self.count += count

    def centred(self, bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(C, X, mu, mu_hat)``: covariances about the means when ``bias``, else raw moments and zero means."""
        n = max(self.count, 1)
        mu, mu_hat = self.x / n, self.h / n
        c, x = self.hh / n, self.xh / n
        if not bias:
            return c, x, torch.zeros_like(mu), torch.zeros_like(mu_hat)
        return c - torch.outer(mu_hat, mu_hat), x - torch.outer(mu, mu_hat), mu, mu_hat


def paired_sums(x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(H^T H, X^T H, sum x, sum h, N)`` of paired rows ``X``, ``H`` (``N x n``), float64."""
    if x.shape != h.shape:
        raise RuntimeError(f"the original and the compressed layer see inputs of different shapes: "
                           f"{tuple(x.shape)} vs {tuple(h.shape)}")
    x, h = x.detach().to(torch.float64), h.detach().to(torch.float64)
    return h.T @ h, x.T @ h, x.sum(0), h.sum(0), x.shape[0]


def effective_weight(weight: torch.Tensor, cross: torch.Tensor, cov: torch.Tensor,
                     damping: float = 1e-6, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``W_eff = W X (C + delta * mean(diag C) * I)^{-1}``, the least-squares map from ``x_hat`` to ``W x``.

    Computed as ``W K`` with ``K = X (C + dI)^{-1}`` (``n x n``, from ``(C + dI) K^T = X^T``, ``C``
    symmetric), over float64 row chunks of ``W`` (:func:`autorank.linalg.rows_matmul`), and
    stored as ``dtype``: an LM head is never copied whole to float64."""
    n = cov.shape[0]
    scale = float(cov.diagonal().mean()) or 1.0
    reg = cov + damping * scale * torch.eye(n, dtype=torch.float64)
    k = torch.linalg.solve(reg, cross.T).T
    return rows_matmul(weight, k, dtype)


def _output_bias(module: nn.Module) -> torch.Tensor | None:
    fn = getattr(module, "output_bias", None)
    return fn() if callable(fn) else None


@torch.no_grad()
def refit_layer(original: nn.Module, built: nn.Module, family: str, hyper: Mapping[str, Any],
                moments: CrossMoments, damping: float = 1e-6, output: torch.Tensor | None = None) -> nn.Module:
    """The layer of ``family`` / ``hyper`` fitted to ``original``'s outputs on the paired inputs of ``moments``.

    ``built`` is the current factorised module; it tells whether the bias can move
    (``output_bias()``).  ``output``: the layer's output moment ``G``, for families with
    ``fits_output`` (the projection of ``W_eff`` is then the two-sided one; ``W_eff`` and
    the bias do not depend on ``G``).  Returns a new module; ``original`` is not modified.
    """
    handler = get_layer_handler(original)
    w = handler.weight_matrix(original).detach()
    bias = getattr(original, "bias", None)
    movable = bias is not None and _output_bias(built) is not None
    cov, cross, mu, mu_hat = moments.centred(movable)
    target = copy.deepcopy(original)
    set_weight_matrix(target, effective_weight(w, cross, cov, damping, dtype=w.dtype))
    fam = get_family(family)
    new = fam.realize(target, dict(hyper), cov, **output_kwargs(fam, output))
    del target
    if movable:
        dense = new.to_dense()
        w_hat = get_layer_handler(dense).weight_matrix(dense).detach()
        b_hat = (bias.detach().to(torch.float64) + rows_matmul(w, mu.unsqueeze(1)).squeeze(1)
                 - rows_matmul(w_hat, mu_hat.unsqueeze(1)).squeeze(1))
        out_bias = _output_bias(new)
        out_bias.copy_(b_hat.to(out_bias.dtype))
    return new


def refit_stages(graph: Any, order: Sequence[str]) -> list[list[str]]:
    """Split ``order`` (layers in execution order) into runs in which no layer feeds another.

    ``graph`` is the data-flow ``networkx.DiGraph`` of :func:`autorank.analyze` (or None:
    one layer per stage).
    """
    import networkx as nx

    stages: list[list[str]] = []
    current: list[str] = []
    anc_cache: dict[str, set[str]] = {}
    for name in order:
        if graph is not None and name in graph:
            anc = anc_cache.setdefault(name, nx.ancestors(graph, name))
            independent = not any(prev in anc for prev in current)
        else:
            independent = not current
        if current and not independent:
            stages.append(current)
            current = []
        current.append(name)
    if current:
        stages.append(current)
    return stages


def _call_order(model: nn.Module, names: Iterable[str], batch: Any) -> tuple[list[str], dict[str, int]]:
    """The order in which the forward pass first calls the layers ``names``, and their call counts."""
    order: list[str] = []
    calls: dict[str, int] = {}
    handles = []
    for name in names:
        def hook(mod, args, name=name):
            if name not in calls:
                order.append(name)
            calls[name] = calls.get(name, 0) + 1
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    return order, calls


def _stage_rows(model: nn.Module, stage: Sequence[str], kinds: Mapping[str, str], batch: Any,
                mask_key: str, stop: bool, geometry: Mapping[str, nn.Module]) -> dict[str, list[torch.Tensor]]:
    """Run ``model`` on ``batch`` and return the input rows of the stage's layers (every call).

    ``geometry[name]`` is the original dense layer, whose kernel, stride and padding
    give the im2col rows of a convolution (the factorised module has none of its own).
    """
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in stage}
    mask = entry(batch, mask_key)
    handles = []
    # Linear-like layers called on the same tensor (q/k/v, gate/up) get the same rows object, so
    # that sequential_refit computes their moments once; the tensor is kept, so its id stays unique
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rows_of(name: str, x: torch.Tensor) -> torch.Tensor:
        if kinds[name] not in LINEAR_KINDS:
            return layer_rows(geometry[name], x, kinds[name], mask)
        if id(x) not in seen:
            seen[id(x)] = (x, layer_rows(geometry[name], x, kinds[name], mask))
        return seen[id(x)][1]

    def make(name: str):
        def hook(mod, args):
            rows[name].append(rows_of(name, args[0]))
            if stop and all(rows[n] for n in stage):
                raise _Stop
        return hook

    for name in stage:
        handles.append(model.get_submodule(name).register_forward_pre_hook(make(name)))
    try:
        run_model(model, batch)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return rows


@torch.no_grad()
def sequential_refit(
    reference: nn.Module,
    model: nn.Module,
    plan: Plan,
    batches: Iterable[Any],
    graph: Any = None,
    kinds: Mapping[str, str] | None = None,
    damping: float = 1e-6,
    progress: bool | None = None,
    mask_key: str = "attention_mask",
    output_moments: Mapping[str, torch.Tensor] | None = None,
    model_batches: Sequence[Any] | None = None,
) -> list[str]:
    """Refit the factorised layers of ``model`` (in place) stage by stage; returns the refitted names.

    Args:
        reference: the original dense model (not modified).
        model: the realised model of ``plan`` (its factorised layers are replaced).
        plan: the plan ``model`` realises.
        batches: the calibration batches (a re-iterable sequence).
        graph: the data-flow graph of :func:`autorank.analyze`, to refit independent layers together.
        kinds: ``{layer: kind}`` (``"linear"``, ``"conv2d"``, ...); read from the handlers if omitted.
        damping: relative ridge ``delta`` of ``(C + delta * mean(diag C) I)^{-1}``.
        output_moments: ``{layer: G}``, the output moments of output weighting, or None.
        model_batches: what ``model`` is run on, batch for batch, when it differs from what
            ``reference`` is run on (``batches``): one block of a model, streamed by
            :mod:`autorank.stream`, sees the original block's inputs in ``reference`` and the
            compressed model's in ``model``.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("sequential refit needs at least one calibration batch")
    model_batches = batches if model_batches is None else list(model_batches)
    if len(model_batches) != len(batches):
        raise ValueError(f"model_batches has {len(model_batches)} batches, batches {len(batches)}")
    kinds = dict(kinds or {})
    wanted = []
    for n, lp in plan.layers.items():
        if not (lp.compressed and get_family(lp.family).fits_data):
            continue
        handler = get_layer_handler(reference.get_submodule(n))
        if handler is not None and handler.kind != "embedding":  # token-id inputs: nothing upstream to correct
            kinds.setdefault(n, handler.kind)
            wanted.append(n)
    if not wanted:
        return []
    was = {m: m.training for m in (*reference.modules(), *model.modules())}
    reference.eval()
    model.eval()
    done: list[str] = []
    try:
        order, calls = _call_order(reference, wanted, batches[0])
        stages = refit_stages(graph, order)
        log.info("sequential refit: %d layers in %d stages", len(order), len(stages))
        for stage in progress_bar(stages, "refit", progress):
            stop = all(calls.get(n) == 1 for n in stage)
            acc: dict[str, CrossMoments] = {}
            dense = {n: reference.get_submodule(n) for n in stage}
            for batch, own in zip(batches, model_batches):
                ref_rows = _stage_rows(reference, stage, kinds, batch, mask_key, stop, dense)
                new_rows = _stage_rows(model, stage, kinds, own, mask_key, stop, dense)
                sums: dict[tuple[int, int], tuple] = {}  # layers reading the same rows share the products
                for n in stage:
                    for x, h in zip(ref_rows[n], new_rows[n]):
                        key = (id(x), id(h))
                        if key not in sums:
                            sums[key] = paired_sums(x, h)
                        acc.setdefault(n, CrossMoments(x.shape[1])).add(sums[key])
            todo = [n for n in stage if n in acc]

            def fit(n: str) -> nn.Module:
                lp = plan.layers[n]
                return refit_layer(reference.get_submodule(n), model.get_submodule(n), lp.family, lp.hyper,
                                   acc[n], damping, output=(output_moments or {}).get(n))

            # the layers of a stage are independent: their solves and eigendecompositions run side by side
            fitted = parallel_map(fit, todo, weight=lambda n: acc[n].hh.shape[0])
            for n, new in zip(todo, fitted):
                built = model.get_submodule(n)
                was[new] = was.get(built, False)
                if not isinstance(new, Factorized):  # pragma: no cover - realize() checks the same
                    raise TypeError(f"family {plan.layers[n].family!r} built a {type(new).__name__} for {n!r}")
                replace_module(model, n, new)
                done.append(n)
    finally:
        for m, mode in was.items():
            m.training = mode
    return done
