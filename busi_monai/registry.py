"""Choices by name: one lookup with one error message for every registry (losses, schedules, ...)."""

from __future__ import annotations


def lookup(registry: dict, name: str, what: str):
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(registry)}")
    return registry[name]
