"""What a tool is, what it is told when called, and `tool`, which makes one from a typed function."""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pydantic import BaseModel

from longhaul.models import InvalidInput

from ..settings import Settings, load_settings


@dataclass(frozen=True)
class ToolContext:
    """Per-call facts a tool may need.

    `idempotency_key` is ``<task_id>:<step>:<call_index>``: the one step that
    may run twice after a crash passes the same key both times, so a tool
    with side effects can deduplicate. `settings` are the ones the step
    loop hands in (its process's); a context built without them reads the
    environment's, which opens nothing.
    """

    task_id: str
    step_index: int
    call_index: int
    options: dict[str, Any] = field(default_factory=dict)
    settings: Optional[Settings] = None

    @property
    def idempotency_key(self) -> str:
        return f"{self.task_id}:{self.step_index}:{self.call_index}"

    def get_settings(self) -> Settings:
        """The settings handed in, else the environment's (`SettingsError` names a bad variable)."""
        return self.settings if self.settings is not None else load_settings()


@dataclass(frozen=True)
class ToolResult:
    success: bool
    output: str


@dataclass(frozen=True)
class Tool:
    """A named function with pydantic-validated arguments.

    `options` declares the task options the tool reads from
    ``ctx.options`` (a pydantic model): a task may set them as keyword
    arguments, checked like its provider's options. `parallel` says the
    tool is safe to run at the same time as other calls of one answer:
    when every call of an answer is to such a tool, they run at once.
    `needs_approval` makes each call wait for an approval before it runs
    (`longhaul approve TASK_ID`; a denial is its result instead).
    `blocking` says the tool blocks in C code that does not cooperate with
    a greenlet worker process (heavy CPU work, a C database driver): there
    it runs on a native thread, so the process's other tasks go on
    (`greenlets.off_hub`). Network and file I/O through Python's standard
    library (httpx, requests, sockets, subprocess) cooperates as it is.
    """

    name: str
    description: str
    arguments: type[BaseModel]
    run: Callable[[Any, ToolContext], str]
    schema: Optional[dict[str, Any]] = None
    options: Optional[type[BaseModel]] = None
    parallel: bool = False
    #: The call waits (status `waiting`) for `longhaul approve` / `longhaul deny` before it runs.
    needs_approval: bool = False
    #: The tool blocks without cooperating with greenlets: it runs on a native thread in a greenlet process.
    blocking: bool = False

    def __post_init__(self) -> None:
        for flag in ("parallel", "needs_approval", "blocking"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidInput(f"tool {self.name}: {flag} must be True or False, got {getattr(self, flag)!r}")

    def json_schema(self) -> dict[str, Any]:
        """The arguments' JSON schema, as providers send it to the model (computed once per model; do not mutate)."""
        return self.schema or arguments_schema(self.arguments)


@functools.lru_cache(maxsize=None)
def arguments_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema, built once per process: pydantic rebuilds it at every call (about 1 ms),
    and every model turn of every task sends its tools' schemas."""
    return model.model_json_schema()


ToolFunction = Callable[[Any, ToolContext], str]


def define_tool(name: Optional[str] = None, *, description: Optional[str] = None,
                options: Optional[type[BaseModel]] = None, parallel: bool = False,
                needs_approval: bool = False, blocking: bool = False) -> Callable[[ToolFunction], Tool]:
    """Make a `Tool` of a typed function ``fn(args: SomeModel, ctx: ToolContext) -> str``, unregistered.

    The arguments model is the first parameter's annotation (a pydantic
    model; its JSON schema is what the model sees), the name defaults to the
    function's and the description to its docstring; ``parallel=True`` lets
    calls of one answer run at once, ``needs_approval=True`` makes each call wait for an
    approval, ``blocking=True`` runs it on a native thread in a greenlet process (see `Tool`). `worker.tools.tool`
    does the same and registers the result.
    """

    for flag, value in (("parallel", parallel), ("needs_approval", needs_approval), ("blocking", blocking)):
        if not isinstance(value, bool):
            raise InvalidInput(f"{flag}: must be True or False, got {value!r}")

    def make(fn: ToolFunction) -> Tool:
        params = list(inspect.signature(fn).parameters)
        model = typing.get_type_hints(fn).get(params[0]) if params else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(f"tool {fn.__name__}: the first parameter must be annotated with a pydantic model")
        text = description or inspect.getdoc(fn)
        if not text:
            raise TypeError(f"tool {fn.__name__}: give it a docstring or a description; the model reads it")
        return Tool(name=name or fn.__name__, description=text, arguments=model, run=fn, options=options,
                    parallel=parallel, needs_approval=needs_approval, blocking=blocking)

    return make
