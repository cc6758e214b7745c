"""`PresumedWrite`: a lease holder's step write on PostgreSQL in one round trip, fenced on what its row holds.

A step write (`locked_writes.py`) reads the task row locked, decides from
it (the lease, the next message position, the next trace sequence), then
writes: two round trips, because the writes wait for the reads' answers.
But a lease holder writing its own task's steps one after another already
knows what its row holds after each of its writes: nothing else writes a
leased task's steps. `KnownRows` keeps that, per store, by task and lease
token, and `PresumedWrite` sends the writes decided from it as one
statement whose task update is conditional on those values, the *fence*::

    WITH "fenced" AS (UPDATE "task" SET ... WHERE "id" = %s
                      AND "lease_token" = %s AND "execution_count" = %s AND "trace_next_sequence" = %s
                      RETURNING <the step boundary's columns>),
         "write_0" AS (INSERT INTO "checkpoint" (...) SELECT %s, ... FROM "fenced"),
         ...
    SELECT * FROM "fenced"

What that keeps, and how:

- The values are a guess the database checks, never the truth: the row
  holding anything else (another writer appended messages or traces, a
  takeover changed the lease) makes the update match no row, every insert
  reads no row from it, and nothing is written. The caller then forgets the
  guess and writes the locked way, deciding on what it reads. Losing the
  guesses (a new process, an evicted task) costs a round trip, nothing else.
- A repeated step (its checkpoint already stored) or a taken message
  position fails the statement on its unique key, a deleted task on its
  foreign key: nothing is written, and the locked write then finds out why.
- One statement is one transaction (the pool's connections are in
  autocommit): no ``BEGIN``, no ``COMMIT``, no pipeline. Its update takes the
  row lock; after waiting for it, READ COMMITTED checks the ``WHERE`` again
  on the row as committed, so a fence is never passed on a stale version.
- The inserts are members that select from the update's result: they run
  only if the fence held. Each is an ``INSERT ... SELECT`` of its own
  parameters, whose types PostgreSQL takes from the target columns.
- What the update returns is the step boundary (cancel, steer) as of the
  write, which the locked write reads under its lock.
- A connection with input waiting while idle (a server that restarted has
  sent its goodbye or closed it) is not used: a write sent on it would have
  an unknown outcome. The locked write replaces it first (its first round
  trip holds only reads). A connection lost while the statement is in
  flight raises, as a lost commit does (`StoreUnavailable`).
"""

from __future__ import annotations

import select
import sys
import threading
from functools import lru_cache
from typing import Any, NamedTuple, Optional, Sequence

from peewee import IntegrityError

from .drivers import loaded_psycopg

#: Tasks whose rows one store remembers (a worker process holds at most its concurrency in flight).
MAX_KNOWN_ROWS = 4096
#: Most writes one presumed statement carries; a step with more is written the locked way.
MAX_PRESUMED_WRITES = 32
#: The columns the fenced update returns: the step boundary (`leases.step_boundary`).
BOUNDARY_RETURNING = '"cancel_requested", "cancel_reason", ("steering" IS NOT NULL)'


class KnownRow(NamedTuple):
    """What a task's row holds after this store's last write under `lease_token` (a guess the fence checks)."""

    lease_token: str
    task_pk: int
    execution_count: int
    trace_next_sequence: int
    #: The highest stored step, -1 for none; None when this store has not read it under this lease.
    highest_step: Optional[int]


class KnownRows:
    """A store's `KnownRow` per task id, the most recently written `MAX_KNOWN_ROWS` of them."""

    def __init__(self, limit: int = MAX_KNOWN_ROWS) -> None:
        self.limit = limit
        self._rows: dict[str, KnownRow] = {}
        self._lock = threading.Lock()

    def get(self, task_id: str, lease_token: Optional[str]) -> Optional[KnownRow]:
        """The row as this store last wrote it under `lease_token`; None if not known (or no lease)."""
        row = self._rows.get(task_id)
        return row if row is not None and lease_token is not None and row.lease_token == lease_token else None

    def remember(self, task_id: str, row: KnownRow) -> None:
        if not self.limit:
            return
        with self._lock:
            self._rows.pop(task_id, None)  # to the end: the oldest write goes first
            self._rows[task_id] = row
            if len(self._rows) > self.limit:
                del self._rows[next(iter(self._rows))]

    def forget(self, task_id: str) -> None:
        with self._lock:
            self._rows.pop(task_id, None)


