"""A name -> object registry, used for learners, nets, datasets and samplers instead of if/elif chains."""

from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, List, TypeVar

from pocketflow.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; asking for an unknown name raises an error that lists the known ones."""

    def __init__(self, kind: str, flag: str | None = None) -> None:
        self.kind = kind
        self.flag = flag
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(item: T) -> T:
            self.add(name, item)
            return item

        return decorate

    def add(self, name: str, item: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._items[name] = item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            hint = f" (set it with {self.flag})" if self.flag else ""
            raise ConfigError(
                f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}{hint}"
            ) from None

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
