"""Saving and loading compressed models: a JSON plan plus safetensors weights.

**Atomic saves.**  :func:`save` writes ``model.safetensors`` and ``plan.json`` under
temporary names in the target folder, flushes them to disk (``fsync``), and only then
renames them over the old files (weights first, then the plan; a rename is atomic).  A
save that fails while writing -- a full disk, a file-size limit, an interrupted process
-- removes its temporary files and leaves the previous save in that folder as it was.

**Verified loads.**  The saved ``plan.json`` records the weights file's size and SHA-256
(``plan.weights``).  :func:`load` checks both before reading a tensor, so flipped bytes,
a truncated copy or a weights file from another save are an error naming the file, not a
silently different model; every loaded floating-point tensor is also checked to be
finite.  ``load(..., verify=False)`` skips the hash (it reads the file once more, about
1 s per GB) for very large files; plans saved before checksums were recorded are loaded
without it.

**No dense weights.**  :func:`load` builds the compressed model's structure on the meta
device -- a copy of ``model``'s modules whose parameters have no storage, with the plan's
factorised modules put in place -- and allocates only the compressed model's tensors,
uninitialised, which are then filled from the file.  ``model`` may itself be built on the
meta device (``with torch.device("meta"): model = Arch(config)``): its weights are never
read.  Non-persistent buffers (rotary tables and the like, which ``state_dict`` leaves
out) are saved in the weights file too, so such a model loads exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .plan import PLAN_VERSION, Plan
from .realize import materialize, meta_copy, realize, restore_on_error

__all__ = ["save", "load", "load_plan", "file_sha256", "PLAN_FILE", "WEIGHTS_FILE"]

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The SHA-256 of the file at ``path`` (hex), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _non_persistent(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{qualified name: tensor}`` of the non-persistent buffers (``state_dict`` leaves them out)."""
    out = {}
    for mn, m in model.named_modules():
        for bn in getattr(m, "_non_persistent_buffers_set", ()):
            b = m._buffers.get(bn)
            if b is not None:
                out[f"{mn}.{bn}" if mn else bn] = b
    return out


