"""Deprecated alias of :mod:`autorank.measures` (the error measures; the old name read as exceptions).

``import autorank.errors`` warns (``DeprecationWarning``) and gives the names of
:mod:`autorank.measures`; import them from there instead.
"""

import warnings

from .measures import *  # noqa: F401,F403
from .measures import __all__  # noqa: F401

warnings.warn("autorank.errors is deprecated: the error measures are in autorank.measures",
              DeprecationWarning, stacklevel=2)
