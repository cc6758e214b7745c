"""Tools by name, and running the calls of one step."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from models import CheckpointItem, ToolCall

from .base import Tool, ToolContext, ToolResult
from .ledger import LEDGER

TOOLS: dict[str, Tool] = {LEDGER.name: LEDGER}


def register_tool(tool: Tool) -> None:
    """Make `tool` callable by name (replacing any tool of the same name)."""
    TOOLS[tool.name] = tool


def run_tool_call(call: ToolCall, ctx: ToolContext) -> ToolResult:
    """Run one call; bad arguments and tool errors become a failed result the model sees."""
    tool = TOOLS.get(call.name)
    if tool is None:
        return ToolResult(False, f"unknown tool {call.name!r}; available: {', '.join(sorted(TOOLS))}")
    try:
        args = tool.arguments.model_validate(call.arguments)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}" for err in exc.errors()
        )
        return ToolResult(False, f"invalid arguments for {call.name}: {problems}")
    try:
        return ToolResult(True, tool.run(args, ctx))
    except Exception as exc:  # a tool's failure is the model's to handle, not the worker's
        return ToolResult(False, f"{call.name} failed: {type(exc).__name__}: {exc}")


def allowed_tools(options: dict[str, Any]) -> list[Tool]:
    """The tools a task may call: ``options["tools"]`` (names), else every registered tool."""
    names = options.get("tools")
    if names is None:
        return list(TOOLS.values())
    return [TOOLS[name] for name in names if name in TOOLS]


def checkpoint_item(call: ToolCall, result: ToolResult) -> CheckpointItem:
    return CheckpointItem(tool_name=call.name, arguments=call.arguments, success=result.success,
                          output=result.output)


__all__ = ["TOOLS", "Tool", "ToolContext", "ToolResult", "allowed_tools", "checkpoint_item", "register_tool",
           "run_tool_call"]
