"""Budget sweeps: config validation, one shared analysis, resume."""

from __future__ import annotations

import csv
import json

import pytest

import autorank.api
import autorank.curves
from autorank.apps.sweep import (
    CSV_COLUMNS, ModelSpec, SweepConfig, load_config, load_model, run_sweep,
)
from tiny_models import build

BASE = {"model": "tiny", "budgets": [0.6, 0.4], "methods": [{"name": "alds"}],
        "latency": {"repeats": 2, "threads": 1}}

# (id, change to BASE, substring the error message must contain)
BAD_CONFIGS = [
    ("unknown-top-key", {"budgetz": [0.5]}, "budgetz"),
    ("missing-budgets", {"budgets": None}, "budgets"),
    ("metric", {"metric": "bytes"}, "'bytes'"),
    ("budget-above-1", {"budgets": [0.5, 1.5]}, "1.5"),
    ("budget-not-number", {"budgets": ["half"]}, "'half'"),
    ("duplicate-budget", {"budgets": [0.5, 0.5]}, "duplicate"),
    ("no-methods", {"methods": []}, "methods"),
    ("allocator", {"methods": [{"name": "m", "allocator": "greedy"}]}, "'greedy'"),
    ("method-key", {"methods": [{"name": "m", "rank": 3}]}, "'rank'"),
    ("solver-objective", {"methods": [{"name": "m", "solver": {"objective": "mean"}}]}, "'mean'"),
    ("family", {"methods": [{"name": "m", "families": ["tucker9"]}]}, "'tucker9'"),
    ("duplicate-method", {"methods": [{"name": "a"}, {"name": "a"}]}, "duplicate"),
    ("data", {"data": "imagenet"}, "'imagenet'"),
    ("finetune-without-data", {"finetune": {"epochs": 1}}, "finetune"),
    ("finetune-epochs", {"data": "mnist", "finetune": {"epochs": -1}}, "finetune.epochs"),
    ("finetune-key", {"data": "mnist", "finetune": {"epoch": 1}}, "'epoch'"),
    ("latency-repeats", {"latency": {"repeats": 0}}, "latency.repeats"),
    ("input-shape", {"input_shape": [1, -3]}, "input_shape"),
]


@pytest.mark.parametrize("change, needle", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_the_key_or_value(change, needle):
    data = {**BASE, **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ValueError, match=None) as info:
        SweepConfig.from_dict(data)
    assert needle in str(info.value), str(info.value)


def test_toml_file_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('model = "tiny"\nbudgets = [0.5\n')
    with pytest.raises(ValueError, match="bad.toml"):
        load_config(f)
    f.write_text('model = "tiny"\nbudgets = [0.5]\nmetric = "watts"\n[[methods]]\nname = "a"\n')
    with pytest.raises(ValueError, match="watts"):
        load_config(f)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml")


def test_shipped_mnist_config_is_valid():
    cfg = load_config("budgets/mnist_cnn.toml")
    assert [m.name for m in cfg.methods] == ["alds", "uniform", "alds-sum"]
    assert cfg.budgets == (0.5, 0.3, 0.15, 0.08)
    assert cfg.methods[2].solver_config().objective == "sum"
    assert cfg.finetune is not None and cfg.finetune.distill


@pytest.mark.parametrize("spec, needle", [
    ("no_such_model", "unknown model"),
    ("torchvision:resnet9000", "resnet9000"),
    ("autorank.nope:fn", "autorank.nope"),
    ("os:getcwd", "not an nn.Module"),
], ids=["unknown", "torchvision-name", "import", "not-a-module"])
def test_load_model_errors(spec, needle):
    with pytest.raises(ValueError, match=needle):
        load_model(spec)


def test_load_model_import_path_uses_example_and_checkpoint(tmp_path):
    from safetensors.torch import save_file

    model, _ = build("mlp", seed=3)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    spec = load_model("tiny_models:MLP", checkpoint=tmp_path / "w.safetensors")
    assert tuple(spec.example_inputs.shape) == (4, 32)
    assert all((a == b).all() for a, b in zip(spec.model.state_dict().values(), model.state_dict().values()))
    with pytest.raises(FileNotFoundError):
        load_model("tiny_models:MLP", checkpoint=tmp_path / "none.safetensors")


@pytest.fixture
def counted(monkeypatch):
    """Count calls of the expensive steps that run_sweep looks up at call time."""
    calls = {"build_curves": 0, "allocate": 0}

    def wrap(mod, name):
        real = getattr(mod, name)

        def fn(*a, **k):
            calls[name] += 1
            return real(*a, **k)
        monkeypatch.setattr(mod, name, fn)

    wrap(autorank.pipeline, "build_curves")  # where the one pipeline calls them
    wrap(autorank.pipeline, "allocate")
    return calls


def _spec():
    model, x = build("mlp")
    return ModelSpec(model, x)


def test_resume_skips_finished_rows(tmp_path, counted):
    two = SweepConfig.from_dict({**BASE, "methods": [{"name": "alds"}, {"name": "uni", "allocator": "uniform"}]})
    state = run_sweep(two, tmp_path, model_spec=_spec())
    assert len(state["rows"]) == 4
    assert counted == {"build_curves": 1, "allocate": 4}  # curves shared by both methods and both budgets

    run_sweep(two, tmp_path, model_spec=_spec())
    assert counted == {"build_curves": 1, "allocate": 4}  # nothing left to do

    three = SweepConfig.from_dict({**BASE, "budgets": [0.6, 0.4, 0.3],
                                   "methods": [{"name": "alds"}, {"name": "uni", "allocator": "uniform"}]})
    state = run_sweep(three, tmp_path, model_spec=_spec())
    assert counted["allocate"] == 6  # only the two new rows
    assert [(r["method"], r["budget"]) for r in state["rows"][-2:]] == [("alds", 0.3), ("uni", 0.3)]

    state = run_sweep(three, tmp_path, resume=False, model_spec=_spec())
    assert counted["allocate"] == 12 and len(state["rows"]) == 6


def test_resume_refuses_a_different_metric(tmp_path):
    run_sweep(SweepConfig.from_dict(BASE), tmp_path, model_spec=_spec())
    with pytest.raises(ValueError, match="metric"):
        run_sweep(SweepConfig.from_dict({**BASE, "metric": "flops"}), tmp_path, model_spec=_spec())


def test_rows_are_measured_and_within_budget(tmp_path):
    cfg = SweepConfig.from_dict({**BASE, "metric": "flops", "budgets": [0.5, 0.001]})
    state = run_sweep(cfg, tmp_path, model_spec=_spec())
    ok, bad = state["rows"]
    base = state["baseline"]
    assert ok["status"] == "ok" and ok["flops"] <= 0.5 * base["flops"]
    assert ok["latency_ms"] > 0 and ok["speedup"] > 0 and ok["max_error"] > 0
    assert ok["plan"]["totals"]["flops"] == ok["flops"]
    compressed = {lp["name"] for lp in ok["plan"]["layers"] if lp["family"] != "dense"}
    assert {r["name"] for r in ok["layer_latency"]} == compressed
    assert ok["slower_layers"] == " ".join(r["name"] for r in ok["layer_latency"] if r["slower"])
    assert bad["status"].startswith("infeasible") and "smallest reachable budget" in bad["status"]
    with open(tmp_path / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 2
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["plan"]["version"] == 1
    assert (tmp_path / "graph.json").is_file() and (tmp_path / "curves.json").is_file()
