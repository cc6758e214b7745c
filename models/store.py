"""`TaskStore`: durable task records, append-only histories, step checkpoints: the face of the store.

The face composes the store's parts, each owning one concept and sharing
one `StoreContext` (database, tables, dialect, prepared statements, clock):

- `TaskWrites` (`tasks.py`): create, snapshot, rerun, cancel, delete, prune;
- `Checkpoints` (`checkpoints.py`): the fenced writes of a running task;
- `TraceStore` (`trace_store.py`): trace events, written and read;
- `TaskReads` (`reads.py`): records and summaries;
- `ThreadReads` (`threads.py`): a thread's story, who runs on it, who starts next;
- `Forks` (`forks.py`): a new task from an earlier step of another;
- `ThreadAdmission` (`thread_admission.py`): a new task on a thread under `if_busy`, atomically;
- `Waiting` (`waiting.py`): tasks waiting for a reply or an approval; steering messages;
- `LeaseBook` (`leases.py`): claims, renewals, releases;
- `migrations.py`: the schema, created or upgraded on open.

Every public call runs inside `StoreFailures`: a driver error leaves it as
`StoreUnavailable` (transient) or `UnstorableValue` (an `InvalidInput`), so
callers handle longhaul's errors only.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .checkpoints import Checkpoints, Recorded
from .clock import Clock, ServerClock
from .codec import NUL_FREE_FIELDS, refuse_nul_identifiers
from .context import StoreContext
from .db import (
    DEFAULT_BUSY_TIMEOUT_MS,
    DEFAULT_POOL_SIZE,
    DEFAULT_SQLITE_SYNCHRONOUS,
    connect_or_explain,
    open_database,
)
from .dialect import Dialect, StoreFailures
from .errors import CorruptRecord, InvalidInput, StoreUnavailable
from .forks import Forks
from .journal import OpenStep
from .leases import Claim, Claimant, LeaseBook, StepBoundary
from .migrations import SchemaMigration, migrate_waiting_for_writers, schema_version
from .paging import TaskPage
from .presumed_writes import MAX_KNOWN_ROWS, KnownRows
from .reads import TaskReads
from .schemas import (
    ChatMessage,
    CheckpointUpdate,
    TaskCheckpointRecord,
    TaskRecord,
    TaskSnapshot,
    TaskSpec,
    TaskStatus,
    TaskSummary,
    Usage,
)
from .space import StoreSpace, measure_space, reclaim_after_delete, vacuum_store
from .statements import Statements
from .tables import bind_tables
from .task_ends import end_counts
from .tasks import NewTask, TaskWrites
from .thread_admission import Admission, ThreadAdmission
from .threads import ThreadReads, ThreadStory
from .trace_store import TraceStore
from .traces import PendingTraces, TraceEventRecord
from .waiting import Wait, Waiting

__all__ = ["SchemaMigration", "TaskStore"]


class TaskStore:
    """The durable state of every task, on SQLite or PostgreSQL.

    Safe to share between threads (each thread gets its own connection; on
    PostgreSQL, from a pool of `pool_size`) and between processes and hosts
    opening the same database. Every write is one transaction; a call that
    raises has changed nothing. Both backends give the same semantics: on
    SQLite writers are serialised by ``BEGIN IMMEDIATE``; on PostgreSQL a
    write that reads a task before changing it locks the task's row
    (``SELECT ... FOR UPDATE``), and multi-statement reads run in one
    REPEATABLE READ snapshot.

    Opening a store creates or upgrades its schema (`schema_migration` says
    from which version); a database written by a newer longhaul raises
    `SchemaTooNew`, and a PostgreSQL server that cannot be reached raises
    `InvalidDatabaseUrl`.
    """

    def __init__(self, url_or_path: Union[str, Path], *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
                 pool_size: int = DEFAULT_POOL_SIZE, clock: Optional[Clock] = None,
                 sqlite_synchronous: str = DEFAULT_SQLITE_SYNCHRONOUS) -> None:
        self.url = str(url_or_path)
        self.db = open_database(url_or_path, busy_timeout_ms=busy_timeout_ms, pool_size=pool_size,
                                sqlite_synchronous=sqlite_synchronous)
        self.tables = bind_tables(self.db)
        dialect = Dialect(self.db)
        #: The database server's clock as this host sees it, unless a clock was injected (see `sync_clock`).
        self.server_clock: Optional[ServerClock] = ServerClock() if clock is None else None
        #: What every part of this store shares.
        self.context = StoreContext(db=self.db, tables=self.tables, dialect=dialect,
                                    sql=Statements(dialect, self.tables), clock=clock or self.server_clock,
                                    known_rows=KnownRows(limit=0 if dialect.is_sqlite else MAX_KNOWN_ROWS))
        if not dialect.is_sqlite:
            connect_or_explain(self.db, self.url)
            self.sync_clock()
        with StoreFailures():  # no borrowed connection: the retry loop inside connects, and waits out SQLITE_BUSY
            self.schema_migration: SchemaMigration = migrate_waiting_for_writers(
                self.context, timeout_s=busy_timeout_ms / 1000)
        self.trace_store = TraceStore(self.context)
        self._tasks = TaskWrites(self.context, self.trace_store)
        self._checkpoints = Checkpoints(self.context, self.trace_store)
        self._reads = TaskReads(self.context)
        self._leases = LeaseBook(self.context)
        self._threads = ThreadReads(self.context)
        self._forks = Forks(self.context)
        self._waiting = Waiting(self.context)
        self._admission = ThreadAdmission(self.context, self._tasks, self._threads, self._waiting)
        # Connections are opened per thread on first use; close (not just
        # pool) this one, so a process that forks after construction does not
        # hand a live connection to its children.
        self.close_all()

    @property
    def clock(self) -> Clock:
        """Seconds since the epoch, now: every time the store writes comes from here."""
        return self.context.clock

    @clock.setter
    def clock(self, clock: Clock) -> None:
        self.context.clock = clock

    def sync_clock(self) -> float:
        """Measure this host's offset from the database server's clock again; returns it in seconds.

        Lease renewal calls this on every heartbeat. A no-op (0.0) on SQLite
        and for a store built with an injected clock, which is the truth.
        """
        if self.server_clock is None or self.context.dialect.is_sqlite:
            return 0.0
        with self.context.call():
            return self.server_clock.sync(self.context.dialect.server_epoch_s)

    # -- lifecycle -----------------------------------------------------------

    def schema_version(self) -> int:
        """The highest schema version recorded in the database."""
        with self.context.call():
            return schema_version(self.tables)

    def read_snapshot(self) -> AbstractContextManager[Any]:
        """A read transaction that sees one snapshot across its statements (see `Dialect.read_snapshot`)."""
        return self.context.dialect.read_snapshot()

    def close(self) -> None:
        """Close this thread's connection (other threads close their own); PostgreSQL's goes back to the pool."""
        if not self.db.is_closed():
            self.db.close()

    def close_all(self) -> None:
        """Close this thread's connection and, on PostgreSQL, every pooled one (other threads' included).

        For when the store is done with: at exit, before a fork, in tests.
        """
        self.close()
        close_pool = getattr(self.db, "close_all", None)
        if close_pool is not None:
            close_pool()

    def __enter__(self) -> TaskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_all()

    # -- task writes ---------------------------------------------------------

    def create_task(self, *, task_id: str, thread_id: str, channel: str, provider: str, model: str,
                    spec: TaskSpec) -> bool:
        """Store a new `queued` task with its spec. False if the id exists (nothing changes)."""
        refuse_nul_identifiers(task_id=task_id, thread_id=thread_id, channel=channel)
        with self.context.call(task_id):
            return self._tasks.create(task_id=task_id, thread_id=thread_id, channel=channel, provider=provider,
                                      model=model, spec=spec)

    def admit_task(self, *, task_id: str, thread_id: str, channel: str, provider: str, model: str,
                   spec: TaskSpec, if_busy: str = "enqueue") -> Admission:
        """Store a new `queued` task on `thread_id` as `if_busy` says, atomically (see `thread_admission.py`).

        ``enqueue``: stored to run after the thread's unfinished tasks;
        ``reject``: not stored if the thread has one (`Admission.refused_by`
        names it); ``interrupt``: stored, and the thread's running tasks are
        asked to stop at their next step boundary, naming this task.
        `Admission.created` is False (nothing changes) if the id exists.
        """
        refuse_nul_identifiers(task_id=task_id, thread_id=thread_id, channel=channel)
        with self.context.call(task_id):
            return self._admission.admit(task_id=task_id, thread_id=thread_id, channel=channel, provider=provider,
                                         model=model, spec=spec, if_busy=if_busy)

    def create_tasks(self, tasks: Sequence[NewTask]) -> list[str]:
        """Store many new `queued` tasks in one transaction; the ids stored (those that existed are left alone).

        All or nothing. Task ids must be distinct within the call
        (`InvalidInput` naming the first repeated one).
        """
        seen: set[str] = set()
        for index, task in enumerate(tasks):
            refuse_nul_identifiers(task_id=task.task_id, thread_id=task.thread_id, channel=task.channel)
            if task.task_id in seen:
                raise InvalidInput(f"tasks[{index}].task_id: {task.task_id!r} is given twice")
            seen.add(task.task_id)
        with self.context.call():
            return self._tasks.create_many(tasks)

    def save_snapshot(self, snapshot: TaskSnapshot, *, lease_token: Optional[str] = None) -> None:
        """Upsert a task's visible state.

        Histories are append-only: messages beyond those already stored are
        appended. A shorter history replaces the stored one, and so does any
        *rerun*: a `running` snapshot over a terminal task deletes its old
        checkpoints, zeroes `checkpoint_count`, clears `final_response` and
        `completed_at`, and starts the histories afresh. A terminal snapshot
        sets `completed_at` and releases the lease.
        """
        refuse_nul_identifiers(**{name: getattr(snapshot, name, None) for name in NUL_FREE_FIELDS})
        with self.context.call(getattr(snapshot, "task_id", None)):
            self._tasks.save_snapshot(snapshot, lease_token=lease_token)

    def reset_for_rerun(self, task_id: str) -> None:
        """Make a finished task `queued` again, to run from step 1.

        Its stale checkpoints and histories are deleted (their trace events
        kept, readable as they were); its spec is kept. Raises
        `TaskNotResumable` if the task has not finished (cancel it first).
        """
        with self.context.call(task_id):
            self._tasks.rerun(task_id)

    def request_cancel(self, task_id: str, *, reason: Optional[str] = None) -> TaskStatus:
        """Cancel a task: at once if nobody runs it, else between its steps.

        Returns the status after the call: `cancelled` when no live lease
        held it, `running` when the running worker will stop after its
        current step, or the terminal status it already had. `reason`
        (default ``cancelled``) starts its `last_error`, e.g.
        ``"interrupted by task 'x' after step 3"``.
        """
        with self.context.call(task_id):
            return self._tasks.request_cancel(task_id, reason=reason)

    def trace_parent(self, task_id: str) -> Optional[str]:
        """The OpenTelemetry trace parent (``<trace id>-<span id>``, hex) the task's runs continue, or None."""
        with self.context.call(task_id):
            return self._tasks.trace_parent(task_id)

    def keep_trace_parent(self, task_id: str, trace_parent: str) -> str:
        """Record the task's trace parent if none is yet (idempotent); returns the one recorded."""
        with self.context.call(task_id):
            return self._tasks.keep_trace_parent(task_id, trace_parent)

    def is_cancel_requested(self, task_id: str) -> bool:
        """Whether `request_cancel` asked the running task to stop (checked between steps)."""
        return self.cancel_reason(task_id) is not None

    def cancel_reason(self, task_id: str) -> Optional[str]:
        """None unless `request_cancel` asked the running task to stop; then why (``cancelled`` by default)."""
        with self.context.call(task_id):
            return self._tasks.cancel_reason(task_id)

    def step_boundary(self, task_id: str) -> StepBoundary:
        """What the loop reads between steps, in one query: `cancel_reason`, and whether steering messages wait."""
        with self.context.call(task_id):
            return self._tasks.step_boundary(task_id)

    def delete_by_thread_id(self, thread_id: str) -> int:
        """Delete every task of a thread with its checkpoints, messages and traces; returns how many tasks."""
        with self.context.call():
            return self._tasks.delete_by_thread_id(thread_id)

    def prune(self, *, max_tasks: Optional[int] = None, older_than_s: Optional[float] = None,
              dry_run: bool = False) -> list[str]:
        """Delete the oldest finished tasks with their checkpoints, messages and traces.

        Keeps the `max_tasks` most recently finished, and/or deletes those
        finished more than `older_than_s` seconds ago. Queued and running
        tasks are never touched. Returns the ids deleted (or, with
        `dry_run`, that would be). On SQLite the freed pages go back to the
        file system (incremental auto-vacuum; a file made by an older
        longhaul needs `vacuum` once for that).
        """
        with self.context.call():
            deleted = self._tasks.prune(max_tasks=max_tasks, older_than_s=older_than_s, dry_run=dry_run)
            if deleted and not dry_run:
                reclaim_after_delete(self.context)
            return deleted

    def space(self) -> StoreSpace:
        """The store's size on disk and how much of it is free (see `space.py`)."""
        with self.context.call():
            return measure_space(self.context)

    def vacuum(self) -> StoreSpace:
        """Rebuild the store compactly; on an older SQLite file, also make later prunes shrink it.

        SQLite: ``VACUUM`` under an exclusive lock (writers wait), needing
        free disk of about the file's size; PostgreSQL: ``VACUUM (ANALYZE)``
        of longhaul's tables, no exclusive lock. Returns the space after.
        """
        with self.context.call():
            vacuum_store(self.context)
            return measure_space(self.context)

    # -- writes of a running task ------------------------------------------------

    def record_checkpoint(self, update: CheckpointUpdate, *, lease_token: Optional[str] = None,
                          lease_expires_at: Optional[float] = None, lease_s: Optional[float] = None,
                          traces: Optional[PendingTraces] = None, usage: Optional[Usage] = None,
                          journal: Optional[OpenStep] = None) -> bool:
        """Append one step's messages and checkpoint, in one transaction.

        With `journal` (the open step `journal_answer` returned, with the
        results `journal_result` stored), `new_messages` is the whole step:
        only the results not yet stored are written, into their reserved
        positions, and the checkpoint marks the step complete.

        Creates the task if missing, increments `checkpoint_count` and sets
        status `running`. Idempotent per ``(task, step_index)``: recording a
        step that is already stored (a redelivered message) changes nothing
        and returns False; the first write wins. A None `checkpoint_note`
        keeps the previous note.

        With `lease_token`, the write happens only while that lease is held
        (else `LeaseLost`), and `lease_expires_at` renews it in the same
        statement; `lease_s` renews it to `lease_s` seconds after the moment
        that statement runs (after any wait for the row lock), which is what
        a lease holder wants: a renewal computed before a long wait could
        already have expired when it commits. `traces` (from a
        `TraceWriter`) and the step's `usage` are written in the same
        transaction: a checkpoint and its trace events
        are stored together or not at all (`TraceSequenceClash` if the
        events do not come after the stored ones). Cost does not grow with
        the history already stored.
        """
        return self._record(update, lease_token=lease_token, lease_expires_at=lease_expires_at, lease_s=lease_s,
                            traces=traces, usage=usage, journal=journal).stored

    def complete_step(self, update: CheckpointUpdate, *, journal: OpenStep, lease_token: Optional[str],
                      lease_s: Optional[float] = None, traces: Optional[PendingTraces] = None) -> StepBoundary:
        """`record_checkpoint` of a journaled step, returning the step boundary its locked read saw.

        What the step loop completes each step with: the boundary it checks
        before the next step (`step_boundary`) comes with the checkpoint, one
        store call fewer per step. It is as of the checkpoint's row lock: a
        cancel or steer committed after that is seen at the boundary after.
        """
        return self._record(update, lease_token=lease_token, lease_s=lease_s, traces=traces, journal=journal).boundary

    def _record(self, update: CheckpointUpdate, **kwargs: Any) -> Recorded:
        refuse_nul_identifiers(**{name: getattr(update, name, None) for name in NUL_FREE_FIELDS})
        with self.context.call(getattr(update, "task_id", None)):
            return self._checkpoints.record(update, **kwargs)

    def journal_answer(self, task_id: str, step_index: int, answer: ChatMessage, *,
                       lease_token: Optional[str] = None, lease_s: Optional[float] = None,
                       traces: Optional[PendingTraces] = None, usage: Optional[Usage] = None) -> OpenStep:
        """Store a model's answer for step `step_index` before any of its tool calls runs; returns the open step.

        One transaction: the assistant message (positioned after the stored
        history, a position reserved per tool call), its turn, tool-call
        count and `usage`, its `traces`, a lease renewal by `lease_s`.
        Fenced like `record_checkpoint` (`LeaseLost`). From then on a resume
        replays this answer (`open_step`) instead of asking the model again;
        `journal_result` adds each result, and `complete_step` (or
        `record_checkpoint(..., journal=step)`) completes the step.
        """
        with self.context.call(task_id):
            return self._checkpoints.journal_answer(task_id, step_index, answer, lease_token=lease_token,
                                                    lease_s=lease_s, traces=traces, usage=usage)

    def journal_result(self, step: OpenStep, call_index: int, result: ChatMessage, *,
                       lease_token: Optional[str] = None, success: Optional[bool] = None) -> OpenStep:
        """Store the result of call `call_index` of an open step, in its reserved position; returns the step with it.

        `success` (whether the call succeeded) is stored with it, so a resume
        reads it back (`OpenStep.result_succeeded`) instead of guessing from
        the text. Fenced (`LeaseLost`); call it as each tool returns, in any order.
        """
        with self.context.call(step.task_id):
            return self._checkpoints.journal_result(step, call_index, result, lease_token=lease_token,
                                                    success=success)

    def open_step(self, task_id: str) -> Optional[OpenStep]:
        """The task's open step: its answer stored, its checkpoint not yet; None if every stored step is complete.

        `OpenStep.pending_calls` are the tool calls that still lack a
        result: what a resumed task runs (with the same idempotency keys)
        before it asks the model anything. `TaskNotFound` if no such task.
        """
        with self.context.call(task_id):
            return self._checkpoints.open_step(task_id)

    def append_messages(self, task_id: str, messages: Sequence[ChatMessage], *, history: str = "execution",
                        lease_token: Optional[str] = None) -> None:
        """Append messages to a task's ``execution`` or ``resumable`` history."""
        execution, resumable = {"execution": (messages, ()), "resumable": ((), messages)}[history]
        self.append_histories(task_id, execution=execution, resumable=resumable, lease_token=lease_token)

    def append_histories(self, task_id: str, *, execution: Sequence[ChatMessage] = (),
                         resumable: Sequence[ChatMessage] = (), lease_token: Optional[str] = None,
                         traces: Optional[PendingTraces] = None) -> StepBoundary:
        """Append messages to both of a task's histories in one transaction (a task's opening turns).

        With `traces`, its trace events too, fenced like checkpoints: a task's
        first run writes its opening turns and its first events together.
        Returns `step_boundary` as the write's locked read saw it.
        """
        with self.context.call(task_id):
            return self._checkpoints.append_histories(task_id, execution=execution, resumable=resumable,
                                               lease_token=lease_token, traces=traces)

    def finish(self, task_id: str, status: TaskStatus, *, final_response: Optional[str] = None,
               last_error: Optional[str] = None, new_messages: Sequence[ChatMessage] = (),
               resumable_messages: Sequence[ChatMessage] = (), lease_token: Optional[str] = None,
               traces: Optional[PendingTraces] = None, usage: Optional[Usage] = None) -> None:
        """Move a task to a terminal status, appending its last messages, traces and usage.

        Releases the lease. A step left open (`open_step`) gets a synthetic
        result for each pending tool call, saying the task ended, so the
        history never holds a call without its result. With `lease_token`, only the lease holder may
        finish the task (else `LeaseLost`, nothing written). `last_error` is
        stored with secrets redacted.
        """
        with self.context.call(task_id):
            self._checkpoints.finish(task_id, status, final_response=final_response, last_error=last_error,
                                     new_messages=new_messages, resumable_messages=resumable_messages,
                                     lease_token=lease_token, traces=traces, usage=usage)

    # -- traces ----------------------------------------------------------------

    def append_traces(self, task_id: str, traces: PendingTraces, *, lease_token: Optional[str] = None) -> None:
        """Write trace events outside a checkpoint (a resume, a shutdown); fenced like checkpoints."""
        with self.context.call(task_id):
            self.trace_store.append(task_id, traces, lease_token=lease_token)

    def next_trace_sequence(self, task_id: str) -> int:
        """The sequence number after the highest stored for the task (0 if none)."""
        with self.context.call(task_id):
            return self.trace_store.next_sequence(task_id)

    def traces(self, task_id: str, *, after_sequence: int = -1, limit: Optional[int] = None) -> list[TraceEventRecord]:
        """The task's trace events in sequence order, those after `after_sequence` only.

        Text stored once, in a message, comes back in its event, redacted
        like the rest of the event's data.
        """
        with self.context.call(task_id):
            return self.trace_store.events(task_id, after_sequence=after_sequence, limit=limit)

    # -- starting a run ----------------------------------------------------------

    def start(self, task_id: str, claimant: Claimant, *, lease_s: float,
              steal_token: Optional[str] = None) -> Optional[Claim]:
        """`LeaseBook.claim`, and what the run starts from, in one store call (one borrowed connection).

        The claim's `Claim.record` is the task without checkpoints, built from
        the row the claim's own transaction read back; its histories are read
        after the claim commits, and only if it has any, so starting a new
        task is the claim alone. None if the lease is not the caller's. If
        the record cannot be read (a corrupt cell, an outage), the claim
        still stands with `record` None: the run reads it with `get`, which
        raises where the run handles it.
        """
        with self.db.first_in_line(), self.context.call(task_id):  # served ahead of other calls (`db._PoolRepairs`)
            claim, row = self._leases.claim_row(task_id, claimant, lease_s=lease_s, steal_token=steal_token)
            if claim is None:
                return None
            try:
                with self.context.call(task_id):  # nested: a driver error is translated before it is caught here
                    return replace(claim, record=self._reads.claimed(row))
            except (CorruptRecord, StoreUnavailable):
                return claim

    # -- reads -----------------------------------------------------------------

    def load(self, task_id: str, *, checkpoints: bool = True, latest_checkpoints: Optional[int] = None,
             histories: bool = True) -> Optional[TaskRecord]:
        """The whole record of a task, or None if no such task is stored.

        Read in one transaction: a consistent snapshot even while the task
        runs. ``checkpoints=False`` skips decoding every checkpoint's items
        (a resume needs only `last_step_index`), which is what keeps
        rebuilding a long task's state cheap. `latest_checkpoints` keeps only
        that many of the newest checkpoints (still in step order; the
        record's `checkpoint_count` says how many there are), and
        ``histories=False`` leaves both histories empty: what `show` reads,
        in time and memory that do not grow with the task's length.
        """
        with self.context.call(task_id):
            return self._reads.load(task_id, checkpoints=checkpoints, latest_checkpoints=latest_checkpoints,
                                    histories=histories)

    def get(self, task_id: str, *, checkpoints: bool = True, latest_checkpoints: Optional[int] = None,
            histories: bool = True) -> TaskRecord:
        """Like `load`, but raises `TaskNotFound`."""
        with self.context.call(task_id):
            return self._reads.get(task_id, checkpoints=checkpoints, latest_checkpoints=latest_checkpoints,
                                   histories=histories)

    def load_by_thread_id(self, thread_id: str, *, exclude_task_id: Optional[str] = None) -> Optional[TaskRecord]:
        """The thread's most recently updated task, or None."""
        with self.context.call():
            return self._reads.load_by_thread_id(thread_id, exclude_task_id=exclude_task_id)

    def thread_story(self, thread_id: str, *, before_task_id: Optional[str] = None) -> ThreadStory:
        """The thread's turns: its finished tasks' prompts and answers (or how they ended), in arrival order.

        With `before_task_id`, only the tasks that arrived before that one
        (what that task starts from). See `threads.py`.
        """
        with self.context.call():
            return self._threads.story(thread_id, before_task_id=before_task_id)

    def fork(self, task_id: str, *, at_step: int, new_task_id: str, thread_id: str,
             prompt: Optional[str] = None) -> bool:
        """A new `queued` task with `task_id`'s history through step `at_step` (see `forks.py`).

        False if `new_task_id` is taken (nothing changes); `StepNotForkable`
        if the original has no checkpoint `at_step`; the original is only read.
        """
        with self.context.call(task_id):
            return self._forks.fork(task_id, at_step=at_step, new_task_id=new_task_id, thread_id=thread_id,
                                    prompt=prompt)

    def thread_busy(self, thread_id: str, *, excluding: Optional[str] = None) -> list[tuple[str, TaskStatus]]:
        """The thread's unfinished tasks as ``(task_id, status)``, running ones first, then in arrival order."""
        with self.context.call():
            return self._threads.busy(thread_id, excluding=excluding)

    # -- waiting for a reply or an approval; steering (see `waiting.py`) ---------------------------

    def wait_for_user(self, task_id: str, wait: Wait, *, lease_token: Optional[str] = None) -> None:
        """Fenced: the running task waits (status `waiting`, no lease, nothing due) for what `wait` says."""
        with self.context.call(task_id):
            self._waiting.wait(task_id, wait, lease_token=lease_token)

    def waiting_task(self, thread_id: str) -> Optional[str]:
        """The thread's task that waits for a reply or an approval, or None."""
        with self.context.call():
            return self._waiting.waiting_task(thread_id)

    def wait_of(self, task_id: str) -> Optional[Wait]:
        """What the task waits (or last waited) for, with the decision once answered; None if it never waited."""
        with self.context.call(task_id):
            return self._waiting.wait_of(task_id)

    def answer_wait(self, task_id: str, text: str, *, decision: str = "replied",
                    kinds: tuple[str, ...] = ("reply",)) -> Wait:
        """Store `text` as the waiting call's result; the task is resumable (send it). `NotWaiting` otherwise."""
        with self.context.call(task_id):
            return self._waiting.answer(task_id, text, decision=decision, kinds=kinds)

    def approve(self, task_id: str) -> Wait:
        """Approve the call the task waits on; the task is resumable (send it). `NotWaiting` otherwise."""
        with self.context.call(task_id):
            return self._waiting.approve(task_id)

    def expire_waits(self, *, limit: int = 100) -> list[str]:
        """End (`timed_out`) the waiting tasks whose reply timeout has passed; their ids."""
        with self.context.call():
            return self._waiting.expire(limit=limit)

    def take_steering(self, task_id: str, *, lease_token: Optional[str] = None) -> list[ChatMessage]:
        """Fenced: the steering messages sent to the running task, now appended to its histories."""
        with self.context.call(task_id):
            return self._waiting.take_steering(task_id, lease_token=lease_token)

    def next_startable(self, task_id: str) -> Optional[str]:
        """The task of `task_id`'s thread that may start now, or None (something runs, or nothing waits)."""
        with self.context.call(task_id):
            return self._threads.next_startable(task_id)

    def summary(self, task_id: str) -> TaskSummary:
        """A task without its histories (cheap to poll); `TaskNotFound` if missing."""
        with self.context.call(task_id):
            return self._reads.summary(task_id)

    def latest_checkpoint(self, task_id: str) -> Optional[TaskCheckpointRecord]:
        """The checkpoint with the highest step index, or None."""
        with self.context.call(task_id):
            return self._reads.latest_checkpoint(task_id)

    def list_tasks(self, status: Union[TaskStatus, str, None] = None, thread_id: Optional[str] = None,
                   limit: int = 100, *, offset: int = 0, after: Optional[str] = None, order_by: str = "updated",
                   provider: Optional[str] = None, since: Optional[datetime] = None,
                   until: Optional[datetime] = None) -> list[TaskSummary]:
        """Tasks without their histories, newest first: `page_tasks` without the cursors."""
        return self.page_tasks(status, thread_id, limit, offset=offset, after=after, order_by=order_by,
                               provider=provider, since=since, until=until).tasks

    def page_tasks(self, status: Union[TaskStatus, str, None] = None, thread_id: Optional[str] = None,
                   limit: int = 100, *, offset: int = 0, after: Optional[str] = None, order_by: str = "updated",
                   provider: Optional[str] = None, since: Optional[datetime] = None,
                   until: Optional[datetime] = None) -> TaskPage:
        """A page of tasks without their histories, newest first, with each task's cursor.

        `since`/`until` bound the creation time; `order_by` is ``updated``
        or ``created``. Page on with ``after=page.next_cursor(limit)``: a
        keyset seek on the listing index (`paging.py`), as fast at the
        100,000th task as at the first, and stable while tasks are added.
        `offset` still works (it skips index entries, so it grows slowly
        with the offset) but not together with `after`. A cursor that was
        altered or is for another `order_by` raises `InvalidCursor`.
        """
        with self.context.call():
            return self._reads.page_tasks(status, thread_id, limit, offset=offset, after=after, order_by=order_by,
                                          provider=provider, since=since, until=until)

    def count_tasks(self, status: Union[TaskStatus, str, None] = None) -> int:
        """How many tasks are stored (with this status)."""
        with self.context.call():
            return self._reads.count_tasks(status)

    def task_end_counts(self) -> dict[tuple[str, str], int]:
        """{(terminal status, agent): how many tasks reached it}, counted as each ended (`task_ends.py`)."""
        with self.context.call():
            return end_counts(self.context)

    def task_spec(self, task_id: str) -> TaskSpec:
        """The spec a task was created with (`CorruptRecord` if it cannot be read)."""
        with self.context.call(task_id):
            return self._reads.task_spec(task_id)

    def task_specs(self, task_ids: Sequence[str]) -> dict[str, Optional[TaskSpec]]:
        """The specs of many tasks in few queries: None for one that cannot be read, absent for a missing task."""
        with self.context.call():
            return self._reads.task_specs(list(task_ids))

    def time_budgets(self, task_ids: Sequence[str]) -> dict[str, tuple[Optional[float], Optional[float]]]:
        """`time_budget` of many tasks in few queries (absent: no such task; a corrupt spec: no limit)."""
        with self.context.call():
            return self._reads.time_budgets(list(task_ids))

    def time_budget(self, task_id: str) -> tuple[Optional[float], Optional[float]]:
        """``(time_limit_s, started_at)`` of a task: its budget and when it first ran."""
        with self.context.call(task_id):
            return self._reads.time_budget(task_id)
