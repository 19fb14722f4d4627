"""The ``autorank`` command line: optimize, sweep, report, plot.

    autorank optimize MODEL --budget 0.3 [--metric params] [--calibration FILE] [--seed 0] --out DIR
    autorank sweep CONFIG [--out DIR] [--no-resume] [--plot]
    autorank report DIR
    autorank plot DIR [--budget B] [--method NAME]
    autorank --version

MODEL is a model spec as in sweep configs (see :func:`autorank.apps.models.load_model`).
User errors print one line, ``autorank: error: ...``, to stderr and exit with status 2
(with ``-v`` the traceback is shown instead); that includes bad arguments, which argparse
would otherwise answer with its usage block.  An error the CLI did not foresee prints one
line too, exits with status 1 and asks for ``-v``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

__all__ = ["main", "build_parser", "load_calibration", "USER_ERRORS"]

MODEL_HELP = ("model spec: a registered name (mnist_cnn), 'torchvision:<name>' (untrained, 1x3x224x224 "
              "input) or 'pkg.module:function' returning an nn.Module")

#: exceptions that mean "what you asked for cannot be done" (exit 2, one line).  RuntimeError:
#: autorank.analyze reports a forward pass that failed on the example input; OSError: files
#: and folders; ImportError: a missing optional dependency (the message names the extra).
USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError, ImportError)

#: the API's wording in library messages -> what a CLI user types instead (``optimize`` only;
#: a sweep's messages speak of its config file, which is right there)
CLI_TERMS = ((re.compile(r"pass calibration=\.\.\.(?: to optimize)?"), "pass --calibration FILE"),)

CURVES_FILE, GRAPH_FILE = "curves.json", "graph.json"  # what `autorank plot` reads besides plan.json


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``autorank: error: ...``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        msg = " ".join(message.split())
        self.exit(2, f"autorank: error: {msg} (see `{self.prog} --help`)\n")


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"budget must be a number in (0, 1], got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"seed must be a non-negative integer, got {text!r}")
    return value


def _shape(text: str) -> list[int]:
    try:
        shape = [int(t) for t in text.replace("x", ",").split(",") if t]
    except ValueError:
        shape = []
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"input shape must look like 1,3,32,32, got {text!r}")
    return shape


def _version() -> str:
    from autorank import __version__

    return f"autorank {__version__}"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="autorank", description="Low-rank compression of PyTorch models under a "
                "parameter or FLOP budget (ALDS).")
    p.add_argument("--version", action="version", version=_version())
    p.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) to stderr; "
                   "on an error, show the traceback")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars (default: shown on a terminal)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    o = sub.add_parser("optimize", help="compress one model to one budget and save plan + weights",
                       description="Compress MODEL so that at most BUDGET of its parameters (or MACs) remain; "
                       "writes plan.json and model.safetensors (plus curves.json and graph.json for "
                       "`autorank plot`) into --out and prints the plan.")
    o.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    o.add_argument("--budget", type=_budget, required=True, help="fraction in (0, 1] of the model that may remain")
    o.add_argument("--metric", choices=("params", "flops"), default="params", help="what the budget counts")
    o.add_argument("--allocator", default="alds",
                   help="rank-selection rule: alds (default), alds_output, uniform, svd_energy, lrank, vbmf, "
                   "sensitivity, pca (pca needs --calibration)")
    o.add_argument("--families", nargs="+", default=None, metavar="FAMILY",
                   help="decomposition families competing per layer (default: alds); e.g. alds tucker2 cp")
    o.add_argument("--checkpoint", help="weights for MODEL (safetensors or a torch.save'd state_dict)")
    o.add_argument("--input-shape", type=_shape, help="example input shape, e.g. 1,3,32,32")
    o.add_argument("--calibration", metavar="FILE",
                   help="saved input batches for data-aware compression: a .safetensors file (each tensor one "
                   "batch, in key order) or a torch.save'd list of batches (loaded with weights_only=True); "
                   "see docs/cli.md")
    o.add_argument("--seed", type=_seed, default=0,
                   help="seed of torch, numpy and random before the model is built (default 0): the same "
                   "command writes the same plan")
    o.add_argument("--out", required=True, help="output directory (checked to be writable before compressing)")

    s = sub.add_parser("sweep", help="run a budget sweep from a TOML config",
                       description="Run every method x budget row of a sweep config (docs/sweeps.md); "
                       "writes results.csv and results.json, resuming finished rows.")
    s.add_argument("config", metavar="CONFIG", help="sweep config (TOML)")
    s.add_argument("--out", help="output directory (default: budgets/out/<config name>)")
    s.add_argument("--no-resume", action="store_true", help="start over instead of skipping finished rows")
    s.add_argument("--plot", action="store_true", help="draw the figures afterwards (as `autorank plot`)")

    r = sub.add_parser("report", help="print a saved result (plan.json) or a sweep (results.json)",
                       description="Print the per-layer plan of a directory written by `autorank optimize` "
                       "or autorank.save, or the results table of a sweep directory.")
    r.add_argument("dir", metavar="DIR", help="result directory")

    pl = sub.add_parser("plot", help="draw the figures of a sweep or an optimize directory",
                        description="Write PNG and SVG figures into DIR/plots/: for a sweep directory quality "
                        "vs size, the allocation at one budget, the error curves and the layer graph; for an "
                        "`autorank optimize` directory the allocation, the error curves with the chosen ranks, "
                        "and the layer graph.")
    pl.add_argument("dir", metavar="DIR", help="sweep or optimize output directory")
    pl.add_argument("--budget", type=_budget, help="sweep: budget for the allocation and graph figures "
                    "(default: the smallest)")
    pl.add_argument("--method", help="sweep: method whose plan colours the layer graph (default: the first)")
    for sp in (o, s, r, pl):
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress (INFO) to stderr; on an error, show the traceback")
    for sp in (o, s):
        sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars (default: shown on a terminal)")
    return p


def _natural_key(name: str) -> list[Any]:
    """``batch_2`` before ``batch_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _check_batch(i: int, batch: Any) -> None:
    import torch

    if isinstance(batch, torch.Tensor):
        parts = [batch]
    elif isinstance(batch, (list, tuple)) and batch:
        parts = list(batch)
    elif isinstance(batch, dict) and batch and all(isinstance(k, str) for k in batch):
        parts = list(batch.values())
    else:
        raise ValueError(f"batch {i} is a {type(batch).__name__}; a batch is a tensor, a tuple of tensors "
                         "or a dict of named tensors")
    if not all(isinstance(t, torch.Tensor) for t in parts):
        raise ValueError(f"batch {i} holds a non-tensor value")


