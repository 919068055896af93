"""A tiny name -> object registry (learners, optimizers, datasets, zoo models).

Plugins register themselves with a decorator; lookups of an unknown name give a
one-line error with a did-you-mean suggestion instead of an if/elif factory.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from pocketflow.errors import PocketFlowError

T = TypeVar("T")


def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            return obj
        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise PocketFlowError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._items)}; "
                f"choose from: {', '.join(sorted(self._items))}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
