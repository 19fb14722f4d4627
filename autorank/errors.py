"""Deprecated alias of :mod:`autorank.measures` (the error measures; the old name read as exceptions)."""

from ._util import moved_module

__getattr__, __dir__, __all__ = moved_module(__name__, "autorank.measures")
