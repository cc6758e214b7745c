"""Providers by name: the built-in ones, and those user code adds with `register_provider`.

A provider implements ``next_turn(ctx: StepContext) -> AssistantTurn`` and
declares the task options it reads as a pydantic model (its ``Options``
class attribute, or ``register_provider(..., options=Model)``): a task's
keyword arguments are checked against that model before the task is
stored, so a typo is refused instead of silently ignored. A provider that
declares no model takes no options.

HTTP providers take their settings (base URL, key, timeout) from
`create_provider(name, settings=...)` (the step loop hands in its
process's), else from the environment when they first need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from pydantic import BaseModel, ConfigDict

from longhaul.models import InvalidInput

from ..errors import PermanentProviderError, ProviderError, TransientProviderError, UnknownProvider
from .anthropic import AnthropicProvider
from .base import AssistantTurn, EmitEvent, Provider, StepContext
from .openai import OpenAIProvider
from .scripted import ScriptedProvider

if TYPE_CHECKING:
    from ..settings import Settings

#: A provider class, or a callable building one (given ``settings=`` if it says ``takes_settings = True``).
ProviderFactory = Callable[..., Provider]

PROVIDERS: dict[str, ProviderFactory] = {
    "scripted": ScriptedProvider,
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
}

#: Options models given to `register_provider` explicitly (else a factory's ``Options`` attribute is used).
_OPTIONS_MODELS: dict[str, type[BaseModel]] = {}


class NoOptions(BaseModel):
    """The options of a provider that declares none: nothing is accepted."""

    model_config = ConfigDict(extra="forbid")


def register_provider(name: str, factory: Callable[[], Any], *, options: Optional[type[BaseModel]] = None) -> None:
    """Make a provider available by name in this process (replacing one of the same name).

    `factory` is a provider class or any zero-argument callable returning an
    object with ``next_turn(ctx: StepContext) -> AssistantTurn``. The task
    options it reads are `options` (a pydantic model), else the factory's
    ``Options`` attribute, else none. Call it at module level of an app
    module (``--app`` / ``LONGHAUL_APP``) so every worker process has it.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput(f"register_provider: name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise InvalidInput(f"register_provider({name!r}): factory must be a class or a zero-argument callable, "
                           f"got {factory!r}")
    if options is not None and not (isinstance(options, type) and issubclass(options, BaseModel)):
        raise InvalidInput(f"register_provider({name!r}): options must be a pydantic model class, got {options!r}")
    PROVIDERS[name] = factory
    if options is not None:
        _OPTIONS_MODELS[name] = options
    else:
        _OPTIONS_MODELS.pop(name, None)


def provider_options_model(name: str, providers: Optional[Mapping[str, ProviderFactory]] = None) -> type[BaseModel]:
    """The options model the named provider of `providers` (default: the registry) declares (`NoOptions` if none).

    `UnknownProvider` if there is no provider of that name.
    """
    known = PROVIDERS if providers is None else providers
    factory = known.get(name)
    if factory is None:
        raise UnknownProvider(name, list(known))
    registered = _OPTIONS_MODELS.get(name) if factory is PROVIDERS.get(name) else None
    model = registered or getattr(factory, "Options", None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else NoOptions


def create_provider(name: str, *, settings: Optional[Settings] = None,
                    providers: Optional[Mapping[str, ProviderFactory]] = None) -> Provider:
    """A provider instance by name from `providers` (default: the registry); `UnknownProvider` lists the known ones.

    Providers that read settings (their class says ``takes_settings = True``)
    get `settings`; without it they read the environment's on first use.
    Creating one never touches the network.
    """
    known = PROVIDERS if providers is None else providers
    factory = known.get(name)
    if factory is None:
        raise UnknownProvider(name, list(known))
    if settings is not None and getattr(factory, "takes_settings", False):
        return factory(settings=settings)  # type: ignore[call-arg]
    return factory()


__all__ = [
    "AssistantTurn", "EmitEvent", "PermanentProviderError", "Provider", "ProviderError", "StepContext",
    "TransientProviderError", "UnknownProvider", "PROVIDERS", "ProviderFactory", "NoOptions", "create_provider",
    "provider_options_model", "register_provider",
    "AnthropicProvider", "OpenAIProvider", "ScriptedProvider",
]
