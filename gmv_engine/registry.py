"""Components by name: the one list of each kind (encoder, reranker, quality, profile).

Every registered component states its facts without being built (whether it needs pretrained
weights, what it measures, its dimension or range), so CLI choices, settings validation, the
README's table and `gmv models status` read them here and never list components themselves.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

T = TypeVar("T")

# kind -> the module whose REGISTRY maps names to Components (imported on first use).
KINDS = {"encoder": "gmv_engine.encoders", "reranker": "gmv_engine.rerankers",
         "quality": "gmv_engine.quality", "profile": "gmv_engine.profiles"}


@dataclass(frozen=True)
class Component:
    name: str
    build: Callable[[str], Any]  # device -> the component
    description: str
    needs_pretrained_weights: bool = False
    facts: Mapping[str, Any] = field(default_factory=dict)  # what the pipeline needs to know, per kind


def registry(kind: str) -> Mapping[str, Any]:
    try:
        module = KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown kind of component '{kind}'; one of {sorted(KINDS)}") from None
    return importlib.import_module(module).REGISTRY


def names(kind: str) -> list[str]:
    return list(registry(kind))


def spec(kind: str, name: str) -> Any:
    entries = registry(kind)
    try:
        return entries[name]
    except KeyError:
        label = {"reranker": "re-ranker", "quality": "quality metric"}.get(kind, kind)
        raise ValueError(f"unknown {label} '{name}'; choose one of {sorted(entries)}") from None


def create(registry: Mapping[str, Component], kind: str, name: str, device: str) -> Any:
    try:
        component = registry[name]
    except KeyError:
        raise ValueError(f"unknown {kind} '{name}'; choose one of {sorted(registry)}") from None
    return component.build(device)


def markdown_table() -> str:
    """The README's table of components (between its `<!-- components -->` markers)."""
    lines = ["| kind | name | needs pretrained weights | what |", "|---|---|---|---|"]
    for kind in ("encoder", "reranker", "quality"):
        for name, component in registry(kind).items():
            facts = ", ".join(f"{k} {v}" for k, v in component.facts.items() if k not in ("library",))
            lines.append(f"| {kind} | `{name}` | {'yes' if component.needs_pretrained_weights else 'no'} | "
                         f"{component.description}{f' ({facts})' if facts else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
