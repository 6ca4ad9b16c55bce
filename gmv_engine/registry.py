"""Looking a component up by name, the one way every registry does it."""
from __future__ import annotations

from typing import Callable, Mapping, TypeVar

T = TypeVar("T")


def create(registry: Mapping[str, Callable[[str], T]], kind: str, name: str, device: str) -> T:
    try:
        factory = registry[name]
    except KeyError:
        raise ValueError(f"unknown {kind} '{name}'; choose one of {sorted(registry)}") from None
    return factory(device)
