"""Providers by name. Adding one is a module with a class and a line here.

HTTP providers take their settings (base URL, key, timeout) from
`create_provider(name, settings=...)`, else from the process runtime when
they first need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from .anthropic import AnthropicProvider
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
from .openai import OpenAIProvider
from .scripted import ScriptedProvider

if TYPE_CHECKING:
    from ..settings import Settings

PROVIDERS: dict[str, Callable[..., Provider]] = {
    "scripted": ScriptedProvider,
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
}


def create_provider(name: str, *, settings: Optional[Settings] = None) -> Provider:
    """A provider instance by name; `UnknownProvider` lists the known ones.

    Providers that read settings (their class says ``takes_settings = True``)
    get `settings`; without it they read the process runtime's on first use.
    Creating one never touches the network.
    """
    factory = PROVIDERS.get(name)
    if factory is None:
        raise UnknownProvider(name, list(PROVIDERS))
    if settings is not None and getattr(factory, "takes_settings", False):
        return factory(settings=settings)  # type: ignore[call-arg]
    return factory()


__all__ = [
    "AssistantTurn", "EmitEvent", "PermanentProviderError", "Provider", "ProviderError", "StepContext",
    "TransientProviderError", "UnknownProvider", "PROVIDERS", "create_provider",
    "AnthropicProvider", "OpenAIProvider", "ScriptedProvider",
]
