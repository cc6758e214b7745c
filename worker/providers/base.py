"""The provider interface: given the history so far, produce the next assistant turn."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence

from longhaul.models import ChatMessage, ToolCall, Usage

from ..errors import PermanentProviderError, ProviderError, TransientProviderError, UnknownProvider

if TYPE_CHECKING:
    # Only the type: a provider reads the tools it is handed, so importing one imports no tool.
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


__all__ = [
    "AssistantTurn", "EmitEvent", "Provider", "StepContext", "ignore_event",
    # The errors a provider raises, defined with every worker error in `worker.errors`.
    "PermanentProviderError", "ProviderError", "TransientProviderError", "UnknownProvider",
]
