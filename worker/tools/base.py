"""What a tool is, and what it is told when called."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pydantic import BaseModel


@dataclass(frozen=True)
class ToolContext:
    """Per-call facts a tool may need.

    `idempotency_key` is ``<task_id>:<step>:<call_index>``: the one step that
    may run twice after a crash passes the same key both times, so a tool
    with side effects can deduplicate.
    """

    task_id: str
    step_index: int
    call_index: int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def idempotency_key(self) -> str:
        return f"{self.task_id}:{self.step_index}:{self.call_index}"


@dataclass(frozen=True)
class ToolResult:
    success: bool
    output: str


@dataclass(frozen=True)
class Tool:
    """A named function with pydantic-validated arguments."""

    name: str
    description: str
    arguments: type[BaseModel]
    run: Callable[[Any, ToolContext], str]
    schema: Optional[dict[str, Any]] = None

    def json_schema(self) -> dict[str, Any]:
        return self.schema or self.arguments.model_json_schema()
