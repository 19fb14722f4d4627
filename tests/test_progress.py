"""Progress of long work (issue #17.1): one mechanism, silent when asked, log lines off a terminal."""

from __future__ import annotations

import logging

import pytest
import torch

import autorank
from autorank import progress as prog
from tiny_models import build

LOGGER = "autorank.progress"


def _calibration(x, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, *x.shape[1:], generator=g) for _ in range(n)]


@pytest.fixture(autouse=True)
def _not_a_terminal(capsys):
    """capsys puts a plain stream in place of stderr, as in a script whose output is piped or logged."""
    yield


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def _noop_train(model, step):
    return None


# every stage of a calibrated compress -> fine-tune run, and the line that names it
STAGES = ("analysis", "calibration", "output moments", "error curves (alds)", "allocator probes", "realise 3 layers",
          "refit", "compress -> fine-tune schedule", "finetune round 1")


def _run(progress):
    model, x = build("mlp")
    data = torch.utils.data.TensorDataset(torch.randn(32, 32), torch.randint(0, 10, (32,)))
    return autorank.optimize(model, 0.5, x, calibration=_calibration(x), steps=2, progress=progress,
                             finetune=autorank.Finetune(data, epochs=1, batch_size=16))


def test_progress_false_emits_nothing(caplog, capsys):
    caplog.set_level(logging.DEBUG)
    _run(progress=False)
    assert _messages(caplog) == []
    err = capsys.readouterr().err
    assert "it/s" not in err and "%|" not in err  # no tqdm bar either


def test_automatic_progress_off_a_terminal_logs_every_stage(caplog, capsys):
    caplog.set_level(logging.INFO, logger=LOGGER)
    _run(progress=None)  # pytest's stderr is not a terminal: log lines, no bars
    text = "\n".join(_messages(caplog))
    lines = _messages(caplog)

    def seen(stage: str, word: str) -> bool:
        return any(line.startswith(stage) and f": {word}" in line for line in lines)

    missing = [s for s in STAGES if not (seen(s, "started") and seen(s, "done"))]
    assert not missing, text
    assert "%|" not in capsys.readouterr().err


def test_progress_true_draws_a_bar(caplog, capsys):
    caplog.set_level(logging.INFO, logger=LOGGER)
    model, x = build("mlp")
    autorank.optimize(model, 0.5, x, progress=True)
    assert "error curves (alds)" in capsys.readouterr().err
    assert _messages(caplog) == []  # bars replace the lines


def test_optimize_scope_silences_nested_loops_that_follow_it(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    data = torch.utils.data.TensorDataset(torch.randn(32, 32), torch.randint(0, 10, (32,)))
    model, _ = build("mlp")
    autorank.Finetune(data, epochs=1, batch_size=16)(model)  # alone: automatic, so lines
    assert any(m.startswith("finetune round 0: started") for m in _messages(caplog))
    caplog.clear()
    with prog.progress_scope(False):
        autorank.Finetune(data, epochs=1, batch_size=16)(model)
        assert _messages(caplog) == []
        autorank.Finetune(data, epochs=1, batch_size=16, progress=None)(model)
        assert _messages(caplog) == []
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        autorank.optimize(model, 0.5, torch.randn(2, 32), progress="yes")


@pytest.mark.parametrize("progress, scope, expected", [
    (True, None, "bar"), (False, None, "off"), (None, None, "log"),
    (None, False, "off"), (None, True, "bar"), (True, False, "bar"), (False, True, "off"),
], ids=lambda v: repr(v))
def test_mode_table(progress, scope, expected):
    with prog.progress_scope(scope):
        assert prog.mode(progress) == expected


def test_log_lines_are_rate_limited_and_name_the_count(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setattr(prog, "LOG_INTERVAL", 3600.0)
    assert list(prog.track(range(50), "many", unit="batch")) == list(range(50))
    lines = _messages(caplog)
    assert len(lines) == 2 and lines[0] == "many: started (50 batches)"
    assert lines[1].startswith("many: done 50/50 in ")
    caplog.clear()
    with prog.Progress("every", total=3, interval=0) as bar:
        for i in range(3):
            bar.announce(f"item {i}")
            bar.update(1)
    lines = _messages(caplog)
    # interval 0: every announcement and every update but the last (the done line says it) is a line
    assert [ln.split(",")[0] for ln in lines[1:-1]] == ["every: 1/3 item 0", "every: 1/3", "every: 2/3 item 1",
                                                        "every: 2/3", "every: 3/3 item 2"], lines
    assert lines[-1].startswith("every: done 3/3")


def test_a_step_that_stops_early_says_so(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    gen = prog.track(iter(range(10)), "partial")
    for i in gen:
        if i == 3:
            break
    gen.close()
    assert _messages(caplog)[-1].startswith("partial: stopped after 3 its")
    caplog.clear()
    with pytest.raises(RuntimeError):
        with prog.stage("boom"):
            raise RuntimeError("x")
    assert _messages(caplog)[-1].startswith("boom: stopped after 0/1")
