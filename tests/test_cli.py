"""The ``autorank`` command line on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from autorank.apps.cli import main
from autorank.apps.models import ModelSpec, register_model
from tiny_models import build


@pytest.fixture(autouse=True)
def tiny_registered():
    register_model("tiny-mlp", lambda: ModelSpec(*build("mlp")))


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
    assert main(argv) == 2
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
