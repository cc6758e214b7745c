"""Providers by name. Adding one is a module with a class and a line here."""

from __future__ import annotations

from typing import Callable

from .base import (
    AssistantTurn,
    EmitEvent,
    PermanentProviderError,
    Provider,
    ProviderError,
    StepContext,
    TransientProviderError,
    UnknownProvider,
)
from .scripted import ScriptedProvider

PROVIDERS: dict[str, Callable[[], Provider]] = {
    "scripted": ScriptedProvider,
}


def create_provider(name: str) -> Provider:
    """A provider instance by name; `UnknownProvider` lists the known ones."""
    factory = PROVIDERS.get(name)
    if factory is None:
        raise UnknownProvider(name, list(PROVIDERS))
    return factory()


__all__ = [
    "AssistantTurn", "EmitEvent", "PermanentProviderError", "Provider", "ProviderError", "StepContext",
    "TransientProviderError", "UnknownProvider", "PROVIDERS", "create_provider",
]
