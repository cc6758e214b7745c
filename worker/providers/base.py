"""The provider interface: given the history so far, produce the next assistant turn."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

from longhaul.models import ChatMessage, InvalidInput, LonghaulError, ToolCall, Usage

from ..tools.base import Tool

#: Receives trace events as they happen: ``emit("content", {"text": chunk})``.
EmitEvent = Callable[[str, dict[str, Any]], None]


def ignore_event(event_type: str, data: dict[str, Any]) -> None:
    """The default `EmitEvent`: tracing off."""


@dataclass(frozen=True)
class StepContext:
    """What a provider sees when asked for step `step_index` of a task.

    A streaming provider reports each chunk through `emit` (event types
    ``content`` and ``reasoning``, data ``{"text": chunk}``); consecutive
    chunks are consolidated into one trace row.
    """

    task_id: str
    step_index: int  # 1-based: the step about to run
    history: list[ChatMessage]
    model: str
    options: dict[str, Any] = field(default_factory=dict)
    tools: Sequence[Tool] = ()  # the tools this task may call, with their JSON schemas
    emit: EmitEvent = ignore_event


@dataclass(frozen=True)
class AssistantTurn:
    """The model's answer: text, and the tools it wants called (none = final answer)."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: Optional[Usage] = None  # what this answer cost, if the provider reports it


class Provider(Protocol):
    """One module per provider; `create_provider` looks them up by name."""

    name: str

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        """The next assistant turn.

        Raises `TransientProviderError` for failures worth retrying later
        (rate limits, 5xx, lost connections) and `PermanentProviderError`
        for those that will fail again (bad credentials, bad request).
        """
        ...


class ProviderError(LonghaulError):
    """A provider could not produce the next turn.

    `status_code` is the HTTP status the provider answered with, if any.
    Messages never contain credentials (see `worker.providers.common.redact`).
    """

    def __init__(self, message: str, *, status_code: Optional[int] = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class TransientProviderError(ProviderError):
    """Worth retrying: the task resumes from its latest checkpoint after a backoff."""


class PermanentProviderError(ProviderError):
    """Will fail again: the task is marked failed with this message."""


class UnknownProvider(InvalidInput):
    """No provider of this name is registered in this process."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"provider: unknown provider {name!r}; known providers: {', '.join(sorted(known))} "
                         "(a provider from your code is registered by an app module: --app / LONGHAUL_APP)")
        self.name = name
