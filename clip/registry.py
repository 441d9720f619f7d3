"""Placeholder until the registry lands."""

from __future__ import annotations

__all__ = ["available_weights", "get", "is_registered"]


def is_registered(name: str) -> bool:
    return False


def available_weights() -> list[str]:
    return []


def get(name: str) -> object:
    raise ValueError(name)
