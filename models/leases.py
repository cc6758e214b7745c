"""Leases: which worker runs a task, claimed and renewed atomically.

A claim is one conditional ``UPDATE``: it succeeds only while nobody holds a
live lease, so a boot scan, a redelivered message, an operator's resume and
workers on other hosts can race freely and exactly one of them runs the
task. Every claim gets a fresh token; checkpoints and the final status are
written only by the token's holder.

Why one conditional UPDATE is atomic on both backends:

- SQLite: it runs inside ``BEGIN IMMEDIATE``, so writers are serialised and
  the ``WHERE`` is evaluated with nobody else writing.
- PostgreSQL (READ COMMITTED): the UPDATE locks the row it changes. A second
  claimant's UPDATE blocks on that lock and, once the first commits,
  re-evaluates its ``WHERE`` against the committed row (which now holds a
  live lease) and changes nothing. A queued task is also claimed only while
  its thread is free (`thread_rule.startable`, whose docstring says why that
  holds across tasks). So ``SELECT ... FOR UPDATE SKIP LOCKED``
  is not needed: claims are by task id (the message names the task), not
  "any free task". ``UPDATE ... RETURNING`` hands back the counters the
  claim needs in the same statement, with no follow-up SELECT.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from peewee import NodeList, __exception_wrapper__

from .context import HasContext, named_row, row_by_name
from .errors import LeaseLost
from .presumed_writes import KnownRow
from .schemas import TaskRecord, TaskStatus
from .statements import CLAIMABLE as _CLAIMABLE
from .statements import LAST_STEP_COLUMN, STORY_BEFORE_COLUMN
from .tables import NO_LEASE
from .thread_rule import startable


@dataclass(frozen=True)
class Claimant:
    """The worker process asking for a lease."""

    owner: str  # unique per worker process: "host:pid:random"
    host: str
    pid: int
    pid_started_at: Optional[float] = None  # guards against a recycled pid


#: What the step loop reads between steps: the cancel reason (None: no cancel asked), and whether steering waits.
StepBoundary = tuple[Optional[str], bool]


def step_boundary(cancel_requested: Any, cancel_reason: Optional[str], steering_waits: Any) -> StepBoundary:
    """A `StepBoundary` from a task row's ``cancel_requested``, ``cancel_reason`` and "steering is not null"."""
    return (cancel_reason or "cancelled") if cancel_requested else None, bool(steering_waits)


@dataclass(frozen=True)
class Claim:
    """A lease this process now holds."""

    task_id: str
    token: str
    expires_at: float
    recovery_count: int
    resumed: bool  # the task had run before (crash, shutdown or takeover)
    #: The task's next trace sequence when claimed (None: not read; ask `TaskStore.next_trace_sequence`).
    trace_next_sequence: Optional[int] = None
    #: The claim took a lease another holder still had on the row (expired, or `steal_token`'s): a takeover.
    took_over: bool = False
    #: The task as claimed, without checkpoints (`TaskStore.start`); None: not read, ask `TaskStore.get`.
    record: Optional[TaskRecord] = field(default=None, compare=False, repr=False)
    #: The step boundary (`TaskStore.step_boundary`) as the claim's own transaction read it: a resumed
    #: run's first (a new task's comes with its opening histories, `TaskStore.append_histories`).
    first_boundary: Optional[StepBoundary] = None
    #: Whether the task's thread has a finished task before it (False: its story before it is empty, not read).
    story_before: bool = True


@dataclass(frozen=True)
class LeaseRow:
    """A non-terminal task as the recovery scan sees it."""

    task_id: str
    status: TaskStatus
    token: Optional[str]
    host: Optional[str]
    pid: Optional[int]
    pid_started_at: Optional[float]
    expires_at: Optional[float]
    delivery_due_at: Optional[float]
    #: The broker's id of the message last sent, if known (cleared when a retry or recovery replaces it).
    message_id: Optional[str] = None


def require_lease(task_id: str, stored_token: Optional[str], lease_token: Optional[str]) -> None:
    """The fence of every write a lease holder makes: `LeaseLost` unless the task's row still holds its token.

    `stored_token` is the token on the row read (locked) in the write's own
    transaction, None if the row or its lease is gone; `lease_token` None is
    an unfenced write (an operator's, a test's), always allowed.
    """
    if lease_token is not None and stored_token != lease_token:
        raise LeaseLost(task_id)


