"""Realisation: turn a plan into real modules, and the model-surgery safety nets around it.

Besides :func:`realize` and :func:`densify`, this module holds what every in-place change
of a model needs:

* :func:`restore_on_error`: a context in which any module swap (``realize``, the refit,
  ``load``) is undone if the block raises, so an ``inplace=True`` model is never left
  half-converted;
* :func:`copy_model`: ``copy.deepcopy`` with a message that says what failed and what to
  do, and that copies ``torch.nn.utils.prune`` reparametrisations (whose ``weight`` is a
  non-leaf tensor deepcopy refuses);
* :func:`find_outside_reads`: which layers a parent's forward reads directly
  (``self.fc.weight.sum()``), so they can be left dense;
* :func:`spill_to_disk`: the weights of modules that were swapped out and are held only so
  that a rollback can put them back, moved into an unlinked memory-mapped file, so that a
  large model compressed in place block by block does not hold its dense copy in memory;
* :func:`meta_copy` and :func:`materialize`: module structure without the weights, and
  uninitialised storage for it (no random init, no use of the global RNG).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn as nn

from ._util import parallel_map
from .families import get_family, output_kwargs
from .families.attention import unfuse_named
from .graph import replace_module
from .modules import Factorized
from .plan import Plan

__all__ = ["realize", "replace_module", "densify", "restore_on_error", "module_snapshot", "restore_snapshot",
           "copy_model", "meta_copy", "materialize",
           "find_outside_reads", "preserve_rng", "check_finite_parameters", "spill_to_disk"]

log = logging.getLogger(__name__)


def realize(
    model: nn.Module,
    plan: Plan,
    inplace: bool = False,
    init: bool = True,
    layers: Iterable[str] | None = None,
    moments: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Replace every compressed layer of ``plan`` in ``model`` by its factorised modules.

    Args:
        model: the dense model the plan was made for.
        plan: the plan.
        inplace: modify ``model`` itself instead of a deep copy.
        init: initialise the factors from the dense weights (truncated SVD); with
            ``False`` only the module structure is built (``autorank.load`` then
            fills in the saved weights).
        layers: restrict to these layer names.
        moments: ``{layer: Moments}`` of calibration data; families that can use them
            fit the factors to the data (e.g. the whitened SVD of ALDS), and to the output
            moments too where ``Moments.output`` is set and the family ``fits_output``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an autorank.Plan, got {type(plan).__name__}")
    out = model if inplace else copy_model(model)
    # the attention modules whose projections the plan names: as four Linear children first
    unfuse_named(out, plan.attention)
    wanted = None if layers is None else set(layers)
    todo = []
    for name, lp in plan.layers.items():
        if not lp.compressed or (wanted is not None and name not in wanted):
            continue
        try:
            old = out.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the plan names layer {name!r}, which this model does not have") from None
        family = get_family(lp.family)
        mom = (moments or {}).get(name)
        if not init:  # the structure only: built on the meta device, then given uninitialised storage
            todo.append((name, old, lp.hyper,
                         lambda m, h, f=family: materialize(f.skeleton(meta_copy(m), h), _device_of(m))))
        elif mom is None:
            todo.append((name, old, lp.hyper, family.realize))
        else:
            todo.append((name, old, lp.hyper,
                         lambda m, h, f=family, mm=mom.matrix, kw=output_kwargs(family, mom.output_matrix):
                         f.realize(m, h, mm, **kw)))
    # the factorisations are independent: compute them in parallel, then swap the modules in
    # factor modules are built with torch's default (random) init before their factors are written: the
    # global RNG is put back afterwards, so compressing a model never changes the caller's random stream
    with preserve_rng(out), restore_on_error(out):
        built = parallel_map(lambda t: t[3](t[1], t[2]), todo,
                             weight=lambda t: sum(p.numel() for p in t[1].parameters()))
        for (name, old, hyper, _), new in zip(todo, built):
            if not isinstance(new, Factorized):
                raise TypeError(
                    f"family {plan.layers[name].family!r} built a {type(new).__name__} for {name!r}; a family must "
                    "return an autorank.modules.Factorized module with to_dense()"
                )
            new.train(old.training)
            replace_module(out, name, new)
    return out


def densify(model: nn.Module) -> nn.Module:
    """Replace every factorised module in ``model`` (in place) by its exact dense product.

    The product of trained factors is a dense matrix of rank ``<= k*j``; its
    re-factorisation by truncated SVD is optimal for that product, and lets the
    next allocation re-choose ``k`` and ``j`` against the original model's budget.
    Returns ``model``.
    """
    names = [n for n, m in model.named_modules() if n and isinstance(m, Factorized)]
    for name in names:
        old = model.get_submodule(name)
        new = old.to_dense()
        new.train(old.training)
        replace_module(model, name, new)
    return model


# ---- safety nets ----------------------------------------------------------------------------------

@contextlib.contextmanager
def restore_on_error(model: nn.Module) -> Iterator[nn.Module]:
    """Undo every module swap made inside ``model`` in the block if the block raises.

    The child-module table of every module of ``model`` is recorded on entry and put back
    on an exception (then re-raised).  Swaps are all that :func:`realize`, the sequential
    refit and :func:`autorank.load` do to the modules they replace, and the replaced
    modules themselves are never modified, so the model is exactly as it was.
    """
    snapshot = module_snapshot(model)
    try:
        yield model
    except BaseException:
        restore_snapshot(snapshot)
        raise


def module_snapshot(model: nn.Module) -> list[tuple[nn.Module, list[tuple[str, Any]], bool]]:
    """The child-module table and training flag of every module of ``model`` (for :func:`restore_snapshot`)."""
    return [(m, list(m._modules.items()), m.training) for m in model.modules()]


def restore_snapshot(snapshot: list[tuple[nn.Module, list[tuple[str, Any]], bool]]) -> None:
    """Put every module's children and training flag back as :func:`module_snapshot` recorded them."""
    for m, children, training in snapshot:
        m._modules.clear()
        m._modules.update(children)
        m.training = training


