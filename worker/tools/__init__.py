"""Tools by name, the tools a task may call, and running the calls of one step.

Built in: `ledger` (the scripted provider's), `read_file`, `write_file` and
`list_files` (confined to the task's workspace, see `files`), and
`http_get` (size-capped, public addresses only by default, see `http`),
`ask_user` (the task waits for the user's reply, see `ask_user`).
User code adds tools with ``@tool()`` at module level of an app module
(registered when the module is imported, in every process that imports
it) or with `register_tool` for tools built at run time. A task chooses
its tools with ``options["tools"]`` (a list of names); without it, every
registered tool is offered except those in `OPT_IN_TOOLS`: `ask_user` is
offered only to a task that names it, since a task with nobody to answer
(a batch job) would wait forever for a reply its model chose to ask for.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from pydantic import BaseModel, ValidationError

from longhaul.models import CheckpointItem, InvalidInput, ToolCall

from ..errors import ToolError, UnknownTool, WaitForReply
from ..greenlets import off_hub
from .ask_user import ASK_USER
from .base import Tool, ToolContext, ToolFunction, ToolResult, define_tool
from .files import LIST_FILES, READ_FILE, WRITE_FILE
from .http import HTTP_GET
from .ledger import LEDGER

TOOLS: dict[str, Tool] = {t.name: t for t in (LEDGER, READ_FILE, WRITE_FILE, LIST_FILES, HTTP_GET, ASK_USER)}
#: Tools offered only to a task that names them in ``options["tools"]`` (not to one that names none).
OPT_IN_TOOLS = frozenset({ASK_USER.name})


def register_tool(tool: Tool) -> None:
    """Make `tool` callable by name in this process (replacing any tool of the same name)."""
    TOOLS[tool.name] = tool


def tool(name: Optional[str] = None, *, description: Optional[str] = None,
         options: Optional[type[BaseModel]] = None, parallel: bool = False,
         needs_approval: bool = False, blocking: bool = False) -> Callable[[ToolFunction], Tool]:
    """Decorate ``fn(args: SomeModel, ctx: ToolContext) -> str`` to make it a registered `Tool`.

    At module level of an app module (``--app`` / ``LONGHAUL_APP``) the tool
    is registered in every process that imports the module, workers
    included. The name defaults to the function's, the description to its
    docstring; `options` is a pydantic model of the task options the tool
    reads (see `Tool`); ``parallel=True`` declares it safe to run at the
    same time as the other calls of one answer; ``needs_approval=True`` makes
    each call wait (status `waiting`) for ``longhaul approve`` or ``longhaul
    deny`` before it runs; ``blocking=True`` says it blocks in C code that does
    not cooperate with greenlets, so a greenlet worker process runs it on a
    native thread. Every parameter is keyword-only but the name, so
    later ones can be added freely.
    """
    make = define_tool(name, description=description, options=options, parallel=parallel,
                       needs_approval=needs_approval, blocking=blocking)

    def register(fn: ToolFunction) -> Tool:
        made = make(fn)
        register_tool(made)
        return made

    return register


def validate_tool_names(options: dict[str, Any], tools: Optional[Mapping[str, Tool]] = None) -> None:
    """Check ``options["tools"]`` against `tools` (default: this process's registry): `UnknownTool` naming `tools`.

    Called before a task is stored, and by the worker before it runs one.
    """
    known = TOOLS if tools is None else tools
    names = options.get("tools")
    if names is None:
        return
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise InvalidInput(f"tools: expected a list of tool names, got {names!r}")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UnknownTool(unknown, list(known))


def allowed_tools(options: dict[str, Any], tools: Optional[Mapping[str, Tool]] = None) -> list[Tool]:
    """The tools a task may call: those of `tools` (default: the registry) named by ``options["tools"]``.

    Without ``options["tools"]``: all of them but the `OPT_IN_TOOLS`.
    """
    known = TOOLS if tools is None else tools
    names = options.get("tools")
    if names is None:
        return [tool for name, tool in known.items() if name not in OPT_IN_TOOLS]
    return [known[name] for name in names if name in known]


def run_tool_call(call: ToolCall, ctx: ToolContext, tools: Optional[Mapping[str, Tool]] = None) -> ToolResult:
    """Run one call of a tool of `tools` (default: the registry); anything wrong becomes a failed result.

    Refused: a tool the task may not call, an unknown tool, arguments that
    were not a JSON object (`ToolCall.invalid_arguments`), arguments that fail
    validation (the message names each field). A `ToolError` is reported as
    its message; any other exception with its type. `WaitForReply` is
    raised on: the task waits for the user's reply (see `loop.py`).
    """
    known = TOOLS if tools is None else tools
    offered = allowed_tools(ctx.options, known)
    if call.name not in {t.name for t in offered}:
        why = "unknown tool" if call.name not in known else "tool not allowed for this task"
        return ToolResult(False, f"{why} {call.name!r}; available: {', '.join(t.name for t in offered)}")
    tool_ = known[call.name]
    invalid = call.invalid_arguments
    if invalid is not None:
        return ToolResult(False, f"invalid arguments for {call.name}: {invalid.problem}; they were {invalid.raw!r}. "
                                 "Send the arguments as one JSON object matching the tool's schema.")
    try:
        args = tool_.arguments.model_validate(call.arguments)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}" for err in exc.errors()
        )
        return ToolResult(False, f"invalid arguments for {call.name}: {problems}")
    try:
        return ToolResult(True, off_hub(tool_.run, args, ctx) if tool_.blocking else tool_.run(args, ctx))
    except WaitForReply:
        raise  # the task waits for the user: the loop stores the wait
    except ToolError as exc:
        return ToolResult(False, f"{call.name} failed: {exc}")
    except Exception as exc:  # a tool's failure is the model's to handle, not the worker's
        return ToolResult(False, f"{call.name} failed: {type(exc).__name__}: {exc}")


def failed_output(call: ToolCall, output: str) -> bool:
    """Whether a stored result of `call` says it failed: the outputs `run_tool_call` gives failures, or a
    synthetic result (`models.orphan_result`). Only for results journaled before schema 8, which store no
    flag (`OpenStep.result_succeeded` is None): a successful output may start the same way."""
    return (output.startswith(("unknown tool ", "tool not allowed for this task ", f"invalid arguments for {call.name}",
                               f"{call.name} failed: ", "[no result: ")))


def checkpoint_item(call: ToolCall, result: ToolResult) -> CheckpointItem:
    return CheckpointItem(tool_name=call.name, arguments=call.arguments, success=result.success,
                          output=result.output)


__all__ = [
    # Registry
    "OPT_IN_TOOLS", "TOOLS", "UnknownTool",
    "allowed_tools", "define_tool", "register_tool", "tool", "validate_tool_names",
    # Calls
    "Tool", "ToolContext", "ToolError", "WaitForReply", "ToolResult", "checkpoint_item", "failed_output",
    "run_tool_call",
    # Built-ins
    "ASK_USER", "HTTP_GET", "LEDGER", "LIST_FILES", "READ_FILE", "WRITE_FILE",
]