def _tensors_to_save(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of ``model`` as safetensors stores them: tied tensors once, contiguous, no shared memory;
    and the names of the non-persistent buffers among them."""
    state = dict(model.state_dict())
    extra = {k: v.detach() for k, v in _non_persistent(model).items() if k not in state}
    seen: dict[tuple, str] = {}
    storages: set[tuple] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in {**state, **extra}.items():
        if t.is_meta:
            raise ValueError(f"cannot save tensor {name!r}: it is on the meta device (no values)")
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
               t.dtype)
        if key in seen:  # a tied tensor: stored once, under the first name (load fills every alias)
            continue
        seen[key] = name
        storage = (t.device, t.untyped_storage().data_ptr())
        if storage in storages or not t.is_contiguous():
            t = t.contiguous().clone()
        storages.add(storage)
        out[name] = t
    return out, sorted(k for k in extra if k in out)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save(model: nn.Module, plan: Plan, path: str | os.PathLike) -> Path:
    """Write ``plan.json`` and ``model.safetensors`` (the compressed model's weights) into ``path``, atomically.

    Both files are written under temporary names in ``path``, flushed to disk and then renamed
    into place, so a failed save leaves what was there before (module docstring).  The plan
    written records the weights file's size and SHA-256 (``plan.weights``); ``plan`` itself is
    not changed.  Returns the folder.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an autorank.Plan, got {type(plan).__name__}")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"cannot save into {str(out)!r}: it exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    tensors, buffers = _tensors_to_save(model)
    token = uuid.uuid4().hex[:12]
    tmp_weights, tmp_plan = out / f".{WEIGHTS_FILE}.{token}.tmp", out / f".{PLAN_FILE}.{token}.tmp"
    try:
        save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
        with open(tmp_weights, "rb+") as f:
            os.fsync(f.fileno())
        record = {"file": WEIGHTS_FILE, "bytes": tmp_weights.stat().st_size, "sha256": file_sha256(tmp_weights),
                  "buffers": buffers}
        saved = Plan.from_dict({**plan.to_dict(), "weights": record})
        with open(tmp_plan, "w") as f:
            f.write(saved.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_weights, out / WEIGHTS_FILE)
        os.replace(tmp_plan, out / PLAN_FILE)
    except BaseException as exc:
        for tmp in (tmp_weights, tmp_plan):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and not isinstance(exc, (TypeError, ValueError)):
            raise OSError(f"saving into {str(out)!r} failed ({type(exc).__name__}: {exc}); the files there "
                          "are as they were before this save") from exc
        raise
    _fsync_dir(out)
    return out


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def load_plan(path: str | os.PathLike) -> Plan:
    """Read the plan saved in directory ``path``; a file that is not a plan is a ``ValueError`` naming it."""
    folder = Path(path)
    f = folder / PLAN_FILE
    if folder.is_file():
        raise ValueError(f"{str(path)!r} is a file; pass the directory autorank.save wrote (it holds {PLAN_FILE} "
                         f"and {WEIGHTS_FILE})")
    if f.is_dir():
        raise ValueError(f"{str(f)!r} is a directory, not a plan file")
    if not f.is_file():
        raise FileNotFoundError(f"no {PLAN_FILE} in {str(path)!r}; was it written by autorank.save?")
    try:
        text = f.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{str(f)!r} is not a text file, so not an autorank plan") from None
    if not text.strip():
        raise ValueError(f"{str(f)!r} is empty; it should hold the JSON plan autorank.save writes")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(f)!r} is not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(f)!r} holds a JSON {_json_kind(data)}, not an autorank plan (a JSON object "
                         "with 'layers', 'budget', ...)")
    if data.get("version") != PLAN_VERSION:
        raise ValueError(f"{str(f)!r}: unsupported plan version {data.get('version')!r}; this autorank reads "
                         f"version {PLAN_VERSION}")
    layers = data.get("layers")
    if layers is None:
        raise ValueError(f"{str(f)!r} has no 'layers' entry, so it is not an autorank plan")
    if not isinstance(layers, list):
        raise ValueError(f"{str(f)!r}: 'layers' must be a list of layer records, got a JSON {_json_kind(layers)}")
    for i, lp in enumerate(layers):
        if not isinstance(lp, dict):
            raise ValueError(f"{str(f)!r}: layer record {i} must be a JSON object, got a JSON {_json_kind(lp)}")
        if "name" not in lp:
            raise ValueError(f"{str(f)!r}: layer record {i} has no 'name'")
    try:
        return Plan.from_dict(data)
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{str(f)!r} is not a valid autorank plan: {exc}") from exc


def _weights_file(folder: Path, plan: Plan, verify: bool) -> Path:
    """The weights file of a save, checked to be there (and, with ``verify``, to be the one the plan recorded)."""
    f = folder / WEIGHTS_FILE
    if f.is_dir():
        raise ValueError(f"{str(f)!r} is a directory; it should be the safetensors weights file autorank.save "
                         "writes")
    if not f.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {str(folder)!r}; was it written by autorank.save?")
    record = plan.weights or {}
    if verify and record.get("sha256"):
        size = f.stat().st_size
        if record.get("bytes") is not None and size != record["bytes"]:
            raise ValueError(f"{str(f)!r} has {size:,} bytes, but {PLAN_FILE} recorded {record['bytes']:,} when "
                             "it was saved: the file is truncated, corrupted or from another save")
        digest = file_sha256(f)
        if digest != record["sha256"]:
            raise ValueError(f"{str(f)!r} is corrupted or from another save: its SHA-256 is {digest}, but "
                             f"{PLAN_FILE} recorded {record['sha256']} when it was saved (pass verify=False to "
                             "load it anyway)")
    return f


