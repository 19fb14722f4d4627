"""Named registries: decomposition families, allocators and layer handlers register here by name.

A leaf module (it imports nothing from autorank), so that configuration classes
can validate a name without importing the code that registers it.  The built-in
entries are registered when :mod:`autorank` is imported.
"""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table with errors that list what is available.

    ``what`` names the kind of entry in messages (``"decomposition family"``).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``, replacing an entry of the same name."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} needs a non-empty string name, got {name!r}")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """The entry called ``name``; ``ValueError`` naming the available ones if there is none."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.what} {name!r}; available: {self.names()}") from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


#: the decomposition families (``autorank.families``)
FAMILIES: Registry = Registry("decomposition family")
#: the rank-selection rules of the global step (``autorank.allocators``)
ALLOCATORS: Registry = Registry("allocator")
