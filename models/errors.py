"""Every error longhaul raises on purpose derives from :class:`LonghaulError`.

Each subclass carries the ids involved so callers (and the CLI) can say what
went wrong and what to do next without parsing messages.
"""

from __future__ import annotations


class LonghaulError(Exception):
    """Root of longhaul's own errors."""


class InvalidInput(LonghaulError):
    """The caller asked for something that cannot work as given (the CLI exits 2)."""


class InvalidDatabaseUrl(InvalidInput):
    """The database URL or path cannot be opened as a task store."""

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(f"LONGHAUL_DATABASE_URL {url!r}: {problem}")
        self.url = url
        self.problem = problem


class SchemaTooNew(LonghaulError):
    """The database was written by a newer longhaul than this one."""

    def __init__(self, found: int, supported: int) -> None:
        super().__init__(
            f"database schema version {found} is newer than this longhaul supports "
            f"({supported}); upgrade longhaul before starting workers against it"
        )
        self.found = found
        self.supported = supported


class TaskNotFound(LonghaulError):
    """No task with this id is stored."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id!r} not found; `longhaul tasks` lists stored tasks")
        self.task_id = task_id


class CorruptRecord(LonghaulError):
    """A stored cell cannot be decoded; the task cannot be rebuilt as stored."""

    def __init__(self, task_id: str, field: str, problem: str) -> None:
        super().__init__(f"task {task_id!r}: stored field {field!r} is corrupt: {problem}")
        self.task_id = task_id
        self.field = field
        self.problem = problem


class LeaseLost(LonghaulError):
    """This worker no longer holds the task's lease, so it must stop writing.

    Raised when another worker took the task over (our lease expired) or the
    task was finished elsewhere. Nothing was written by the refused call.
    """

    def __init__(self, task_id: str) -> None:
        super().__init__(
            f"task {task_id!r}: lease lost (expired or taken over by another worker); "
            "this worker stops and leaves the task to its new owner"
        )
        self.task_id = task_id


class TaskNotResumable(LonghaulError):
    """The task is in a state that cannot be run again without `rerun`."""

    def __init__(self, task_id: str, status: str) -> None:
        super().__init__(
            f"task {task_id!r} is {status}; use `longhaul rerun {task_id}` to run it again from step 1"
        )
        self.task_id = task_id
        self.status = status