SPILL_MIN_BYTES = 1 << 16  # smaller tensors stay in memory (a file per call, not per tensor, anyway)


@torch.no_grad()
def spill_to_disk(modules: Iterable[nn.Module], live: nn.Module | None = None,
                  directory: str | os.PathLike | None = None) -> int:
    """Move the CPU parameters and buffers of ``modules`` into a memory-mapped file; the bytes moved.

    For modules that were replaced in a model and are kept only so that
    :func:`restore_on_error` can put them back: their values, dtypes and tensor objects stay
    the same (``t.data`` is swapped, so every holder of a parameter sees the mapped copy),
    but their storage becomes a private mapping of a file that is unlinked as soon as it is
    mapped.  Pages that are never read are not resident, and the file disappears with the
    last tensor that maps it (nothing is left behind, even if the process is killed after
    the unlink).  Left alone: tensors whose storage ``live`` (the model being compressed) still
    holds (a tied weight), views of a larger storage, tensor subclasses and quantized tensors,
    and tensors under :data:`SPILL_MIN_BYTES`.  If the file cannot be written (a full disk),
    a warning is logged and nothing moves.  ``directory``:
    where the short-lived file is written (default: :func:`tempfile.gettempdir`).
    """
    def storage(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    keep = set() if live is None else {storage(t) for t in (*live.parameters(), *live.buffers())}
    found: dict[int, torch.Tensor] = {}
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            nbytes = t.numel() * t.element_size()
            if (type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu" and t.layout == torch.strided
                    and not t.is_quantized and nbytes >= SPILL_MIN_BYTES
                    # a view of a larger storage (a flat buffer, a slice) or a storage the live model
                    # still reads (a tie) stays: moving it would copy more than it frees, or untie it
                    and t.untyped_storage().nbytes() == nbytes and storage(t) not in keep):
                found.setdefault(storage(t), t)
    if not found:
        return 0
    try:
        fd, path = tempfile.mkstemp(prefix="autorank-spill-", suffix=".pt", dir=directory)
        os.close(fd)
        try:
            torch.save({str(i): t.detach() for i, t in found.items()}, path)
            mapped = torch.load(path, mmap=True, weights_only=True)
        finally:
            os.unlink(path)
    except OSError as exc:  # a full disk, say: the weights stay in memory, which only costs memory
        log.warning("could not move %d replaced dense tensors to a temporary file (%s); they stay in memory",
                    len(found), exc)
        return 0
    for i, t in found.items():
        t.data = mapped[str(i)]
    return sum(t.numel() * t.element_size() for t in found.values())


@contextlib.contextmanager
def preserve_rng(model: nn.Module | None = None) -> Iterator[None]:
    """The global torch RNG (CPU, and the CUDA devices ``model`` lives on) is the same after the block."""
    cuda = sorted({t.device.index or 0 for t in (model.parameters() if model is not None else ()) if t.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        yield


def copy_model(model: nn.Module, why: str = "to compress a copy and leave the model untouched") -> nn.Module:
    """``copy.deepcopy(model)``; a failure is a ``TypeError`` saying what failed and what to do.

    Non-leaf tensors held as plain attributes -- the ``weight`` of a module reparametrised
    by ``torch.nn.utils.prune``, ``weight_orig * weight_mask``, recomputed by a pre-forward
    hook -- are copied detached (deepcopy refuses them); the copy's hook recomputes them.
    """
    memo: dict[int, Any] = {}
    for m in model.modules():
        for key, val in vars(m).items():
            if isinstance(val, torch.Tensor) and not isinstance(val, nn.Parameter) and val.grad_fn is not None:
                memo[id(val)] = val.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:
        hint = ("pass inplace=True to work on the model itself (it is then modified), or make it copyable "
                "(e.g. call torch.nn.utils.prune.remove(module, 'weight') on pruned layers, or drop locks, "
                "open files and other objects that cannot be copied)")
        raise TypeError(f"copy.deepcopy of the {type(model).__name__} failed ({why}): {type(exc).__name__}: "
                        f"{exc}; {hint}") from exc


def meta_copy(module: nn.Module, buffers: bool = True) -> nn.Module:
    """A copy of ``module``'s structure whose parameters (and buffers, with ``buffers=True``) are on the meta
    device: nothing of the weights is allocated or copied.  Tied parameters stay tied.  With
    ``buffers=False`` the buffers are copied (they are small, and non-persistent ones are not saved)."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for m in module.modules():
        for val in vars(m).values():  # pruning's weight_orig * mask, and the like
            if isinstance(val, torch.Tensor) and val.grad_fn is not None:
                memo.setdefault(id(val), torch.empty_like(val, device="meta"))
        if buffers:
            for b in m._buffers.values():
                if b is not None:
                    memo.setdefault(id(b), torch.empty_like(b, device="meta"))
    try:
        return copy.deepcopy(module, memo)
    except Exception as exc:
        raise TypeError(f"copy.deepcopy of the {type(module).__name__} failed (to build its structure without its "
                        f"weights): {type(exc).__name__}: {exc}; pass inplace=True to load into it") from exc


def materialize(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Give every meta parameter and buffer of ``module`` uninitialised storage on ``device`` (in place).

    Tied parameters stay tied; nothing is initialised, so neither time nor the RNG is spent
    (the values are garbage until loaded).  ``device="meta"`` leaves ``module`` as it is.
    Returns ``module``.
    """
    if torch.device(device).type == "meta":
        return module
    new: dict[int, torch.Tensor] = {}
    for m in module.modules():
        for key, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in new:
                    new[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                m._parameters[key] = new[id(p)]
        for key, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                if id(b) not in new:
                    new[id(b)] = torch.empty_like(b, device=device)
                m._buffers[key] = new[id(b)]
    return module


def _device_of(module: nn.Module) -> torch.device:
    t = next(iter(module.parameters()), None)
    if t is None:
        t = next(iter(module.buffers()), None)
    return torch.device("cpu") if t is None else t.device


class OutsideRead(AttributeError):
    """A parent's forward read an attribute of a layer that a factorised replacement would not have."""

    def __init__(self, layer: nn.Module, attribute: str) -> None:
        super().__init__(f"{type(layer).__name__}.{attribute} read from outside the layer")
        self.layer = layer
        self.attribute = attribute


class _Sealed(nn.Module):
    """A stand-in computing what ``inner`` computes, but exposing none of its attributes: reading one
    (``self.fc.weight``) raises :class:`OutsideRead`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_inner", inner)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        raise OutsideRead(self._inner, name)


def find_outside_reads(model: nn.Module, names: Iterable[str], example_inputs: Any,
                       run: Any = None) -> dict[str, str]:
    """``{layer: attribute}`` of the layers among ``names`` whose attributes ``model``'s forward reads from outside
    the layer itself (``self.fc.weight.sum()``, weight tying done in ``forward``, ``self.fc.weight.dtype``).

    Every layer is swapped for a stand-in that computes the same output but has no attribute, and the
    model is run on ``example_inputs`` (in eval mode, without gradients); a read raises, names its layer,
    that layer is put back and the pass repeated.  So one forward pass finds them when there is none, one
    more per layer found.  A factorised replacement of such a layer would fail the same way, so the layers
    returned must stay dense.  ``model`` is left exactly as it was.
    """
    from .nested import run_model

    run = run or run_model
    names = [n for n in names if n]
    by_module = {}
    found: dict[str, str] = {}
    was = {m: m.training for m in model.modules()}
    model.eval()
    originals = {n: model.get_submodule(n) for n in names}
    try:
        for n, layer in originals.items():
            sealed = _Sealed(layer)
            by_module[id(layer)] = n
            replace_module(model, n, sealed)
        for _ in range(len(names) + 1):
            try:
                with torch.no_grad():
                    run(model, example_inputs)
                break
            except OutsideRead as exc:
                n = by_module.get(id(exc.layer))
                if n is None or n in found:  # pragma: no cover - a read of something else: let analyze report it
                    raise
                found[n] = exc.attribute
                replace_module(model, n, originals[n])
            except Exception:  # another failure: the analyser runs the model too and reports it
                break
    finally:
        for n, layer in originals.items():
            replace_module(model, n, layer)
        for m, mode in was.items():
            m.training = mode
    return found


def check_finite_parameters(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """``ValueError`` naming the first parameter of ``model`` (of the modules ``names``, when given) that holds
    NaN or Inf, and which; the factorisations' eigen- and singular-value decompositions fail on them."""
    modules = [(n, model.get_submodule(n)) for n in names] if names is not None else [("", model)]
    seen: set[int] = set()
    for prefix, mod in modules:
        for pn, p in mod.named_parameters():
            if id(p) in seen or not p.is_floating_point() or p.is_meta:
                continue
            seen.add(id(p))
            if not bool(torch.isfinite(p).all()):
                name = f"{prefix}.{pn}" if prefix else pn
                layer = name.rpartition(".")[0] or "<model>"
                what = "NaN" if bool(torch.isnan(p).any()) else "Inf"
                raise ValueError(f"layer {layer!r} holds {what} values in its parameter {name!r}; a model with "
                                 "non-finite weights cannot be factorised: fix or reload its weights")
