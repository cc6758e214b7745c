"""Every error longhaul raises on purpose derives from :class:`LonghaulError`.

Each subclass carries the ids involved so callers (and the CLI) can say what
went wrong and what to do next without parsing messages.
"""

from __future__ import annotations

from typing import Optional


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


class StoreUnusable(InvalidInput):
    """The database file cannot be used at all: damaged, not a database, or read-only. Permanent, never retried."""

    def __init__(self, problem: str, remedy: str) -> None:
        super().__init__(f"LONGHAUL_DATABASE_URL: the task store cannot be used ({problem}); {remedy}")
        self.problem = problem


class StoreUnavailable(LonghaulError):
    """The task store could not be read or written: a lock held too long, a full disk, a lost connection.

    Transient: nothing of the refused call was stored, and a retry (the step
    loop's, from the latest checkpoint) can succeed once the store recovers.
    `problem` names the driver's error and its message.
    """

    def __init__(self, task_id: Optional[str], problem: str) -> None:
        if task_id is None:
            message = f"the task store could not be used ({problem}); nothing was written, so the call can be retried"
        else:
            message = (f"task {task_id!r}: the task store could not be written ({problem}); "
                       "nothing of the step was stored and the task resumes from its latest checkpoint")
        super().__init__(message)
        self.task_id = task_id
        self.problem = problem


class TraceSequenceClash(LonghaulError):
    """Trace events were numbered before ones already stored for the task: two writers for one task.

    The whole write (a checkpoint with its messages, or a batch of events) is
    refused, so sequence numbers never repeat or go back.
    """

    def __init__(self, task_id: str, first_sequence: int, next_sequence: int) -> None:
        super().__init__(
            f"task {task_id!r}: trace events from sequence {first_sequence} do not come after the stored "
            f"ones (next is {next_sequence}); two writers for one task?"
        )
        self.task_id = task_id
        self.first_sequence = first_sequence
        self.next_sequence = next_sequence


class UnstorableValue(InvalidInput):
    """A value the backend cannot hold (too long for its column, out of its integer range); nothing was written."""

    def __init__(self, task_id: Optional[str], problem: str) -> None:
        where = "the task store" if task_id is None else f"task {task_id!r}: the task store"
        super().__init__(f"{where} cannot hold a value given ({problem}); shorten or correct it")
        self.task_id = task_id
        self.problem = problem


class NotWaiting(LonghaulError):
    """`reply`, `approve` or `deny` found nothing waiting for it (no waiting task on the thread, or not waiting)."""

    def __init__(self, subject: str, problem: str) -> None:
        super().__init__(f"{subject}: {problem}; `longhaul tasks --status waiting` lists the tasks waiting")
        self.subject = subject
        self.problem = problem


class TaskNotResumable(LonghaulError):
    """The task is in a state that cannot be run again without `rerun`."""

    def __init__(self, task_id: str, status: str) -> None:
        if status in ("queued", "running", "waiting"):
            # Not finished: rerun does not apply; say what the task will do and how to stop it.
            hint = (f"it will run to its end without a rerun: `longhaul show {task_id}` shows its progress, "
                    f"`longhaul cancel {task_id}` stops it (then it can be rerun)")
        else:
            hint = f"use `longhaul rerun {task_id}` to run it again from step 1"
        super().__init__(f"task {task_id!r} is {status}; {hint}")
        self.task_id = task_id
        self.status = status


class StepNotForkable(InvalidInput):
    """`fork --at-step N` names a step the task has not checkpointed."""

    def __init__(self, task_id: str, at_step: int, last_step: int) -> None:
        choice = f"between 1 and {last_step}" if last_step else "none: it has no checkpointed step yet"
        super().__init__(f"at_step (--at-step): task {task_id!r} has no checkpointed step {at_step}; "
                         f"its steps are {choice}")
        self.task_id = task_id


class InvalidCursor(InvalidInput):
    """A listing's ``after`` cursor was altered, cut short, or given out for another order."""

    def __init__(self, cursor: str, problem: str) -> None:
        shown = cursor if len(cursor) <= 80 else cursor[:77] + "..."
        super().__init__(f"after (--after) {shown!r}: {problem}; give the cursor a listing printed, unchanged, "
                         "or leave it out to start from the newest task")
        self.cursor = cursor
        self.problem = problem
