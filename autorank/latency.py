r"""Wall-clock latency of forward passes: whole models, single layers, and candidate tables.

**Reports.**  :func:`measure_latency` times ``repeats`` forward passes (after ``warmup``
untimed ones) under ``torch.no_grad()`` in eval mode and reports the median and the
inter-quartile range (IQR = q75 - q25) in seconds.  The model's training mode and torch's
intra-op thread count are restored afterwards, also on error.  :func:`layer_latencies`
times every compressed layer of a plan against its dense original on the real input that
layer sees, and flags the layers whose factorisation is slower than dense.

**Latency as a cost** (``metric="latency"``, docs/latency.md).  :func:`latency_column`
gives every candidate of one layer a measured forward time on the layer's real input
(captured by :func:`layer_io`), on the layer's device and dtype, with a fixed thread count:

* *interleaved and normalised*: candidates are timed in chunks; every round of a chunk
  times the dense layer and each candidate once, and a candidate's time is
  ``min_rounds(t_cand) / min_rounds(t_dense in its chunk) * min(t_dense over all chunks)``.
  On a shared machine the noise is additive and positive (the process is preempted), so
  the best of the rounds is the estimate least moved by it, and the ratio to dense
  timed alongside cancels a change of load between chunks;
* *a grid of ranks*: for a family with a ``rank`` hyperparameter only the ranks of
  :func:`rank_grid` are timed (the other hyperparameters fixed); every other rank gets
  :func:`step_up`, the time of the next timed rank up after a running maximum, which
  never predicts below a timed point at or under it (latency is close to a step function
  of the rank: kernels work in tiles);
* *cached*: :class:`LatencyCache` keeps each layer's table in a JSON file keyed by
  device, dtype, thread count, torch version, the layer's geometry (its ``repr``) and the
  input shape, so re-runs and sweeps time nothing twice.

:func:`split_latency` measures the whole model and the model with the compressible layers
replaced by replays of their recorded outputs (the time of everything that is not
compressed), interleaved.  On CUDA every timed sample is bracketed by
``torch.cuda.synchronize``.  With one thread on a CPU the tables use the calling thread's CPU
time (:func:`resolve_clock`): on a shared machine it does not count the time spent waiting
for a core.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from ._util import user_cache_dir
from .graph import replace_module
from .nested import run_model
from .plan import Plan
from .validate import check_count

__all__ = ["measure_latency", "layer_latencies", "time_callables", "resolve_clock", "CLOCKS", "layer_io", "split_latency", "rank_grid",
           "step_up", "latency_column", "LatencyCache", "LATENCY_CACHE_VERSION"]

log = logging.getLogger(__name__)

#: the format version of a cached latency table (part of its key)
LATENCY_CACHE_VERSION = 1


def _check_counts(repeats: Any, warmup: Any, threads: Any) -> None:
    check_count("repeats", repeats)
    check_count("warmup", warmup, low=0)
    check_count("threads", threads, optional=True)


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = ("wall", "cpu", "auto")


def resolve_clock(clock: str, device: torch.device | str | None, threads: int | None) -> str:
    """``"auto"`` is ``"cpu"`` (the calling thread's CPU time) on a CPU with ``threads=1``, else ``"wall"``.

    With one intra-op thread the whole forward pass runs on the calling thread, so its CPU
    time is the latency the pass would have on an unloaded core, and time spent waiting for
    a core that other processes hold is not counted.  On CUDA, or with several threads, only
    wall-clock time is the latency.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if clock != "auto":
        return clock
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return "cpu" if dev.type == "cpu" and threads == 1 else "wall"


def time_callables(fns: Sequence[Callable[[], Any]], repeats: int = 7, warmup: int = 1,
                   threads: int | None = None, device: torch.device | str | None = None,
                   min_time_s: float = 0.0, clock: str = "wall") -> np.ndarray:
    """Seconds per call of each of ``fns``, timed in interleaved rounds: an array ``(len(fns), repeats)``.

    Every round calls each function once in turn (``warmup`` untimed rounds first).  A
    sample repeats its call ``n`` times and is divided by ``n``, where ``n`` is chosen from
    the first warm-up call so that a sample lasts at least ``min_time_s``.  On a CUDA
    ``device`` each sample is bracketed by ``torch.cuda.synchronize``.  Runs under
    ``torch.no_grad()``; ``threads`` fixes ``torch.set_num_threads`` (restored afterwards).
    ``clock``: ``"wall"`` (``time.perf_counter``), ``"cpu"`` (``time.thread_time``, the calling
    thread's CPU time) or ``"auto"`` (:func:`resolve_clock`).
    """
    _check_counts(repeats, warmup, threads)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    now = time.thread_time if resolve_clock(clock, dev, threads) == "cpu" else time.perf_counter
    old_threads = torch.get_num_threads()
    out = np.empty((len(fns), repeats))
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.no_grad():
            inner = []
            for fn in fns:  # one call each: compiles/allocates, and sizes the inner loop
                _sync(dev)
                t = now()
                fn()
                _sync(dev)
                dt = now() - t
                inner.append(max(1, math.ceil(min_time_s / dt)) if dt > 0 and min_time_s > 0 else 1)
            for r in range(warmup + repeats):
                for i, fn in enumerate(fns):
                    n = inner[i]
                    _sync(dev)
                    t = now()
                    for _ in range(n):
                        fn()
                    _sync(dev)
                    if r >= warmup:
                        out[i, r - warmup] = (now() - t) / n
    finally:
        torch.set_num_threads(old_threads)
    return out


def _summary(times: np.ndarray, repeats: int, threads: int) -> dict[str, Any]:
    q25, med, q75 = np.percentile(times, [25, 50, 75])
    return {"median_s": float(med), "iqr_s": float(q75 - q25), "q25_s": float(q25), "q75_s": float(q75),
            "min_s": float(times.min()), "repeats": repeats, "threads": threads}


def measure_latency(
    model: nn.Module,
    example_inputs: Any,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    clock: str = "wall",
) -> dict[str, Any]:
    """Median and IQR (seconds) of ``repeats`` forward passes of ``model`` on ``example_inputs``.

    Args:
        model: any module; it runs in eval mode under ``torch.no_grad()`` and its
            training mode is restored afterwards.  On CUDA each pass is synchronised.
        example_inputs: a tensor, a tuple/list of positional inputs or a dict of
            keyword inputs (as for :func:`autorank.analyze`).
        repeats: timed passes (>= 1).
        warmup: untimed passes first (>= 0).
        threads: fix ``torch.set_num_threads`` during the measurement (restored after);
            ``None`` keeps the current setting.
        clock: ``"wall"``, ``"cpu"`` or ``"auto"`` (:func:`time_callables`).

    Returns:
        ``{"median_s", "iqr_s", "q25_s", "q75_s", "min_s", "repeats", "threads"}``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_counts(repeats, warmup, threads)
    was_training = model.training
    used = threads if threads is not None else torch.get_num_threads()
    try:
        model.eval()
        times = time_callables([lambda: run_model(model, example_inputs)], repeats, warmup, threads,
                               _device_of(model), clock=clock)[0]
    finally:
        model.train(was_training)
    return _summary(times, repeats, used)


def layer_io(model: nn.Module, names: Iterable[str], example_inputs: Any,
             outputs: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, list[Any]]]:
    """The first positional input tensor of each named module from one forward pass of ``model``,
    and (``outputs=True``) the outputs of every one of its calls, in call order."""
    seen: dict[str, torch.Tensor] = {}
    outs: dict[str, list[Any]] = {}
    handles = []

    def pre(name):
        def fn(mod, args):
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()
        return fn

    def post(name):
        def fn(mod, args, out):
            outs.setdefault(name, []).append(out)
        return fn

    was_training = model.training
    try:
        for n in names:
            mod = model.get_submodule(n)
            handles.append(mod.register_forward_pre_hook(pre(n)))
            if outputs:
                handles.append(mod.register_forward_hook(post(n)))
        model.eval()
        with torch.no_grad():
            run_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen, outs


def _layer_inputs(model: nn.Module, names: Iterable[str], example_inputs: Any) -> dict[str, torch.Tensor]:
    return layer_io(model, names, example_inputs)[0]


def layer_latencies(
    original: nn.Module,
    compressed: nn.Module,
    plan: Plan,
    example_inputs: Any,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Time each compressed layer of ``plan`` against its dense original on its real input.

    The input of every layer is captured by a forward pre-hook on ``original`` running
    ``example_inputs``; the dense module (from ``original``) and the factorised one
    (from ``compressed``, same qualified name) are then timed on that tensor in
    interleaved rounds (:func:`time_callables`).

    Returns one dict per compressed layer, in plan order: ``name``, ``family``,
    ``hyper``, ``in_shape``, ``dense_ms``, ``compressed_ms``, ``speedup``
    (dense / compressed) and ``slower`` (True when the factorised layer is slower).
    Layers that were not called on ``example_inputs`` are left out (logged).
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an autorank.Plan, got {type(plan).__name__}")
    _check_counts(repeats, warmup, threads)
    names = [n for n, lp in plan.layers.items() if lp.compressed]
    inputs = _layer_inputs(original, names, example_inputs)
    rows = []
    for name in names:
        if name not in inputs:
            log.warning("layer %s was not called on example_inputs; not timed", name)
            continue
        x = inputs[name]
        dense_mod, comp_mod = original.get_submodule(name), compressed.get_submodule(name)
        modes = dense_mod.training, comp_mod.training
        try:
            dense_mod.eval()
            comp_mod.eval()
            t = time_callables([lambda: dense_mod(x), lambda: comp_mod(x)], repeats, warmup, threads,
                               _device_of(dense_mod))
        finally:
            dense_mod.train(modes[0])
            comp_mod.train(modes[1])
        dense, comp = float(np.median(t[0])), float(np.median(t[1]))
        lp = plan.layers[name]
        rows.append({
            "name": name, "family": lp.family, "hyper": dict(lp.hyper), "in_shape": list(x.shape),
            "dense_ms": dense * 1e3, "compressed_ms": comp * 1e3,
            "speedup": dense / comp if comp > 0 else float("inf"), "slower": comp > dense,
        })
        if rows[-1]["slower"]:
            log.info("layer %s: factorised %.3f ms is slower than dense %.3f ms",
                     name, rows[-1]["compressed_ms"], rows[-1]["dense_ms"])
    return rows


# ---- the time of everything that is not compressed ---------------------------------------------------

class _Replay(nn.Module):
    """Returns the recorded outputs of a layer's calls in turn (no compute)."""

    def __init__(self, outputs: list[Any]) -> None:
        super().__init__()
        self.outputs, self.i = outputs, 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.outputs[self.i % len(self.outputs)]
        self.i += 1
        return out


def split_latency(model: nn.Module, names: Sequence[str], example_inputs: Any, repeats: int = 7,
                  warmup: int = 1, threads: int | None = None, min_time_s: float = 0.0,
                  clock: str = "wall") -> dict[str, Any]:
    """The whole model's latency and that of everything but the layers ``names``, interleaved.

    "The rest" is a structural copy of the model (sharing its parameters and buffers) in
    which each named layer is a replay of the outputs it produced on ``example_inputs``, so
    every other module computes on the same tensors and the named layers cost nothing.
    ``model`` itself is not changed.  Returns ``{"whole": summary, "rest": summary}``
    (:func:`measure_latency`'s keys; the tables use ``min_s``, as the candidate times do).
    """
    _check_counts(repeats, warmup, threads)
    _, outs = layer_io(model, list(names), example_inputs, outputs=True)
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    rest = copy.deepcopy(model, memo=dict(shared))
    for n, o in outs.items():
        replace_module(rest, n, _Replay(o))
    was_training = model.training
    used = threads if threads is not None else torch.get_num_threads()
    try:
        model.eval()
        rest.eval()
        t = time_callables([lambda: run_model(model, example_inputs), lambda: run_model(rest, example_inputs)],
                           repeats, warmup, threads, _device_of(model), min_time_s, clock)
    finally:
        model.train(was_training)
    return {"whole": _summary(t[0], repeats, used), "rest": _summary(t[1], repeats, used)}


# ---- candidate tables ------------------------------------------------------------------------------

def rank_grid(ranks: Sequence[int], linear: int = 8, ratio: float = 1.25) -> np.ndarray:
    """The ranks to time among the candidate ``ranks``: the ``linear`` smallest, then geometric, and the largest.

    After the ``linear`` smallest distinct ranks, the next grid rank is the smallest candidate
    at least ``ratio`` times the last one; the largest candidate is always in the grid, so
    :func:`step_up` covers every candidate.  With ranks restricted to multiples of ``m`` the
    grid ranks are tile boundaries.
    """
    r = np.unique(np.asarray(ranks, dtype=np.int64))
    if len(r) == 0:
        return r
    grid = list(r[:linear])
    for v in r[linear:]:
        if v >= grid[-1] * ratio:
            grid.append(v)
    if grid[-1] != r[-1]:
        grid.append(r[-1])
    return np.asarray(grid, dtype=np.int64)


def step_up(grid_ranks: np.ndarray, grid_times: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Conservative interpolation: the time of the next grid rank at or above each rank, after a running maximum.

    ``t(r) = max_{g <= g*(r)} t_g`` with ``g*(r)`` the smallest grid rank ``>= r``: never below
    the time measured at any grid rank ``<= r`` (a step function rising at the grid ranks).
    ``ValueError`` for a rank above the largest grid rank.
    """
    g = np.asarray(grid_ranks)
    order = np.argsort(g)
    g, t = g[order], np.maximum.accumulate(np.asarray(grid_times, dtype=np.float64)[order])
    ranks = np.asarray(ranks)
    if len(ranks) and (len(g) == 0 or ranks.max() > g[-1]):
        raise ValueError(f"step_up: rank {int(ranks.max())} is above the largest timed rank "
                         f"{int(g[-1]) if len(g) else None}")
    return t[np.searchsorted(g, ranks, side="left")]


class LatencyCache:
    """Measured candidate times on disk: one JSON file per layer key under ``directory``
    (``True``: ``latency/`` in :func:`autorank._util.user_cache_dir`; None: no cache).

    ``ValueError`` when the directory cannot be created or written.
    """

    def __init__(self, directory: str | os.PathLike | bool | None) -> None:
        if directory is True:  # the user cache folder's latency/ (LatencyConfig's default)
            directory = user_cache_dir() / "latency"
        elif directory is False:
            directory = None
        if directory is not None and not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"latency cache must be a directory path, True or None, got {directory!r}")
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                probe = self.directory / f".probe-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
            except OSError as exc:
                raise ValueError(f"latency cache directory {str(self.directory)!r} is not writable "
                                 f"({exc.strerror or exc}); pass another path or cache=None") from None

    @staticmethod
    def key(module: nn.Module, x: torch.Tensor, threads: int) -> dict[str, Any]:
        """What a layer's times depend on: device, dtype, threads, torch and CPU, geometry, input shape."""
        dev = _device_of(module)
        device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
            f"cpu:{torch.backends.cpu.get_cpu_capability()}"
        p = next(module.parameters(), None)
        return {"version": LATENCY_CACHE_VERSION, "device": device, "dtype": str(p.dtype if p is not None else x.dtype),
                "threads": threads, "torch": torch.__version__, "layer": repr(module),
                "type": type(module).__qualname__, "input": list(x.shape), "input_dtype": str(x.dtype)}

    def _path(self, key: Mapping[str, Any]) -> Path | None:
        if self.directory is None:
            return None
        digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=16).hexdigest()
        return self.directory / f"{digest}.json"

    def load(self, key: Mapping[str, Any]) -> dict[str, float]:
        path = self._path(key)
        if path is None or not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("latency: ignoring unreadable cache file %s (%s)", path, exc)
            return {}
        if not isinstance(data, dict) or data.get("key") != dict(key):
            return {}
        return {k: float(v) for k, v in data.get("times", {}).items()}

    def save(self, key: Mapping[str, Any], times: Mapping[str, float]) -> None:
        path = self._path(key)
        if path is None:
            return
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": dict(key), "times": dict(times)}, indent=1))
        os.replace(tmp, path)


def _entry(family: str, hyper: Mapping[str, int]) -> str:
    return family + "".join(f"|{k}={int(v)}" for k, v in sorted(hyper.items()))


def _randomise(module: nn.Module) -> nn.Module:
    """Finite small weights in a skeleton (uninitialised memory can hold denormals, which time slowly)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    return module.eval()


def latency_column(
    module: nn.Module,
    x: torch.Tensor,
    candidates: Sequence[tuple[str, Mapping[str, int]]],
    build: Callable[[str, Mapping[str, int]], nn.Module],
    *,
    threads: int = 1,
    repeats: int = 7,
    warmup: int = 1,
    min_time_s: float = 1e-3,
    grid_linear: int = 8,
    grid_ratio: float = 1.25,
    cache: LatencyCache | None = None,
    chunk_params: int | None = None,
    clock: str = "wall",
) -> tuple[np.ndarray, dict[str, int]]:
    """Seconds per call of each candidate ``(family, hyper)`` of one layer on its input ``x``.

    ``("dense", {})`` is ``module`` itself; any other candidate is ``build(family, hyper)``
    (an uninitialised skeleton is enough: its weights are set to small random values).
    For each family with a ``rank`` hyperparameter and each setting of its other
    hyperparameters, only the ranks of :func:`rank_grid` are timed and the rest are
    :func:`step_up` from them.  Times come from ``cache`` where it has them, and the new
    ones are saved to it.  ``chunk_params`` bounds the parameters of the candidates alive
    at once (default: twice the dense layer's, at least 2**22).

    Returns ``(seconds, stats)`` with ``stats = {"timed", "cached", "interpolated"}`` counts.
    """
    check_count("threads", threads)
    _check_counts(repeats, warmup, threads)
    cache = cache or LatencyCache(None)
    clock = resolve_clock(clock, _device_of(module), threads)
    key = {**LatencyCache.key(module, x, threads), "clock": clock}
    known = cache.load(key)
    names = [_entry(f, h) for f, h in candidates]
    # which entries must be measured: dense, every rank-free candidate, the grid of each rank series
    series: dict[tuple[str, str], list[int]] = {}
    need: dict[str, tuple[str, Mapping[str, int]]] = {_entry("dense", {}): ("dense", {})}
    for idx, ((fam, hyper), name) in enumerate(zip(candidates, names)):
        if fam == "dense":
            continue
        if "rank" in hyper:
            rest = {k: v for k, v in hyper.items() if k != "rank"}
            series.setdefault((fam, _entry(fam, rest)), []).append(idx)
        else:
            need[name] = (fam, hyper)
    grids: dict[tuple[str, str], np.ndarray] = {}
    for sk, idxs in series.items():
        ranks = [int(candidates[i][1]["rank"]) for i in idxs]
        grids[sk] = rank_grid(ranks, grid_linear, grid_ratio)
        base = {k: v for k, v in candidates[idxs[0]][1].items() if k != "rank"}
        for r in grids[sk]:
            h = {**base, "rank": int(r)}
            need[_entry(sk[0], h)] = (sk[0], h)
    todo = [(n, fh) for n, fh in need.items() if n not in known]
    stats = {"timed": len(todo), "cached": len(need) - len(todo), "interpolated": 0}
    if todo:
        dense, ratios = _time_candidates(module, x, todo, build, threads, repeats, warmup, min_time_s, chunk_params,
                                         clock)
        dense_name = _entry("dense", {})
        known.setdefault(dense_name, dense)  # times already cached stay relative to the dense time cached with them
        known.update({n: r * known[dense_name] for n, r in ratios.items()})
        cache.save(key, known)
    out = np.empty(len(candidates))
    for idx, name in enumerate(names):
        if name in need:
            out[idx] = known[name]
    for sk, idxs in series.items():
        g = grids[sk]
        base = {k: v for k, v in candidates[idxs[0]][1].items() if k != "rank"}
        gt = np.array([known[_entry(sk[0], {**base, "rank": int(r)})] for r in g])
        ranks = np.array([int(candidates[i][1]["rank"]) for i in idxs])
        out[idxs] = step_up(g, gt, ranks)
        stats["interpolated"] += int(np.sum(~np.isin(ranks, g)))
    return out, stats


def _time_candidates(module: nn.Module, x: torch.Tensor, todo: Sequence[tuple[str, tuple[str, Mapping[str, int]]]],
                     build: Callable[[str, Mapping[str, int]], nn.Module], threads: int, repeats: int, warmup: int,
                     min_time_s: float, chunk_params: int | None, clock: str) -> tuple[float, dict[str, float]]:
    """Dense seconds per call, and each candidate's median time as a ratio to dense in its chunk."""
    dense_name = _entry("dense", {})
    dev = _device_of(module)
    was_training = module.training
    dense_numel = sum(p.numel() for p in module.parameters())
    limit = chunk_params if chunk_params is not None else max(2 * dense_numel, 1 << 22)
    cands = [(n, fh) for n, fh in todo if n != dense_name]
    dense_all: list[np.ndarray] = []
    ratios: dict[str, float] = {}
    module.eval()
    try:
        i = 0
        while True:  # one chunk of candidates (at most `limit` parameters alive), timed with dense
            chunk, size = [], 0
            while i < len(cands):
                name, (fam, hyper) = cands[i]
                mod = _randomise(build(fam, hyper))
                numel = sum(p.numel() for p in mod.parameters())
                if chunk and size + numel > limit:
                    break  # this candidate starts the next chunk (built again there)
                chunk.append((name, mod))
                size += numel
                i += 1
            fns = [lambda: module(x)] + [(lambda m: (lambda: m(x)))(m) for _, m in chunk]
            t = time_callables(fns, repeats, warmup, threads, dev, min_time_s, clock)
            dense_min = float(t[0].min())
            dense_all.append(t[0])
            for (name, _), row in zip(chunk, t[1:]):  # best of the rounds, relative to dense in the same chunk
                ratios[name] = float(row.min()) / dense_min if dense_min > 0 else 1.0
            del chunk, fns
            if i >= len(cands):
                break
    finally:
        module.train(was_training)
    return float(np.concatenate(dense_all).min()), ratios
