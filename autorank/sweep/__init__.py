"""Deprecated alias of :mod:`autorank.apps.sweep` (moved there in issue #18); import that instead.

A package rather than ``autorank/sweep.py`` so that the old file's path is gone and git
follows its rename into ``autorank/apps/sweep.py`` when branches that edited it merge;
once they have, ``git mv autorank/sweep/__init__.py autorank/sweep.py`` may flatten it.
"""

from autorank._util import moved_module

__getattr__, __dir__, __all__ = moved_module("autorank.sweep", "autorank.apps.sweep")
