"""Deprecated alias of :mod:`autorank.apps.zoo` (moved there in issue #18); import that instead."""

from autorank._util import moved_module

__getattr__, __dir__, __all__ = moved_module("autorank.zoo", "autorank.apps.zoo")
