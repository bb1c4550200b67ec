"""One registry class for every component group: a group option and a registry entry share a name.

Every entry is a `Component`: it builds itself from the run config (`build(cfg)`, one signature
for every group) and says what it needs of that config (`check(cfg)`), so that validation asks
the chosen components instead of knowing their rules.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Component:
    """A registered building block. `cfg` is always the whole run config.

    `revision` counts changes to what the component computes; a checkpoint records the revision of
    each component of its model, and a run does not resume across a change (`revised` says what it was).
    """

    revision: int = 1
    revised: str = ""

    @classmethod
    def check(cls, cfg: Any) -> list[str]:
        """Problems with `cfg` for this component, each naming the key to change and the fix."""
        return []

    @classmethod
    def build(cls, cfg: Any) -> Any:
        return cls(cfg)  # type: ignore[call-arg]


class Registry(Generic[T]):
    """Maps names to components. `@REG.register("name")` adds one; `REG.build(name, cfg)` makes one."""

    def __init__(self, group: str):
        self.group = group
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.group} '{name}' is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.group} '{name}'; choose one of: {', '.join(self.names())}"
            ) from None

    def build(self, name: str, cfg: Any) -> Any:
        return self.get(name).build(cfg)  # type: ignore[attr-defined]

    def check(self, name: str, cfg: Any) -> list[str]:
        return self.get(name).check(cfg)  # type: ignore[attr-defined]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
