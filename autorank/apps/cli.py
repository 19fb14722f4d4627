"""The ``autorank`` command line: optimize, sweep, report, plot.

    autorank optimize MODEL --budget 0.3 [--metric params] --out DIR
    autorank sweep CONFIG [--out DIR] [--no-resume] [--plot]
    autorank report DIR
    autorank plot DIR [--budget B] [--method NAME]

MODEL is a model spec as in sweep configs (see :func:`autorank.apps.models.load_model`).
User errors print one line, ``autorank: error: ...``, to stderr and exit with status 2
(with ``-v`` the traceback is shown instead).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "build_parser"]

MODEL_HELP = ("model spec: a registered name (mnist_cnn), 'torchvision:<name>' (untrained, 1x3x224x224 "
              "input) or 'pkg.module:function' returning an nn.Module")


def _budget(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number in (0, 1], got {text!r}") from None


def _shape(text: str) -> list[int]:
    try:
        shape = [int(t) for t in text.replace("x", ",").split(",") if t]
    except ValueError:
        shape = []
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"input shape must look like 1,3,32,32, got {text!r}")
    return shape


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autorank", description="Low-rank compression of PyTorch models under a "
                                "parameter or FLOP budget (ALDS).")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) to stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    o = sub.add_parser("optimize", help="compress one model to one budget and save plan + weights",
                       description="Compress MODEL so that at most BUDGET of its parameters (or MACs) remain; "
                       "writes plan.json and model.safetensors into --out and prints the plan.")
    o.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    o.add_argument("--budget", type=_budget, required=True, help="fraction in (0, 1] of the model that may remain")
    o.add_argument("--metric", choices=("params", "flops"), default="params", help="what the budget counts")
    o.add_argument("--allocator", default="alds",
                   help="rank-selection rule: alds (default), alds_output, uniform, svd_energy, lrank, vbmf, "
                   "sensitivity (pca needs calibration data, which the CLI does not take)")
    o.add_argument("--families", nargs="+", default=None, metavar="FAMILY",
                   help="decomposition families competing per layer (default: alds); e.g. alds tucker2 cp")
    o.add_argument("--checkpoint", help="weights for MODEL (safetensors or a torch.save'd state_dict)")
    o.add_argument("--input-shape", type=_shape, help="example input shape, e.g. 1,3,32,32")
    o.add_argument("--out", required=True, help="output directory")

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

    pl = sub.add_parser("plot", help="draw the figures of a sweep directory",
                        description="Write PNG and SVG figures of a sweep directory into DIR/plots/.")
    pl.add_argument("dir", metavar="DIR", help="sweep output directory")
    pl.add_argument("--budget", type=_budget, help="budget for the allocation and graph figures "
                    "(default: the smallest)")
    pl.add_argument("--method", help="method whose plan colours the layer graph (default: the first)")
    for sp in (o, s, r, pl):
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress (INFO) to stderr")
    return p


def _optimize(args) -> None:
    import autorank
    from autorank.apps.models import load_model

    spec = load_model(args.model, args.checkpoint, args.input_shape)
    compression = autorank.Compression(allocator=args.allocator, families=args.families)
    result = autorank.optimize(spec.model, args.budget, spec.example_inputs, metric=args.metric,
                               compression=compression, progress=False)
    out = result.save(args.out)
    print(result.summary())
    print(f"\nwrote {out / 'plan.json'} and {out / 'model.safetensors'}")


def _sweep(args) -> None:
    from autorank.apps.sweep import load_config, results_table, run_sweep

    cfg = load_config(args.config)
    out = Path(args.out) if args.out else Path("budgets") / "out" / Path(args.config).stem
    state = run_sweep(cfg, out, resume=not args.no_resume)
    print(results_table(state))
    print(f"\nwrote {out / 'results.csv'} and {out / 'results.json'}")
    if args.plot:
        _print_plots(out, None, None)


def _report(args) -> None:
    from autorank.apps.sweep import RESULTS_JSON, read_results, results_table
    from autorank.io import PLAN_FILE, load_plan

    d = Path(args.dir)
    if (d / PLAN_FILE).is_file():
        print(load_plan(d).summary())
    elif (d / RESULTS_JSON).is_file():
        print(results_table(read_results(d)))
    else:
        raise FileNotFoundError(f"{str(d)!r} has neither {PLAN_FILE} (autorank optimize) nor {RESULTS_JSON} "
                                "(autorank sweep)")


def _print_plots(d, budget, method) -> None:
    from autorank.apps.plots import plot_sweep

    for p in plot_sweep(d, budget=budget, method=method):
        print(p)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autorank`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    commands = {"optimize": _optimize, "sweep": _sweep, "report": _report,
                "plot": lambda a: _print_plots(a.dir, a.budget, a.method)}
    try:
        commands[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        # RuntimeError: autorank.analyze reports a forward pass that failed on the example input
        if getattr(args, "verbose", False):
            raise  # -v: the full traceback, for debugging
        msg = " ".join(str(exc).split())  # one line
        print(f"autorank: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
