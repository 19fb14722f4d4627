"""The deprecated module paths of issue #18 still work: one DeprecationWarning, then every name of the new module."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

from test_layering import ALIASES, ROOT


@pytest.mark.parametrize("old, new", sorted(ALIASES.items()), ids=sorted(ALIASES))
def test_alias_warns_and_forwards(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)  # import the alias afresh (restored afterwards)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated .* import {new} instead"):
        alias = importlib.import_module(old)
    target = importlib.import_module(new)
    assert alias.__all__ == target.__all__ and alias.__all__
    for name in [*target.__all__, *(n for n in vars(target) if n.startswith("_") and not n.startswith("__"))]:
        assert getattr(alias, name) is getattr(target, name), name
    assert set(target.__all__) <= set(dir(alias))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(f"from {old} import {target.__all__[0]}", {})  # already imported: no second warning


def test_old_module_entry_point_runs_the_cli():
    proc = subprocess.run([sys.executable, "-W", "default::DeprecationWarning", "-m", "autorank.cli", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: autorank")
    assert "autorank.cli is deprecated" in proc.stderr
