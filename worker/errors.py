"""Every worker-layer error, under `LonghaulError` (the models layer's are in `models.errors`).

`InvalidInput` subclasses mean the caller asked for something wrong: each
message names the field or setting and says what to do instead. The rest
are failures of a running task or of a part it calls.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from longhaul.models import InvalidInput, LonghaulError

#: The environment variable that names app modules; `longhaul worker --app` hands it to its processes.
APP_ENV_VAR = "LONGHAUL_APP"


# -- configuration and registries (InvalidInput) ---------------------------------------------

class SettingsError(InvalidInput):
    """An environment variable holds a value longhaul cannot use."""


class InvalidFilter(InvalidInput):
    """A filter of the dashboard's task list that cannot be read (the message names it)."""


class BrokerRequired(InvalidInput):
    """The call needs a shared broker, and none is configured."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what} needs Redis: set LONGHAUL_REDIS_URL (e.g. redis://localhost:6379/0), "
            "or use `longhaul run`, which runs the task in-process"
        )


class AppImportError(InvalidInput):
    """An app module could not be imported (the CLI and the worker exit with code 2)."""

    def __init__(self, module: str, problem: str) -> None:
        super().__init__(f"app module {module!r} (--app / {APP_ENV_VAR}) cannot be imported: {problem}")
        self.module = module


class DuplicateAgent(InvalidInput):
    """Two different definitions claim one agent name."""

    def __init__(self, name: str, first: str, second: str) -> None:
        super().__init__(f"agent {name!r} is defined twice: at {first} and at {second}; "
                         "give each agent its own name")
        self.name = name


class UnknownAgent(InvalidInput):
    """No agent of this name is registered in this process."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(f"agent: unknown agent {name!r}; known agents: {', '.join(sorted(known)) or 'none'} "
                         f"(agents are defined in app modules: --app / {APP_ENV_VAR})")
        self.name = name


class UnknownProvider(InvalidInput):
    """No provider of this name is registered in this process."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"provider: unknown provider {name!r}; known providers: {', '.join(sorted(known))} "
                         f"(a provider from your code is registered by an app module: --app / {APP_ENV_VAR})")
        self.name = name


class UnknownTool(InvalidInput):
    """A task asked for tools that are not registered."""

    def __init__(self, names: list[str], known: list[str]) -> None:
        super().__init__(f"tools: unknown tool{'s' if len(names) > 1 else ''} "
                         f"{', '.join(repr(n) for n in names)}; known tools: {', '.join(sorted(known))} "
                         f"(a tool from your code is registered by an app module: --app / {APP_ENV_VAR})")
        self.names = names


class TaskExists(InvalidInput):
    """`task_id` is taken; `identical` if by a task with the same identity and spec (a repeated submit)."""

    def __init__(self, task_id: str, *, identical: bool = False) -> None:
        super().__init__(f"task_id: a task {task_id!r} already exists; "
                         f"use `longhaul rerun {task_id}` to run it again, or choose another id")
        self.task_id = task_id
        self.identical = identical


class InvalidBatchItem(InvalidInput):
    """One item of a bulk enqueue (`enqueue_many`) is refused; nothing of the batch was stored or sent."""

    def __init__(self, index: int, problem: str) -> None:
        super().__init__(f"items[{index}]: {problem} (nothing of the batch was stored)")
        self.index = index
        self.problem = problem


# -- a task and the parts it calls -------------------------------------------------------------

class TaskBusy(LonghaulError):
    """A resume was asked for a task a live worker runs right now."""

    def __init__(self, task_id: str, host: Optional[str], pid: Optional[int]) -> None:
        super().__init__(f"task {task_id!r} is running now (leased by {host} pid {pid}); "
                         "it needs no resume. `longhaul show` shows its progress")
        self.task_id = task_id


class ThreadBusy(LonghaulError):
    """`if_busy="reject"`: the thread already has a task that has not finished; nothing was stored."""

    def __init__(self, thread_id: str, task_id: str, status: str) -> None:
        super().__init__(f"thread {thread_id!r} is busy: task {task_id!r} is {status}; send the message again "
                         "when it has finished, or pass if_busy='enqueue' (--if-busy enqueue) to queue it")
        self.thread_id = thread_id
        self.task_id = task_id


class WaitForReply(LonghaulError):
    """Raised by a tool: the task waits (status `waiting`) for the user's reply to `question`.

    A signal more than an error (under the one root all the same): the loop stores the
    wait and lets the worker thread go; `longhaul.reply(thread_id, text)`
    (or the next message on the thread) becomes this call's result and the
    task resumes. The tool is not run again: the reply is its result.
    """

    def __init__(self, question: str) -> None:
        if not isinstance(question, str) or not question.strip():
            raise TypeError("WaitForReply(question): question must be non-empty text")
        super().__init__(question)
        self.question = question


class BrokerUnavailable(LonghaulError):
    """The broker could not take a task's message; the task stays stored and recovery sends it later."""

    def __init__(self, task_id: str, problem: str) -> None:
        super().__init__(
            f"task {task_id!r} is stored, but the broker is unreachable ({problem}); a worker sends it within "
            "LONGHAUL_RECOVERY_INTERVAL_S of Redis being reachable again"
        )
        self.task_id = task_id
        self.problem = problem


def __getattr__(name: str) -> Any:
    # `BROKER_ERRORS` lives in `broker_errors.py`: importing redis-py and Dramatiq for it here made every
    # module that raises a longhaul error (the CLI's settings included) pay ~70 ms for them.
    if name == "BROKER_ERRORS":
        from .broker_errors import BROKER_ERRORS

        return BROKER_ERRORS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class BudgetExceeded(LonghaulError):
    """The task reached one of its budget's limits; it is failed and makes no further call."""

    def __init__(self, task_id: str, limit: str, limit_value: float, used: float, unit: str) -> None:
        super().__init__(f"budget exceeded: {limit}={limit_value:g}, {used:g} {unit} used")
        self.task_id = task_id
        self.limit = limit
        self.limit_value = limit_value
        self.used = used


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


class ToolError(LonghaulError):
    """An expected failure of a tool (bad path, too large, unreachable URL).

    Its message goes to the model as the failed result, so it says what was
    wrong and what to do instead.
    """


__all__ = [
    "APP_ENV_VAR",
    "SettingsError", "InvalidFilter", "BrokerRequired", "AppImportError", "DuplicateAgent", "UnknownAgent",
    "UnknownProvider",
    "UnknownTool", "TaskExists",
    "TaskBusy", "BrokerUnavailable",
    "BudgetExceeded", "ProviderError", "TransientProviderError", "PermanentProviderError", "ToolError",
]
