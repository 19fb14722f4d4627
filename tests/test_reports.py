"""Reports that say what they mean (issue #17.4): readable hyperparameters, labelled errors, honest warnings."""

from __future__ import annotations

import logging

import pytest
import torch

import autorank
from autorank.apps import zoo
from autorank.apps.sweep import results_table, speedup_spread
from autorank.pipeline import thin_moments
from autorank.plan import describe
from tiny_models import build


@pytest.mark.parametrize("family, hyper, text", [
    ("dense", {}, "dense"),
    ("alds", {"groups": 2, "rank": 16}, "alds (k=2, rank 16)"),
    ("tucker2", {"rank_in": 21, "rank_out": 37, "hooi_iters": 5}, "tucker2 (in 21, out 37)"),
    ("cp", {"rank": 12, "iters": 100}, "cp (rank 12)"),
    ("spatial_svd", {"rank": 3}, "spatial_svd (rank 3)"),
    ("tt", {"d": 3, "rank": 4}, "tt (d=3, rank 4)"),
    ("my_family", {"width": 5}, "my_family (width 5)"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_describe_names_each_familys_own_hyperparameters(family, hyper, text):
    assert describe(family, hyper) == text


def _tables(result):
    return result.summary().splitlines()


def test_summary_has_no_empty_columns_no_trailing_spaces_and_a_bound_only_when_meaningful():
    model, x = build("residual_cnn")
    result = autorank.optimize(model, 0.5, x, compression=autorank.Compression(families=["alds", "tucker2"]),
                               progress=False)
    lines = _tables(result)
    assert lines[0].split() == ["layer", "type", "shape", "decomposition", "error", "params", "MACs"]
    assert all(line == line.rstrip() for line in lines)
    for lp in result.plan.layers.values():
        row = next(line for line in lines if line.startswith(lp.name + " "))
        assert describe(lp.family, lp.hyper) in row
    bound = result.plan.network_bound
    assert ("network bound" in result.summary()) == (0 < bound < 1)
    result.plan.network_bound = 288436.9
    assert "network bound" not in result.summary()
    result.plan.network_bound = 0.25
    assert "network bound prod(1+eps)-1 = 0.2500: the largest relative change" in result.summary()


def test_a_cascade_labels_errors_against_the_step_before():
    model, x = build("mlp")
    result = autorank.optimize(model, 0.4, x, finetune=lambda m, step: None, steps=3, progress=False)
    text = result.summary()
    assert result.plan.config["schedule"]["mode"] == "cascade" and result.plan.config["schedule"]["step"] == 3
    assert "error vs step 2" in text.splitlines()[0]
    assert "errors are relative to step 2" in text and "cascade: each step's max error" in text
    one = autorank.optimize(model, 0.4, x, finetune=lambda m, step: None, steps=3, progress=False,
                            retrain=autorank.Retrain(mode="one-shot"))
    assert "error vs" not in one.summary() and "cascade:" not in one.summary()
    assert all(line == line.rstrip() for line in text.splitlines())


def test_a_calibration_smaller_than_a_layers_inputs_warns(caplog):
    model, x = build("mlp")  # fc1 has 32 inputs
    caplog.set_level(logging.WARNING, logger="autorank.pipeline")
    autorank.optimize(model, 0.5, x, calibration=[torch.randn(8, 32)], progress=False)
    warned = [r.getMessage() for r in caplog.records if "calibration is too small" in r.getMessage()]
    assert len(warned) == 1 and "fc1 (8 rows < 32 inputs)" in warned[0]
    caplog.clear()
    autorank.optimize(model, 0.5, x, calibration=[torch.randn(64, 32), torch.randn(64, 32)], progress=False)
    assert not any("calibration is too small" in r.getMessage() for r in caplog.records)


def test_thin_moments_reads_rows_against_inputs():
    from autorank.calibration import Moments

    moments = {"a": Moments(torch.zeros(10, 10, dtype=torch.float64), count=4),
               "b": Moments(torch.zeros(10, 10, dtype=torch.float64), count=10),
               "emb": Moments(torch.zeros(100, dtype=torch.float64), count=3)}  # a diagonal moment: no rank limit
    assert thin_moments(moments) == {"a": (4, 10)}


@pytest.mark.parametrize("base, row, noisy", [
    ((1.0, 1.1), (0.5, 0.55), False),   # twice as fast, tight timings
    ((1.0, 1.4), (0.9, 1.3), True),     # a 10 % effect inside a 40 % spread
    ((1.0, 1.02), (1.2, 1.25), False),  # reliably slower
])
def test_speedup_spread_flags_noise_larger_than_the_effect(base, row, noisy):
    def timing(q):
        return {"median_s": sum(q) / 2, "q25_s": q[0], "q75_s": q[1]}

    out = speedup_spread(timing(base), timing(row))
    assert out["speedup_low"] == pytest.approx(base[0] / row[1])
    assert out["speedup_high"] == pytest.approx(base[1] / row[0])
    assert out["speedup_noisy"] is noisy
    state = {"baseline": {"params": 10, "flops": 10, "latency_ms": 1.0, "metric": None},
             "rows": [{"method": "alds", "budget": 0.5, "status": "ok", "params": 5, "flops": 5, "latency_ms": 1.0,
                       "metric_before": None, "metric_after": None, "max_error": 0.1, "wall_s": 1.0, **out}]}
    table = results_table(state)
    assert f"[{out['speedup_low']:.2f}-{out['speedup_high']:.2f}]" in table
    assert ("timing spread includes 1.00x" in table) is noisy
    assert all(line == line.rstrip() for line in table.splitlines())


def test_user_cache_folder_and_its_override(monkeypatch, tmp_path):
    monkeypatch.delenv("AUTORANK_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.user_cache_dir() == tmp_path / "xdg" / "autorank"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zoo.user_cache_dir() == tmp_path / "home" / ".cache" / "autorank"
    monkeypatch.setenv("AUTORANK_CACHE", str(tmp_path / "mine"))
    assert zoo.user_cache_dir() == tmp_path / "mine"


def test_training_the_demo_cnn_goes_to_the_user_cache_and_says_so(monkeypatch, tmp_path, caplog):
    from torch.utils.data import TensorDataset

    real_load = zoo.load_mnist
    monkeypatch.setattr(zoo, "load_mnist", lambda **kw: tuple(
        TensorDataset(*(t[:100] for t in d.tensors)) for d in real_load(**kw)))
    monkeypatch.setenv("AUTORANK_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO)
    zoo.train_mnist_cnn(epochs=1)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["mnist_cnn-v1-n4000-e1-s0.safetensors"]
    trained = [r for r in caplog.records if r.getMessage().startswith("training the MNIST CNN")]
    assert len(trained) == 1 and trained[0].levelno == logging.WARNING
    assert str(tmp_path / "cache") in trained[0].getMessage()
    assert any(r.name == "autorank.progress" and r.getMessage().startswith("finetune round 0: started")
               for r in caplog.records)
    caplog.clear()
    zoo.train_mnist_cnn(epochs=1)  # from the cache: no training line
    assert not any(r.getMessage().startswith("training the MNIST CNN") for r in caplog.records)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.NOTSET)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("autorank_level, shown", [(logging.INFO, False), (logging.DEBUG, True)])
def test_refine_keeps_optunas_own_lines_quiet_unless_debugging(caplog, autorank_level, shown):
    optuna = pytest.importorskip("optuna")
    model, x = build("mlp")
    g = torch.Generator().manual_seed(5)
    calib = [torch.randn(40, 32, generator=g) for _ in range(2)]
    held = [torch.randn(16, 32, generator=g)]
    caplog.set_level(autorank_level, logger="autorank")
    before = optuna.logging.get_verbosity()
    seen = _Records()
    optuna_logger = logging.getLogger("optuna")
    optuna_logger.addHandler(seen)
    optuna.logging.set_verbosity(optuna.logging.INFO)  # Optuna's default
    try:
        autorank.optimize(model, 0.5, x, calibration=calib, refine=autorank.Refine(heldout=held, n_trials=2))
        assert optuna.logging.get_verbosity() == optuna.logging.INFO  # put back as it was
    finally:
        optuna_logger.removeHandler(seen)
        optuna.logging.set_verbosity(before)
    assert any("A new study created" in m for m in seen.messages) is shown
    assert any(r.getMessage().startswith("refine trials: done 2/2") for r in caplog.records)