class PresumedWrite:
    """A step's writes, decided from a `KnownRow`, sent as one fenced statement (see the module docstring).

    It takes the writes as a `LockedWrite` does (`execute`, `execute_many`):
    exactly one ``UPDATE "task" ... WHERE "id" = %s`` and any number of
    ``INSERT ... VALUES (...)``; `send` then returns the step boundary's
    columns, or None where the fence did not hold (nothing written).
    """

    def __init__(self, db: Any, known: KnownRow) -> None:
        self.db = db
        self.known = known
        self._update: Optional[tuple[str, Sequence[Any]]] = None
        self._inserts: list[tuple[str, Sequence[Any]]] = []

    def execute(self, sql: str, params: Sequence[Any]) -> None:
        if sql.startswith('UPDATE "task" SET '):
            if self._update is not None or not sql.endswith(' WHERE "id" = %s'):
                raise ValueError("a presumed write takes one task update, by id")
            self._update = (sql, params)
        elif sql.startswith("INSERT INTO ") and " VALUES (" in sql and sql.endswith(")"):
            self._inserts.append((sql, params))
        else:
            raise ValueError(f"a presumed write takes task updates and inserts, not {sql[:40]!r}")

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        for row in rows:
            self.execute(sql, row)

    def send(self) -> Optional[tuple[Any, ...]]:
        """Send the writes as one statement; the boundary columns it returned, or None (the fence failed,
        or a unique or foreign key refused a row: nothing was written either way)."""
        if self._update is None or len(self._inserts) >= MAX_PRESUMED_WRITES:
            return None
        known = self.known
        update_sql, update_params = self._update
        params: list[Any] = [*update_params, known.lease_token, known.execution_count, known.trace_next_sequence]
        for _sql, values in self._inserts:
            params.extend(values)
        statement = fenced_statement(update_sql, tuple(sql for sql, _values in self._inserts))
        try:
            return self.db.execute_sql(statement, params).fetchone()  # type: ignore[no-any-return]
        except IntegrityError:
            return None


def connection_quiet(conn: Any) -> bool:
    """Whether `conn` (psycopg) is open, idle, and has nothing waiting to be read: safe for a write whose
    outcome must be known (a server that ended the session has sent its error or closed the socket)."""
    if conn.closed or conn.broken:
        return False
    pgconn = conn.pgconn
    if pgconn.transaction_status != loaded_psycopg().pq.TransactionStatus.IDLE:
        return False
    poller = _native_poll()()
    poller.register(pgconn.socket, select.POLLIN)
    return not poller.poll(0)


_unpatched_poll: list[Any] = []  # the operating system's poll, once found in a process gevent patched


def _native_poll() -> Any:
    """The operating system's ``poll`` (gevent's patched one makes a zero-timeout check a trip to its hub)."""
    if _unpatched_poll:
        return _unpatched_poll[0]
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("select"):
        _unpatched_poll.append(monkey.get_original("select", "poll"))
        return _unpatched_poll[0]
    return select.poll


@lru_cache(maxsize=256)
def fenced_statement(update_sql: str, insert_sqls: tuple[str, ...]) -> str:
    """The one statement of a presumed write: the fenced update, then each insert selecting from it.

    Parameters: the update's, then the fence's (lease token, execution
    count, trace sequence), then each insert's, in order.
    """
    members = [f'"fenced" AS ({update_sql} AND "lease_token" = %s AND "execution_count" = %s '
               f'AND "trace_next_sequence" = %s RETURNING {BOUNDARY_RETURNING})']
    for index, sql in enumerate(insert_sqls):
        head, _, values = sql.partition(" VALUES (")
        members.append(f'"write_{index}" AS ({head} SELECT {values[:-1]} FROM "fenced")')
    return f'WITH {", ".join(members)} SELECT * FROM "fenced"'
