"""The one pipeline: grouped settings, the legacy keywords, one settings record, one fine-tune protocol."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import autorank
from autorank.api import LEGACY_KEYWORDS
from autorank.config import SCHEDULE_NAMES, Compression, CurveConfig, DataAware, Retrain, SolverConfig
from autorank.finetune import FinetuneContext
from autorank.pipeline import CompressStep, Settings
from autorank.refine import output_fidelity
from autorank.retrain import SCHEDULES, STATE_FILE
from tiny_models import build

DATA = Path(__file__).parent / "data"


def _calibration(x, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(x.shape, generator=g) for _ in range(n)]


# ---- configs round-trip through JSON --------------------------------------------------------------

CONFIGS = [
    CurveConfig(families=("alds", "tucker2"), max_groups=4, options={"tucker2": {"hooi_iters": 3}}),
    SolverConfig(objective="sum", method="dp", dp_bins=500),
    Compression(families=("alds", "cp"), exclude=("head", "fc*"), allocator="uniform", embeddings=True,
                solver=SolverConfig(objective="sum")),
    DataAware(output_weighting=False, sequential=True),
    Retrain(schedule=(0.7, 0.5, 0.3), mode="one-shot", min_metric=0.5, checkpoint="ckpt"),
    Retrain(),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_every_config_round_trips_through_json(config):
    text = json.dumps(config.to_dict())
    back = type(config).from_dict(json.loads(text)) if hasattr(type(config), "from_dict") else type(config)(
        **json.loads(text))
    assert back == config


def test_settings_round_trip_and_record_the_same_keys_as_plan_config():
    s = Settings("flops", Compression(families=("alds",), exclude=("head",)), DataAware(sequential=True))
    assert Settings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    model, x = build("mlp")
    result = autorank.optimize(model, 0.5, x, metric="flops", compression=s.compression, data=s.data,
                               calibration=_calibration(x))
    assert result.plan.config == s.record(calibrated=True)


@pytest.mark.parametrize("kwargs,err,match", [
    ({"compression": 3}, TypeError, "compression must be a Compression"),
    ({"data": "yes"}, TypeError, "data must be a DataAware"),
    ({"retrain": [1]}, TypeError, "retrain must be a Retrain"),
    ({"compression": {"allocator": 5}}, TypeError, "Compression.allocator must be a name or a callable, got 5"),
    ({"compression": {"exclude": [1]}}, TypeError, "Compression.exclude must hold name patterns"),
    ({"compression": {"embeddings": "no"}}, TypeError, "Compression.embeddings must be a bool, got 'no'"),
    ({"compression": {"allocator": "nope"}}, ValueError, "unknown allocator 'nope'"),
    ({"data": {"sequential": 1}}, TypeError, "DataAware.sequential must be a bool or None, got 1"),
    ({"data": {"output_weighting": True}}, ValueError, "output_weighting=True uses calibration data"),
    ({"data": {"output": 3}}, TypeError, "DataAware.output must be a callable"),
    ({"retrain": {"mode": "zigzag"}}, ValueError, "mode must be one of"),
    ({"retrain": {"schedule": [0.5, 0.6]}}, ValueError, "budgets must decrease strictly"),
    ({"retrain": {"schedule": "cubic"}}, ValueError, "schedule must be one of"),
    ({"retrain": {"min_metric": "high"}}, TypeError, "min_metric must be a number, got 'high'"),
    ({"families": ["alds"], "compression": Compression()}, TypeError, "pass families= inside compression="),
    ({"colour": "red"}, TypeError, "unexpected keyword argument"),
])
def test_bad_grouped_settings_name_the_value(kwargs, err, match):
    model, x = build("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(err, match=match):
        autorank.optimize(model, 0.5, x, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_config_from_dict_rejects_unknown_keys_by_name():
    with pytest.raises(ValueError, match=r"Compression: unknown key\(s\) \['famlies'\]"):
        Compression.from_dict({"famlies": ["alds"]})


def test_the_schedule_names_of_the_config_are_the_schedules_that_run():
    assert set(SCHEDULE_NAMES) == set(SCHEDULES)


# ---- the legacy keywords fold into their groups ------------------------------------------------------

def _finetune(model, step):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.999)


LEGACY = [
    ("families", {"families": ["alds", "spatial_svd"]}, {"compression": Compression(families=("alds", "spatial_svd"))}),
    ("allocator", {"allocator": "uniform"}, {"compression": Compression(allocator="uniform")}),
    ("exclude", {"exclude": "head"}, {"compression": Compression(exclude=("head",))}),
    ("solver", {"solver": {"objective": "sum"}}, {"compression": Compression(solver=SolverConfig(objective="sum"))}),
    ("curves", {"curves": {"max_groups": 2}}, {"compression": Compression(curves=CurveConfig(max_groups=2))}),
    ("sequential", {"sequential": True, "calib": True}, {"data": DataAware(sequential=True), "calib": True}),
    ("output_weighting", {"output_weighting": True, "calib": True},
     {"data": DataAware(output_weighting=True), "calib": True}),
    ("schedule", {"schedule": "linear", "steps": 2, "finetune": _finetune},
     {"retrain": Retrain(schedule="linear"), "steps": 2, "finetune": _finetune}),
    ("mode", {"mode": "one-shot", "steps": 2, "finetune": _finetune},
     {"retrain": Retrain(mode="one-shot"), "steps": 2, "finetune": _finetune}),
]


@pytest.mark.parametrize("name,old,new", LEGACY, ids=[c[0] for c in LEGACY])
def test_a_legacy_keyword_warns_and_gives_the_grouped_result(name, old, new):
    assert name in LEGACY_KEYWORDS
    plans = []
    for kw, legacy in ((old, True), (new, False)):
        kw = dict(kw)
        model, x = build("residual_cnn")
        if kw.pop("calib", False):
            kw["calibration"] = _calibration(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plans.append(autorank.optimize(model, 0.5, x, **kw).plan.to_json())
        deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning) and name in str(w.message)]
        assert bool(deprecations) == legacy
    assert plans[0] == plans[1]


# ---- one record: plan.config and the checkpoint fingerprint ------------------------------------------

def test_the_checkpoint_fingerprint_is_written_from_the_plan_config_record(tmp_path):
    model, x = build("mlp")
    result = autorank.optimize(model, 0.4, x, finetune=_finetune, steps=2, calibration=_calibration(x),
                               data=DataAware(sequential=True, output_weighting=True),
                               retrain=Retrain(checkpoint=tmp_path))
    state = json.loads((tmp_path / STATE_FILE).read_text())
    record = {k: v for k, v in state["fingerprint"].items() if k not in ("budgets", "mode", "metric", "model")}
    # the schedule adds where in it the result came from ("schedule"); the rest is the record itself
    assert record == {k: v for k, v in result.plan.config.items() if k != "schedule"}
    assert result.plan.config["schedule"]["step"] == 2
    assert record["sequential"] is True and record["output_weighting"] is True


# ---- refine scores what the result will be ------------------------------------------------------------

def test_refine_trials_are_built_with_the_sequential_refit():
    model, x = build("mlp")
    held = _calibration(x, n=2, seed=7)
    result = autorank.optimize(model, 0.4, x, calibration=_calibration(x), data=DataAware(sequential=True),
                               refine=autorank.Refine(heldout=held, n_trials=2, knobs=("objective",)))
    report = result.plan.config["refine"]
    model.eval()
    with torch.no_grad():
        score = sum(output_fidelity(result.model.eval(), b, model(b)) for b in held) / len(held)
    assert result.plan.config["sequential"] is True
    assert score == pytest.approx(report["best_metric"], abs=1e-6)


# ---- sweeps run the same pipeline -------------------------------------------------------------------

def test_a_sweep_row_is_the_pipeline_result_with_calibration(tmp_path):
    from autorank.apps.sweep import ModelSpec, SweepConfig, run_sweep

    model, x = build("mlp")
    cfg = SweepConfig.from_dict({"model": "mlp", "budgets": [0.5], "methods": [{"name": "alds"}],
                                 "latency": {"repeats": 2}})
    state = run_sweep(cfg, tmp_path, model_spec=ModelSpec(model, x))
    row = state["rows"][0]
    fresh = autorank.optimize(model, 0.5, x)
    assert row["plan"]["config"] == fresh.plan.config
    assert row["plan"]["layers"] == json.loads(fresh.plan.to_json())["layers"]


def test_sweep_calibration_needs_training_data():
    from autorank.apps.sweep import SweepConfig

    with pytest.raises(ValueError, match="calibration takes its samples from the training data"):
        SweepConfig.from_dict({"model": "mlp", "budgets": [0.5], "methods": [{"name": "a"}], "calibration": 64})


def test_the_pipeline_refuses_a_realised_model_over_budget(monkeypatch):
    import autorank.pipeline as pipeline

    real = pipeline.measure_totals

    def inflated(graph, model, x):
        out = real(graph, model, x)
        out["params"] = out["params_before"]
        return out

    monkeypatch.setattr(pipeline, "measure_totals", inflated)
    model, x = build("mlp")
    with pytest.raises(RuntimeError, match="over the budget"):
        CompressStep(x)(model, 0.5)


# ---- one fine-tune protocol ---------------------------------------------------------------------------

class Recorder:
    def __init__(self):
        self.seen: list[FinetuneContext] = []

    def fit(self, model, context):
        self.seen.append(context)
        return {"loss": 0.5}


def test_an_object_with_fit_gets_the_context_and_a_callable_gets_the_step():
    model, x = build("mlp")
    calibration = _calibration(x)
    rec = Recorder()
    result = autorank.optimize(model, 0.4, x, finetune=rec, steps=2, calibration=calibration)
    assert [c.step for c in rec.seen] == [1, 2]
    assert all(c.teacher is model and c.calibration is calibration and c.example_inputs is x for c in rec.seen)
    assert result.history[-1]["finetune"] == {"loss": 0.5}
    steps = []
    autorank.optimize(model, 0.4, x, finetune=lambda m, s: steps.append(s), steps=2)
    assert steps == [1, 2]


def test_encoder_distill_is_a_finetune_and_needs_calibration_batches():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=40, max_position_embeddings=16)
    bert = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, 40, (4, 8), generator=g),
                "attention_mask": torch.ones(4, 8, dtype=torch.long)} for _ in range(2)]
    distil = autorank.EncoderDistill(max_steps=3)
    result = autorank.optimize(bert, 0.8, batches[0], calibration=batches, finetune=distil)
    assert result.history[-1]["finetune"]["steps"] == 3
    with pytest.raises(ValueError, match="EncoderDistill as finetune= distils on the calibration batches"):
        autorank.optimize(bert, 0.8, batches[0], finetune=distil)


# ---- saved results of PLAN_VERSION 1 load bit-identically --------------------------------------------

@pytest.mark.parametrize("name", ["mlp", "residual_cnn"])
def test_a_stored_version_1_result_loads_bit_identically(name):
    folder = DATA / "plan_v1" / name
    assert autorank.load_plan(folder).version == 1
    model, _ = build(name, seed=123)  # other weights: everything comes from the file
    loaded = autorank.load(folder, model).eval()
    io = load_file(str(folder / "io.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(io["x"]), io["y"])


@pytest.mark.parametrize("cls", [Compression, DataAware, Retrain])
def test_a_config_of_another_version_is_refused(cls):
    with pytest.raises(ValueError, match="version 99 is not one this autorank reads"):
        cls.from_dict({"version": 99})
    with pytest.raises(TypeError):
        cls(version=7)


def test_a_path_checkpoint_round_trips():
    r = Retrain(checkpoint=Path("ckpt") / "run")
    assert Retrain.from_dict(json.loads(json.dumps(r.to_dict()))) == r
