"""The ``autorank`` command line on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import autorank
from autorank.apps.cli import main
from autorank.apps.models import ModelSpec, register_model
from tiny_models import build

BUILT: list[str] = []  # names of the registered models built, to tell whether work started


def _counted(name):
    def builder():
        BUILT.append(name)
        return ModelSpec(*build("mlp"))
    return builder


def _unseeded():
    """A model whose weights come from the global RNG (like torchvision's untrained models)."""
    return ModelSpec(nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 16)), torch.zeros(2, 24))


@pytest.fixture(autouse=True)
def tiny_registered():
    register_model("tiny-mlp", _counted("tiny-mlp"))
    register_model("tiny-unseeded", _unseeded)
    BUILT.clear()


def cli(argv) -> int:
    """main(argv), with argparse's SystemExit turned into the exit status it carries."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def assert_one_line_error(capsys, code, needle):
    captured = capsys.readouterr()
    assert code == 2, captured
    err = captured.err
    assert err.startswith("autorank: error: ") and needle in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_optimize_then_report(tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["optimize", "tiny-mlp", "--budget", "0.4", "--out", str(out)]) == 0
    assert (out / "plan.json").is_file() and (out / "model.safetensors").stat().st_size > 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["budget"] == 0.4 and plan["totals"]["params"] <= 0.4 * plan["totals"]["params_before"]
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fc1" in text and "budget: 0.4000 of params" in text


def test_sweep_report_plot(tmp_path, capsys):
    cfg = tmp_path / "s.toml"
    cfg.write_text('model = "tiny-mlp"\nbudgets = [0.6, 0.4]\n[[methods]]\nname = "alds"\n'
                   '[[methods]]\nname = "uniform"\nallocator = "uniform"\n[latency]\nrepeats = 2\nthreads = 1\n')
    out = tmp_path / "out"
    assert main(["sweep", str(cfg), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"results.csv", "results.json", "graph.json", "curves.json"}
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 4
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.count("uniform") == 2
    assert main(["plot", str(out), "--budget", "0.6"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 8 and any(p.endswith("allocation_0p6.png") for p in printed)


@pytest.mark.parametrize("argv, needle", [
    (["optimize", "no-such-model", "--budget", "0.5", "--out", "x"], "unknown model"),
    (["optimize", "tiny-mlp", "--budget", "1.5", "--out", "x"], "budget"),
    (["optimize", "tiny-mlp", "--budget", "0.5", "--allocator", "zzz", "--out", "x"], "'zzz'"),
    (["optimize", "tiny-mlp", "--budget", "0.5", "--input-shape", "2,7", "--out", "x"], "forward pass"),
    (["sweep", "missing.toml"], "missing.toml"),
    (["report", "/nonexistent-dir"], "/nonexistent-dir"),
    (["plot", "/nonexistent-dir"], "results.json"),
], ids=["model", "budget", "allocator", "input-shape", "config", "report", "plot"])
def test_user_errors_are_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("autorank: error: ") and needle in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("sub", ["", "optimize", "sweep", "report", "plot"])
def test_help_everywhere(sub, capsys):
    with pytest.raises(SystemExit) as info:
        main([*([sub] if sub else []), "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: autorank {sub}".rstrip())


def test_module_entry_point_help_and_error_status(tmp_path):
    """``python -m autorank.apps.cli``: --help works, a user error exits 2 with one line and no traceback."""
    ok = subprocess.run([sys.executable, "-m", "autorank.apps.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "optimize" in ok.stdout and "sweep" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "autorank.apps.cli", "report", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("autorank: error: ") and bad.stdout == ""
    assert bad.stderr.count("\n") == 1


# ---- issue #15 item 8: every case is one line and exit status 2, never a traceback --------------------

@pytest.fixture(scope="module")
def saved_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "res"
    register_model("tiny-mlp", _counted("tiny-mlp"))
    assert main(["optimize", "tiny-mlp", "--budget", "0.5", "-q", "--out", str(out)]) == 0
    return json.loads((out / "plan.json").read_text())


def _plan_without_layers(tmp_path, plan):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "plan.json").write_text(json.dumps({k: v for k, v in plan.items() if k != "layers"}))
    return ["report", str(d)]


def _plan_layers_dict(tmp_path, plan):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "plan.json").write_text(json.dumps({**plan, "layers": {"fc1": 1}}))
    return ["report", str(d)]


def _plan_not_json(tmp_path, plan):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "plan.json").write_text("{not json")
    return ["report", str(d)]


def _empty_results(tmp_path, plan):
    d = tmp_path / "sweep"
    d.mkdir()
    (d / "results.json").write_text("{}")
    return ["report", str(d)]


def _out_under_a_file(tmp_path, plan):
    (tmp_path / "file").write_text("x")
    return ["optimize", "tiny-mlp", "--budget", "0.5", "--out", str(tmp_path / "file" / "sub")]


def _out_is_a_file(tmp_path, plan):
    (tmp_path / "file").write_text("x")
    return ["optimize", "tiny-mlp", "--budget", "0.5", "--out", str(tmp_path / "file")]


def _garbage(suffix):
    def make(tmp_path, plan):
        f = tmp_path / f"weights{suffix}"
        f.write_bytes(b"\x00garbage, not weights" * 10)
        return ["optimize", "tiny-mlp", "--budget", "0.5", "--checkpoint", str(f), "--out", str(tmp_path / "o")]
    return make


def _user_module(tmp_path, body):
    (tmp_path / "user_models.py").write_text(body)
    sys.path.insert(0, str(tmp_path))
    sys.modules.pop("user_models", None)


def _builder_raises(tmp_path, plan):
    _user_module(tmp_path, "def make():\n    return {}['missing key']\n")
    return ["optimize", "user_models:make", "--budget", "0.5", "--out", str(tmp_path / "o")]


def _module_raises_on_import(tmp_path, plan):
    _user_module(tmp_path, "raise RuntimeError('broken on import')\ndef make():\n    pass\n")
    return ["optimize", "user_models:make", "--budget", "0.5", "--out", str(tmp_path / "o")]


def _no_example(tmp_path, plan):
    _user_module(tmp_path, "import torch.nn as nn\ndef make():\n    return nn.Linear(4, 4)\n")
    return ["optimize", "user_models:make", "--budget", "0.5", "--out", str(tmp_path / "o")]


def _args(*argv):
    return lambda tmp_path, plan: [a.replace("OUT", str(tmp_path / "o")) for a in argv]


@pytest.mark.parametrize("make_argv, needle", [
    (_plan_without_layers, "plan.json"),
    (_plan_layers_dict, "plan.json"),
    (_plan_not_json, "plan.json"),
    (_empty_results, "results.json' has no 'rows'"),
    (_out_under_a_file, "is a file"),
    (_out_is_a_file, "it is a file"),
    (_garbage(".safetensors"), "not a readable safetensors file"),
    (_garbage(".pt"), "not a readable torch.save"),
    (_builder_raises, "make() raised KeyError"),
    (_module_raises_on_import, "RuntimeError: broken on import"),
    (_no_example, "--input-shape"),
    (_args("optimize", "tiny-mlp", "--budget", "abc", "--out", "OUT"), "argument --budget: budget must be a number"),
    (_args("optimize", "tiny-mlp", "--budget", "nan", "--out", "OUT"), "'nan'"),
    (_args("optimize", "tiny-mlp", "--budget", "0.5", "--seed", "-3", "--out", "OUT"), "seed must be"),
    (_args("optimize", "tiny-mlp", "--budget", "0.5", "--input-shape", "a,b", "--out", "OUT"), "input shape"),
    (_args("optimize", "tiny-mlp", "--out", "OUT"), "required: --budget"),
    (_args("optimize", "tiny-mlp", "--budget", "0.5", "--metric", "bytes", "--out", "OUT"), "invalid choice"),
    (_args("plot", "OUT", "--budget", "x"), "argument --budget"),
    (_args("frobnicate"), "invalid choice"),
    (_args("optimize", "tiny-mlp", "--budget", "0.5", "--allocator", "pca", "--out", "OUT"),
     "pass --calibration FILE"),
], ids=["plan-no-layers", "plan-layers-dict", "plan-not-json", "results-empty", "out-under-file", "out-is-file",
        "garbage-safetensors", "garbage-pt", "builder-raises", "module-raises", "no-example-input", "budget-abc",
        "budget-nan", "seed-negative", "input-shape-abc", "missing-budget", "metric-choice", "plot-budget",
        "unknown-command", "pca-needs-calibration"])
def test_cli_errors_are_one_line_exit_2(make_argv, needle, saved_plan, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # _user_module's insert is undone
    argv = make_argv(tmp_path, saved_plan)
    capsys.readouterr()
    err = assert_one_line_error(capsys, cli(argv), needle)
    assert "calibration=" not in err and "in the config" not in err  # CLI terms, not the API's
    assert BUILT == [] or "--out" not in err  # a bad --out is found before the model is even built
    assert not (tmp_path / "o").exists()  # no half-written (or empty) output folder


def test_out_checked_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["optimize", "tiny-mlp", "--budget", "0.5", "--out", str(tmp_path / "file" / "sub")]) == 2
    assert BUILT == []  # the model was never built, let alone compressed
    assert (tmp_path / "file").read_text() == "x"


def test_verbose_shows_the_cause(tmp_path, monkeypatch):
    _user_module(tmp_path, "def make():\n    return 1 / 0\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(ValueError, match="ZeroDivisionError") as info:
        main(["-v", "optimize", "user_models:make", "--budget", "0.5", "--out", str(tmp_path / "o")])
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_unexpected_errors_are_one_line_too(monkeypatch, tmp_path, capsys):
    """An exception the CLI does not foresee (a bug): status 1, one line, and how to see the traceback."""
    def bug(*args, **kwargs):
        raise LookupError("a bug")
    monkeypatch.setattr("autorank.apps.plots.plot_sweep", bug)
    (tmp_path / "results.json").write_text("{}")
    code = main(["plot", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "unexpected LookupError: a bug" in err and "-v" in err


# ---- issue #17 section 4: CLI wording, --version, --seed, --calibration, plot on one result ----------

def test_version(capsys):
    assert cli(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"autorank {autorank.__version__}"


def test_seed_makes_runs_identical(tmp_path):
    outs = {}
    for name, extra in (("a", []), ("b", []), ("c", ["--seed", "1"])):
        torch.randn(7)  # a different global RNG state before every run
        assert main(["optimize", "tiny-unseeded", "--budget", "0.4", "-q", *extra, "--out", str(tmp_path / name)]) == 0
        outs[name] = ((tmp_path / name / "plan.json").read_text(), (tmp_path / name / "model.safetensors").read_bytes())
    assert outs["a"] == outs["b"]  # the default --seed 0: the same command writes the same plan and weights
    assert outs["a"][1] != outs["c"][1] and outs["a"][0] != outs["c"][0]  # another seed: another model


def _calibration_files(tmp_path, n=3):
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(16, 32, generator=g) for _ in range(n)]
    pt = tmp_path / "cal.pt"
    torch.save(batches, pt)
    st = tmp_path / "cal.safetensors"
    from safetensors.torch import save_file
    save_file({f"batch_{i}": b for i, b in enumerate(batches)}, str(st))
    return batches, pt, st


def test_calibration_formats_read_the_same(tmp_path):
    from autorank.apps.cli import load_calibration

    batches, pt, st = _calibration_files(tmp_path, n=12)  # batch_10 and batch_11 come after batch_9
    for f in (pt, st):
        got = load_calibration(str(f))
        assert len(got) == 12 and all(torch.equal(a, b) for a, b in zip(got, batches))
    torch.save(batches[0], pt)  # one tensor: one batch
    assert [b.shape for b in load_calibration(str(pt))] == [(16, 32)]


def test_calibration_file_makes_it_data_aware(tmp_path, saved_plan):
    _, pt, _ = _calibration_files(tmp_path)
    assert main(["optimize", "tiny-mlp", "--budget", "0.5", "-q", "--calibration", str(pt),
                 "--out", str(tmp_path / "o")]) == 0
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert saved_plan["config"]["data_aware"] is False and saved_plan["budget"] == 0.5
    assert plan["config"]["data_aware"] is True and plan["config"]["allocator"] == "alds_output"
    assert [lp["error"] for lp in plan["layers"]] != [lp["error"] for lp in saved_plan["layers"]]  # measured on data


class _Evil:
    def __reduce__(self):
        return (print, ("this ran",))


@pytest.mark.parametrize("content, needle", [
    (lambda: [torch.randn(4, 9)], "batch 0 has shape (4, 9)"),
    (lambda: [torch.randn(4, 32), "text"], "batch 1 is a str"),
    (lambda: [], "holds no batches"),
    (lambda: {"a": 1}, "holds a dict"),
    (lambda: [_Evil()], "weights_only=True"),
    (None, "not a readable torch.save"),
], ids=["shape", "not-a-batch", "empty", "dict", "crafted-pickle", "garbage"])
def test_bad_calibration_file(content, needle, tmp_path, capsys):
    f = tmp_path / "cal.pt"
    if content is None:
        f.write_bytes(b"garbage" * 20)
    else:
        torch.save(content(), f)
    code = main(["optimize", "tiny-mlp", "--budget", "0.4", "--calibration", str(f), "--out", str(tmp_path / "o")])
    out = assert_one_line_error(capsys, code, needle)
    assert "this ran" not in out


def test_quiet_and_default_progress(tmp_path, monkeypatch):
    seen = []
    real = autorank.optimize

    def spy(*args, **kwargs):
        seen.append(kwargs.get("progress", "missing"))
        return real(*args, **kwargs)
    monkeypatch.setattr(autorank, "optimize", spy)
    assert main(["optimize", "tiny-mlp", "--budget", "0.5", "--out", str(tmp_path / "a")]) == 0
    assert main(["optimize", "tiny-mlp", "--budget", "0.5", "-q", "--out", str(tmp_path / "b")]) == 0
    assert main(["-q", "optimize", "tiny-mlp", "--budget", "0.5", "--out", str(tmp_path / "c")]) == 0
    assert seen == [None, False, False]  # None: bars only on a terminal


@pytest.mark.parametrize("argv, expected", [
    (["sweep", "CFG"], None),
    (["sweep", "CFG", "-q"], False),
    (["-q", "sweep", "CFG"], False),
], ids=["default", "sub-q", "top-q"])
def test_sweep_quiet(argv, expected, tmp_path, monkeypatch):
    import autorank.apps.sweep as sweep_app

    seen = []
    monkeypatch.setattr(sweep_app, "load_config", lambda path: path)
    monkeypatch.setattr(sweep_app, "run_sweep", lambda cfg, out, resume, progress="missing": seen.append(progress) or {})
    monkeypatch.setattr(sweep_app, "results_table", lambda state: "")
    argv = [str(tmp_path / "c.toml") if a == "CFG" else a for a in argv] + ["--out", str(tmp_path / "o")]
    assert main(argv) == 0
    assert seen == [expected]


def test_plot_one_optimize_result(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "res"
    assert main(["optimize", "tiny-mlp", "--budget", "0.4", "-q", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"plan.json", "model.safetensors", "curves.json", "graph.json"}
    capsys.readouterr()
    assert main(["plot", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(out / "plots" / f"{n}.{e}") for n in ("allocation", "error_curves", "graph")
                                     for e in ("png", "svg"))
    assert all((out / "plots" / f"{n}.png").stat().st_size > 5000 for n in ("allocation", "error_curves", "graph"))
    assert main(["plot", str(out), "--budget", "0.4"]) == 2  # --budget picks a sweep row; here there is one plan
