"""Deprecated alias of :mod:`autorank.apps.cli` (moved there in issue #18); import that instead."""

from autorank._util import moved_module

__getattr__, __dir__, __all__ = moved_module("autorank.cli", "autorank.apps.cli")

if __name__ == "__main__":  # python -m autorank.cli
    raise SystemExit(__getattr__("main")())
