"""The sensitivity table's on-disk cache and the fingerprints that validate it.

A table is kept in a JSON file under a fingerprint (:func:`model_fingerprint`) of the
model's weights and of everything else the scores depend on; a file with another
fingerprint or format version is ignored (and recomputed by the caller).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

__all__ = ["SENSITIVITY_VERSION", "tensor_digest", "model_fingerprint", "input_tensors", "check_cache_path",
           "load_table", "save_table"]

log = logging.getLogger(__name__)

#: the format version of a saved sensitivity table (part of its fingerprint)
SENSITIVITY_VERSION = 1


def tensor_digest(tensor: torch.Tensor, h: Any = None) -> Any:
    """Feed ``tensor``'s dtype, shape and bytes into a hash (a new blake2b when ``h`` is None)."""
    h = h if h is not None else hashlib.blake2b(digest_size=16)
    t = tensor.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h


def model_fingerprint(model: nn.Module, *extra: Any) -> str:
    """A hex digest of every parameter and buffer of ``model`` (names, dtypes, shapes, values) and ``extra``."""
    h = hashlib.blake2b(digest_size=20)
    for name, t in model.state_dict().items():
        h.update(name.encode())
        tensor_digest(t, h)
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def input_tensors(inputs: Any) -> list[torch.Tensor]:
    """Every tensor in (nested) model inputs, in a fixed order (dict entries by sorted key)."""
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return [t for k in sorted(inputs) for t in input_tensors(inputs[k])]
    if isinstance(inputs, (tuple, list)):
        return [t for v in inputs for t in input_tensors(v)]
    return []


def check_cache_path(cache_path: Any) -> Path | None:
    """``cache_path`` as a :class:`Path` (None stays None); ``TypeError``/``ValueError`` naming a bad one."""
    if cache_path is None:
        return None
    if not isinstance(cache_path, (str, os.PathLike)):
        raise TypeError(f"sensitivity: cache_path must be a path (str or os.PathLike) or None, got {cache_path!r}")
    path = Path(cache_path)
    if path.is_dir():
        raise ValueError(f"sensitivity: cache_path {str(path)!r} is a directory; name a JSON file")
    return path


def load_table(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The table saved at ``path`` if it has this format version and ``fingerprint``, else None (logged)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("sensitivity: ignoring unreadable cache %s (%s); recomputing", path, exc)
        return None
    if not isinstance(data, dict) or data.get("version") != SENSITIVITY_VERSION:
        log.warning("sensitivity: ignoring cache %s of another format; recomputing", path)
        return None
    if data.get("fingerprint") != fingerprint:
        log.warning("sensitivity: cache %s was made for another model, layer set, ratios or scorer; "
                    "recomputing and overwriting it", path)
        return None
    return data


def save_table(path: Path, table: dict[str, Any]) -> None:
    """Write ``table`` to ``path`` as JSON, atomically (through a temporary file beside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=1))
    os.replace(tmp, path)