def load_calibration(path: str) -> list[Any]:
    """The calibration batches in ``path`` (``--calibration``), in the form ``optimize(calibration=)`` takes.

    * ``.safetensors``: every tensor is one batch, in natural key order (``batch_2`` before ``batch_10``);
    * anything else: a file written by ``torch.save``, read with ``weights_only=True`` (no code
      runs), holding a list or tuple of batches (each a tensor, a tuple of tensors, or a dict of
      named tensors) or a single tensor, which is then one batch.
    """
    p = Path(path)
    where = f"--calibration {str(p)!r}"
    if not p.is_file():
        raise FileNotFoundError(f"{where} does not exist" if not p.exists() else f"{where} is not a file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(p))
            batches: Any = [tensors[k] for k in sorted(tensors, key=_natural_key)]
        else:
            import torch

            batches = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # SafetensorError, UnpicklingError (e.g. a pickle that would run code), EOFError, ...
        kind = "safetensors" if p.suffix == ".safetensors" else "torch.save (read with weights_only=True)"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{where} is not a readable {kind} file: {first}") from None
    import torch

    if isinstance(batches, torch.Tensor):
        batches = [batches]
    if not isinstance(batches, (list, tuple)):
        raise ValueError(f"{where} holds a {type(batches).__name__}; save a list of batches (or one tensor)")
    if not batches:
        raise ValueError(f"{where} holds no batches")
    for i, b in enumerate(batches):
        try:
            _check_batch(i, b)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return list(batches)


def _match_example(batches: list[Any], example: Any, path: str) -> None:
    """Tensor batches must match the example input in all but the batch dimension."""
    import torch

    if not isinstance(example, torch.Tensor):
        return
    for i, b in enumerate(batches):
        if isinstance(b, torch.Tensor) and tuple(b.shape[1:]) != tuple(example.shape[1:]):
            raise ValueError(f"--calibration {path!r}: batch {i} has shape {tuple(b.shape)}, but the model's "
                             f"example input is {tuple(example.shape)} (samples must agree in all but the "
                             "first dimension; see --input-shape)")


def _writable_dir(path: str) -> tuple[Path, bool]:
    """Make sure ``path`` is (or can be made) a writable directory; returns it and whether it was created."""
    import tempfile

    out = Path(path)
    existing = next((q for q in (out, *out.parents) if q.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "it is a file" if existing == out else f"{str(existing)!r} is a file"
        raise ValueError(f"--out {str(out)!r} cannot be a directory: {where}")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".autorank-write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"--out {str(out)!r} is not a writable directory: {exc.strerror or exc}") from None
    return out, created


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _optimize(args) -> None:
    out, created = _writable_dir(args.out)  # before any work: a bad --out must not cost a compression
    try:
        _run_optimize(args, out)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # leave no empty folder behind
        raise


def _run_optimize(args, out: Path) -> None:
    import networkx as nx

    import autorank
    from autorank.apps.models import load_model
    from autorank.apps.sweep import curves_data

    calibration = load_calibration(args.calibration) if args.calibration else None  # cheap checks first
    _seed_everything(args.seed)
    spec = load_model(args.model, args.checkpoint, args.input_shape,
                      shape_hint="pass --input-shape, e.g. --input-shape 1,3,32,32")
    if calibration is not None:
        _match_example(calibration, spec.example_inputs, args.calibration)
    compression = autorank.Compression(allocator=args.allocator, families=args.families)
    result = autorank.optimize(spec.model, args.budget, spec.example_inputs, metric=args.metric,
                               calibration=calibration, compression=compression,
                               progress=False if getattr(args, "quiet", False) else None)
    result.save(out)
    (out / CURVES_FILE).write_text(json.dumps(curves_data(result.curves)))
    if result.graph is not None:
        (out / GRAPH_FILE).write_text(json.dumps(nx.node_link_data(result.graph.graph, edges="edges"), default=str))
    print(result.summary())
    print(f"\nwrote {out / 'plan.json'} and {out / 'model.safetensors'} (plot them: autorank plot {out})")


def _sweep(args) -> None:
    from autorank.apps.sweep import load_config, results_table, run_sweep

    cfg = load_config(args.config)
    out = Path(args.out) if args.out else Path("budgets") / "out" / Path(args.config).stem
    state = run_sweep(cfg, out, resume=not args.no_resume,
                      progress=False if getattr(args, "quiet", False) else None)
    print(results_table(state))
    print(f"\nwrote {out / 'results.csv'} and {out / 'results.json'}")
    if args.plot:
        _plot(argparse.Namespace(dir=out, budget=None, method=None))


_MALFORMED = (ValueError, KeyError, TypeError, AttributeError, IndexError)  # what a hand-edited JSON file raises


def _read_error(f: Path, exc: Exception) -> ValueError:
    msg = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
    return ValueError(msg if str(f) in msg else f"{str(f)!r} is not a valid autorank file: {msg}")


def _report(args) -> None:
    from autorank.apps.sweep import RESULTS_JSON, read_results, results_table
    from autorank.io import PLAN_FILE, load_plan

    d = Path(args.dir)
    if (d / PLAN_FILE).is_file():
        try:
            text = load_plan(d).summary()
        except _MALFORMED as exc:
            raise _read_error(d / PLAN_FILE, exc) from exc
        print(text)
    elif (d / RESULTS_JSON).is_file():
        f = d / RESULTS_JSON
        try:
            state = read_results(d)
        except _MALFORMED as exc:
            raise _read_error(f, exc) from exc
        rows = state.get("rows") if isinstance(state, dict) else None
        if not isinstance(rows, list) or not rows:
            what = "no sweep rows" if isinstance(rows, list) else "no 'rows' list"
            raise ValueError(f"{str(f)!r} has {what}; was it written by autorank sweep (and did a row finish)?")
        try:
            text = results_table(state)
        except _MALFORMED as exc:
            raise _read_error(f, exc) from exc
        print(text)
    elif not d.is_dir():
        raise FileNotFoundError(f"{str(d)!r} is not a directory")
    else:
        raise FileNotFoundError(f"{str(d)!r} has neither {PLAN_FILE} (autorank optimize) nor {RESULTS_JSON} "
                                "(autorank sweep)")


def _plot(args) -> None:
    from autorank.apps.plots import plot_result, plot_sweep
    from autorank.apps.sweep import RESULTS_JSON
    from autorank.io import PLAN_FILE

    d = Path(args.dir)
    if not (d / PLAN_FILE).is_file() and not (d / RESULTS_JSON).is_file():
        raise FileNotFoundError(f"{str(d)!r} has neither {RESULTS_JSON} (autorank sweep) nor {PLAN_FILE} "
                                "(autorank optimize) to plot")
    if (d / PLAN_FILE).is_file() and not (d / RESULTS_JSON).is_file():
        if args.budget is not None or args.method is not None:
            raise ValueError(f"--budget and --method pick a sweep row; {str(d)!r} holds one plan (autorank optimize)")
        try:
            paths = plot_result(d)
        except (KeyError, AttributeError, IndexError) as exc:
            raise _read_error(d / PLAN_FILE, exc) from exc
    else:
        try:
            paths = plot_sweep(d, budget=args.budget, method=args.method)
        except (KeyError, AttributeError, IndexError) as exc:
            raise _read_error(d / RESULTS_JSON, exc) from exc
    for p in paths:
        print(p)


def _one_line(exc: BaseException, command: str) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if command == "optimize":
        for pattern, cli in CLI_TERMS:
            msg = pattern.sub(cli, msg)
    return msg


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autorank`` command; returns the exit status.

    Bad arguments exit through argparse (``SystemExit(2)``, one line); ``--help`` and
    ``--version`` through ``SystemExit(0)``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    commands = {"optimize": _optimize, "sweep": _sweep, "report": _report, "plot": _plot}
    try:
        commands[args.command](args)
    except USER_ERRORS as exc:
        if verbose:
            raise  # -v: the full traceback, for debugging
        print(f"autorank: error: {_one_line(exc, args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autorank: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not the user's doing: still one line, and how to see more
        if verbose:
            raise
        print(f"autorank: error: unexpected {type(exc).__name__}: {_one_line(exc, args.command)} "
              "(run with -v for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