class LeaseBook:
    """Lease operations on a `TaskStore`'s tasks (driver errors raised as `StoreUnavailable`)."""

    def __init__(self, store: HasContext) -> None:
        self.ctx = store.context
        self.db = self.ctx.db
        self.Task = self.ctx.tables.Task

    def claim(
        self, task_id: str, claimant: Claimant, *, lease_s: float, steal_token: Optional[str] = None
    ) -> Optional[Claim]:
        """Take the task's lease, or None if a live lease (other than `steal_token`) holds it.

        Only `queued` and `running` tasks can be claimed, and a queued one
        only when its thread is free (`thread_rule.startable`): nothing else of
        the thread runs and nothing that arrived before it waits. Taking over a
        lease that another holder still had on the row (it expired, or its
        process died) counts as a recovery; claiming a task whose lease was
        given back (a graceful shutdown, a retry) does not. A checkpoint
        resets the count (`Checkpoints.record`), so it counts interruptions
        without progress, not a task's age.
        """
        return self.claim_row(task_id, claimant, lease_s=lease_s, steal_token=steal_token)[0]

    def claim_row(
        self, task_id: str, claimant: Claimant, *, lease_s: float, steal_token: Optional[str] = None
    ) -> tuple[Optional[Claim], Any]:
        """`claim`, and the task's row as the claim left it (None if not claimed).

        The row is a namespace of the task's columns by name with its highest
        stored step (``last_step_index``) and whether its thread has a
        finished task before it (``story_before``): what a start reads, from the
        claim's own transaction (PostgreSQL: the UPDATE's ``RETURNING``).
        Both statements are rendered once per store (`Statements.claim`).
        """
        ctx = self.ctx
        sql = ctx.sql
        now = ctx.clock()
        token = uuid.uuid4().hex
        prepared = sql.claim if steal_token is None else sql.claim_stealing
        params = prepared.params(now=now, token=token, owner=claimant.owner, host=claimant.host, pid=claimant.pid,
                                 pid_started_at=claimant.pid_started_at, expires_at=now + lease_s, task_id=task_id,
                                 steal_token=steal_token)
        if ctx.dialect.returning:
            # PostgreSQL: the locked read of who held it and the UPDATE ... RETURNING go in one round trip,
            # and the sync that commits them in a second (`dialect.locked_write`); statement by statement
            # with BEGIN and COMMIT it was four, each holding a pooled connection while a thousand threads
            # queue for one. The UPDATE starts once the read holds the row lock: its snapshot sees every
            # commit made before.
            with ctx.call(task_id), ctx.dialect.locked_write() as write:
                held, values = write.read((sql.select_lease_token, (task_id,)), (prepared.sql, params))
            if values is None:
                return None, None
            row = row_by_name(sql.claimed_columns, values)
            last_step = getattr(row, LAST_STEP_COLUMN)
            ctx.known_rows.remember(task_id, KnownRow(token, row.id, row.execution_count, row.trace_next_sequence or 0,
                                                      -1 if last_step is None else last_step))
        else:
            with ctx.call(task_id), self.db.atomic():
                # Who held it before (read locked: the update below is what releases the row): a takeover or not.
                held = self.db.execute_sql(sql.select_lease_token, (task_id,)).fetchone()
                cursor = self.db.execute_sql(prepared.sql, params)
                if cursor.rowcount <= 0:
                    return None, None
                # SQLite: peewee leaves RETURNING off (it needs 3.35+); BEGIN IMMEDIATE keeps this read consistent.
                cursor = self.db.execute_sql(sql.select_claimed_row.sql, sql.select_claimed_row.params(task_id=task_id))
                values = cursor.fetchone()
                if values is None:
                    return None, None
                row = named_row(cursor, values)
        # It ran before if it was interrupted, stored a step, or opened its histories.
        claim = Claim(task_id=task_id, token=token, expires_at=now + lease_s, recovery_count=row.recovery_count,
                      resumed=row.recovery_count > 0 or row.checkpoint_count > 0 or row.execution_count > 0,
                      trace_next_sequence=row.trace_next_sequence or 0,
                      took_over=held is not None and held[1] is not None,
                      first_boundary=step_boundary(row.cancel_requested, row.cancel_reason, row.steering is not None),
                      story_before=bool(getattr(row, STORY_BEFORE_COLUMN)))
        return claim, row

    def renew(self, tokens: Iterable[str], *, lease_s: float) -> int:
        """Extend the leases with these tokens; returns how many are still held."""
        tokens = list(tokens)
        if not tokens:
            return 0
        Task = self.Task
        with self.ctx.call(), self.db.atomic():
            self.ctx.dialect.limit_lock_wait()
            return (
                Task.update(lease_expires_at=self.ctx.clock() + lease_s)
                .where(Task.lease_token.in_(tokens))
                .execute()
            )

    def release(self, task_id: str, token: str, *, redeliver_at: Optional[float] = None) -> bool:
        """Give up a lease; the task stays `running`, to be resumed.

        With `redeliver_at` None the recovery scan of any worker picks the
        task up at once (graceful shutdown); otherwise a message (a Dramatiq
        retry) is due then, and recovery waits for it.
        """
        Task = self.Task
        with self.ctx.call(task_id), self.db.atomic():
            return bool(
                Task.update(delivery_due_at=redeliver_at, delivery_message_id=None, updated_at=self.ctx.clock(),
                            **NO_LEASE)
                .where((Task.task_id == task_id) & (Task.lease_token == token))
                .execute()
            )

    def holder(self, task_id: str) -> Optional[LeaseRow]:
        """The task's status and lease as stored now, or None if there is no such task."""
        with self.ctx.call(task_id):
            row = self._lease_rows().where(self.Task.task_id == task_id).first()
        return None if row is None else _lease_row(row)

    def holds(self, task_id: str, token: str) -> bool:
        """Whether `token` still holds the task's lease."""
        Task = self.Task
        with self.ctx.call(task_id):
            return Task.select().where((Task.task_id == task_id) & (Task.lease_token == token)).exists()

    def unfinished(self, *, limit: int = 1000) -> list[LeaseRow]:
        """Running tasks and queued ones whose thread is free, oldest update first: what recovery inspects.

        A queued task waiting for its thread is not interrupted: the end of
        the task before it sends it (and, should that worker die first,
        this scan finds it once the thread is free).
        """
        Task = self.Task
        rows = self._lease_rows().where(Task.status.in_(_CLAIMABLE) & startable(Task)).order_by(Task.updated_at)
        with self.ctx.call():
            return [_lease_row(row) for row in rows.limit(limit)]

    def _lease_rows(self):  # type: ignore[no-untyped-def]
        Task = self.Task
        return Task.select(
            Task.task_id, Task.status, Task.lease_token, Task.lease_host, Task.lease_pid,
            Task.lease_pid_started_at, Task.lease_expires_at, Task.delivery_due_at, Task.delivery_message_id,
        ).tuples()

    def take_for_redelivery(self, row: LeaseRow) -> bool:
        """Mark an interrupted task as "a message is on its way", clearing any dead lease.

        A compare-and-set against what the recovery scan read (the lease
        token, else the delivery time), so when every worker process scans
        at boot exactly one of them wins and re-sends the task. Returns
        False if the task changed in between. Clearing a lease its holder
        still had (expired, or its process is gone) counts as a recovery,
        as a takeover by `claim` does.
        """
        return bool(self.take_all_for_redelivery([row]))

    def take_all_for_redelivery(self, rows: Sequence[LeaseRow]) -> list[str]:
        """`take_for_redelivery` for all of `rows` in one transaction; the ids of those taken, in `rows`' order.

        One locked read finds the rows unchanged since the scan (the same
        compare-and-set, row by row), then at most two updates take them. A
        thousand tasks interrupted by a host's SIGKILL are taken in a few
        round trips where one transaction each cost about 2 s on
        PostgreSQL. Meant for batches of a few hundred (`worker.recovery`);
        a row lock held past the lock timeout (a paused worker's) fails the
        whole call with `StoreUnavailable`, and taking the batch row by row
        then skips that row alone.
        """
        if not rows:
            return []
        Task = self.Task
        unchanged = Task.task_id.in_([row.task_id for row in rows]) & Task.status.in_(_CLAIMABLE)
        # One flat OR (nesting ``a | b | ...`` overflows SQLite's parser at a few hundred rows).
        same = NodeList([(Task.task_id == row.task_id) & self._unchanged_since(row) for row in rows],
                        glue=" OR ", parens=True)
        with self.ctx.call(), self.db.atomic():
            self.ctx.dialect.limit_lock_wait()
            query = Task.select(Task.task_id, Task.lease_token).where(unchanged & same).tuples()
            found = dict(self.ctx.dialect.locked(query))
            now = self.ctx.clock()
            # A lease cleared (its holder expired or died) counts as a recovery; an unsent message does not.
            for ids, recovered in (([t for t, token in found.items() if token is not None], 1),
                                   ([t for t, token in found.items() if token is None], 0)):
                if ids:
                    Task.update(delivery_due_at=now, delivery_message_id=None,
                                recovery_count=Task.recovery_count + recovered, **NO_LEASE,
                                ).where(Task.task_id.in_(ids)).execute()
        return [row.task_id for row in rows if row.task_id in found]

    def _unchanged_since(self, row: LeaseRow) -> Any:
        """The condition that the task's row still holds what the recovery scan read in `row`."""
        Task = self.Task
        if row.token is not None:
            # Unchanged expiry too: a holder that renewed (or checkpointed) since the scan keeps its task.
            expiry = (Task.lease_expires_at.is_null() if row.expires_at is None
                      else Task.lease_expires_at == row.expires_at)
            return (Task.lease_token == row.token) & expiry
        if row.delivery_due_at is None:
            return Task.lease_token.is_null() & Task.delivery_due_at.is_null()
        return Task.lease_token.is_null() & (Task.delivery_due_at == row.delivery_due_at)

    def note_sent(self, task_id: str, *, message_id: Optional[str] = None) -> None:
        """Record that a message (with this broker id, if known) for an unleased task was just sent.

        Recovery then waits for it: while the broker still holds the message
        when `message_id` is known, else for the redelivery grace period.
        """
        Task = self.Task
        with self.ctx.call(task_id), self.db.atomic():
            Task.update(delivery_due_at=self.ctx.clock(), delivery_message_id=message_id).where(
                (Task.task_id == task_id) & Task.lease_token.is_null()).execute()

    def park(self, task_id: str) -> bool:
        """A delivery found the queued task's thread busy: no message is on its way any more.

        The task then waits holding no worker thread and no lease; the end
        of the task before it sends it (`ThreadReads.next_startable`), and
        recovery does if that never happens. Returns False if the task was
        claimed or finished meanwhile.
        """
        Task = self.Task
        with self.ctx.call(task_id), self.db.atomic():
            return bool(Task.update(delivery_due_at=None, delivery_message_id=None).where(
                (Task.task_id == task_id) & (Task.status == TaskStatus.QUEUED.value)
                & Task.lease_token.is_null()).execute())

    def note_sent_many(self, sent: Sequence[tuple[str, Optional[str]]]) -> None:
        """`note_sent` for many ``(task_id, message_id)`` pairs: one transaction, one executemany."""
        if not sent:
            return
        now = self.ctx.clock()
        with self.ctx.call(), self.db.atomic(), __exception_wrapper__:
            self.db.cursor().executemany(self.ctx.sql.note_sent,
                                         [(now, message_id, task_id) for task_id, message_id in sent])

    def note_unsent(self, task_id: str) -> None:
        """Record that no message for an unleased task is on its way (the broker refused it): recovery sends one."""
        Task = self.Task
        with self.ctx.call(task_id), self.db.atomic():
            Task.update(delivery_due_at=None, delivery_message_id=None).where(
                (Task.task_id == task_id) & Task.lease_token.is_null()).execute()


def _lease_row(row: tuple) -> LeaseRow:  # type: ignore[type-arg]
    task_id, status, token, host, pid, started, expires, due, message_id = row
    return LeaseRow(task_id, TaskStatus(status), token, host, pid, started, expires, due, message_id)