def _target_device(model: nn.Module, device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in (*model.parameters(), *model.buffers()):
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


def load(path: str | os.PathLike, model: nn.Module, inplace: bool = False, *, verify: bool = True,
         device: str | torch.device | None = None, **safetensors_kwargs: Any) -> nn.Module:
    """Rebuild a saved compressed model from the original architecture.

    ``model`` is an instance of the original (dense) architecture; its weights are never read,
    and it may live on the meta device (``with torch.device("meta"): model = Arch(config)``).
    The compressed structure is built without the dense weights (module docstring), the
    factorised modules named in the plan are put in place and every tensor is loaded from
    ``model.safetensors``, so outputs are bit-identical to the saved model's.

    Args:
        path: the directory :func:`save` wrote.
        model: the original architecture; with ``inplace=True`` it becomes the compressed model
            (on an error it is left as it was).
        verify: check the weights file against the size and SHA-256 recorded in ``plan.json``
            (``False`` skips the extra read of a very large file; finiteness is still checked).
        device: where the loaded tensors go (default: ``model``'s device, or CPU for a meta model).
        safetensors_kwargs: ``strict=False`` tolerates tensors missing from, or extra in, the file.

    Raises:
        ValueError: the plan or the weights file is unreadable, corrupted, or does not fit ``model``
            (each message names the file).
    """
    from safetensors import safe_open

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    strict = bool(safetensors_kwargs.pop("strict", True))
    if safetensors_kwargs:
        raise TypeError(f"load() got unexpected keyword argument(s) {sorted(safetensors_kwargs)}")
    folder = Path(path)
    plan = load_plan(folder)
    wfile = _weights_file(folder, plan, verify)
    dev = _target_device(model, device)
    try:
        handle = safe_open(str(wfile), framework="pt", device=str(dev))
    except Exception as exc:  # SafetensorError, or an OSError
        raise ValueError(f"{str(wfile)!r} is not a readable safetensors file ({type(exc).__name__}: {exc}); it may "
                         "be truncated or corrupted") from exc
    work = model if inplace else meta_copy(model, buffers=False)
    with restore_on_error(work):
        realize(work, plan, inplace=True, init=False)
        empty = {k for k, t in _all_tensors(work).items() if t.is_meta}
        materialize(work, dev)
        _fill(work, handle, wfile, strict, empty)
    return work


def _all_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by qualified name, aliases included, non-persistent buffers too."""
    out = {}
    for mn, m in model.named_modules(remove_duplicate=False):
        for kind in (m._parameters, m._buffers):
            for k, t in kind.items():
                if t is not None:
                    out[f"{mn}.{k}" if mn else k] = t
    return out


@torch.no_grad()
def _fill(model: nn.Module, handle: Any, wfile: Path, strict: bool, empty: set[str]) -> None:
    """Copy the tensors of the open safetensors ``handle`` into ``model``, after checking that they fit.

    Tied tensors are filled once from whichever of their names the file holds; ``empty``: the
    names that had no values before (built on the meta device), each of which must be filled."""
    try:
        keys = list(handle.keys())
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
    except Exception as exc:
        raise ValueError(f"{str(wfile)!r} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    targets = _all_tensors(model)
    persistent = set(model.state_dict(keep_vars=True))
    groups: dict[int, list[str]] = {}
    for name, t in targets.items():
        groups.setdefault(id(t), []).append(name)
    plan_of: dict[str, str] = {}  # file key -> a target name
    missing, wrong = [], []
    for names in groups.values():
        src = next((n for n in names if n in shapes), None)
        if src is None:
            if any(n in persistent for n in names):
                missing.append(names[0])
            continue
        want = tuple(targets[names[0]].shape)
        if shapes[src] != want:
            wrong.append(f"{src}: {list(shapes[src])} in the file, {list(want)} in the model")
        plan_of[src] = names[0]
    unexpected = sorted(set(keys) - set(targets))
    if wrong or (strict and (missing or unexpected)):
        parts = ([f"shapes differ ({'; '.join(wrong[:5])})"] if wrong else []) + \
                ([f"missing {missing[:5]}"] if strict and missing else []) + \
                ([f"unexpected {unexpected[:5]}"] if strict and unexpected else [])
        raise ValueError(f"the weights in {str(wfile)!r} do not fit this model with the saved plan: "
                         f"{', '.join(parts)}; pass the architecture the saved model was compressed from")
    filled = set()
    for src, name in plan_of.items():
        try:
            value = handle.get_tensor(src)
        except Exception as exc:
            raise ValueError(f"{str(wfile)!r}: tensor {src!r} cannot be read ({type(exc).__name__}: {exc}); the file "
                             "may be truncated or corrupted") from exc
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            what = "NaN" if bool(torch.isnan(value).any()) else "Inf"
            raise ValueError(f"{str(wfile)!r}: tensor {src!r} holds {what} values; the file is corrupted (or the "
                             "model was saved with non-finite weights)")
        targets[name].copy_(value)
        filled.update(groups[id(targets[name])])
    unfilled = sorted(empty - filled)
    if unfilled:
        raise ValueError(f"{unfilled[:5]} have no values: the model was built on the meta device and "
                         f"{str(wfile)!r} does not hold them (non-persistent buffers, saved since this "
                         "autorank's checksummed saves); build the model on a real device instead")
