"""`LockedWrite`: a step's write transaction, its locked reads first, in as few round trips as the backend allows.

A step write (`Checkpoints.record`, `journal_answer`, `journal_result`)
reads the task row locked, decides from it (the lease fence, the trace
sequence, positions, a repeated step), then writes rows whose values depend
on what it read, and commits. Nothing it writes needs a result back.

- SQLite: ``BEGIN IMMEDIATE`` (the process's writer lock, then the file's),
  the reads, the writes, ``COMMIT``, each a call into the library: there
  is no round trip to save.
- PostgreSQL: two round trips in psycopg's pipeline mode, whatever the
  number of statements. The first sends ``BEGIN`` and the reads together;
  the second sends every write and ``COMMIT`` together, with one sync.
  Statement by statement it was six (``BEGIN``, the locked read, the
  checkpoint, the messages, the task update, ``COMMIT``).

Callers write through the transaction object (`LockedWrite.execute`,
`LockedWrite.execute_many`), never `db.execute_sql`: on PostgreSQL each
peewee statement was a cursor of its own, peewee's wrapper and a pooled
connection check, more client time than the server spent on the row.

What a pipelined write must keep, and how:

- The decisions are made on the first round trip's answers, before any
  write is sent: a writer that must not write (`LeaseLost`, a repeated
  step, `TraceSequenceClash`) raises or returns there, and the transaction
  ends with nothing written. A write's own result (a row count) is not
  known until the commit's sync, so no decision may wait for one.
- Reads after the locked one see what committed before the lock was
  granted: at READ COMMITTED each statement takes a fresh snapshot, and
  the second statement starts after the first got its lock. (A subquery
  of the locking statement itself would not: it reads the snapshot from
  before the wait.)
- A failure inside the pipeline (a statement the server refused, a value
  it cannot hold) raises at the sync, as peewee's exception class (what a
  statement-by-statement write raised, so `StoreFailures` translates it
  the same), and the transaction is rolled back, so the connection goes
  back to the pool usable.
- A dead pooled connection (a server restart) is replaced and the first
  round trip sent again, once, as `PostgresStore.begin` does for a lone
  ``BEGIN``: that round trip holds only ``BEGIN`` and reads, so nothing can
  have been written. A later failure, the commit's included, is never
  repeated here (a lost ``COMMIT``'s outcome is unknown): it surfaces as
  `StoreUnavailable`, retried from stored state.
- peewee's bookkeeping holds: the transaction is on peewee's stack while
  it is open (``in_transaction()`` holds inside, a nested ``atomic()`` is
  a savepoint), ``BEGIN`` and ``COMMIT`` are sent on the write cursor, in
  the pipeline with the other statements, and commit callbacks
  (``db.after_commit``) run once the commit's sync has answered.
- One cursor per read (each holds its own answer) and one for ``BEGIN``,
  every write and ``COMMIT``: their results are never read, only their
  errors, which the sync raises.
- The writes are held until the commit, then sent as one statement (up to
  `MERGED_WRITES` of them): each but the last as a data-modifying ``WITH``
  member, which PostgreSQL runs once and to completion whether or not
  anything reads it. psycopg's client work is per statement (a dump, a
  send, a result to match), so four writes in one cost about one. The
  writes of a step touch different rows and none reads another's, which
  is what makes one statement the same as several: every one still runs,
  its triggers and constraints with it, and a refusal fails the statement
  and the transaction as before. A statement sent directly inside the
  block (not through `execute`) goes ahead of the held writes.
"""

from __future__ import annotations

from functools import lru_cache
from types import TracebackType
from typing import Any, Optional, Sequence

from peewee import InterfaceError, OperationalError, __exception_wrapper__

from .drivers import loaded_psycopg

#: (SQL, parameters) of one read.
Read = tuple[str, Sequence[Any]]
#: Most writes `PipelinedWrite` sends as one statement (more go in further statements, a bound on its size).
MERGED_WRITES = 8


class LockedWrite:
    """SQLite's locked write: a ``BEGIN IMMEDIATE`` transaction; each statement runs in turn.

    Use it as ``with dialect.locked_write() as write: rows = write.read(...)``,
    then `execute` and `execute_many` the writes; it commits on leaving, or
    rolls back if the block raises. Also used on PostgreSQL inside a
    transaction opened outside (a savepoint then).
    """

    def __init__(self, db: Any) -> None:
        self.db = db
        self._atomic: Any = None

    def __enter__(self) -> LockedWrite:
        self._atomic = self.db.atomic()
        self._atomic.__enter__()
        return self

    def read(self, *reads: Read) -> list[Optional[tuple[Any, ...]]]:
        """The first row of each read (None where it found none), in order; call it once, first."""
        return [self.db.execute_sql(sql, params).fetchone() for sql, params in reads]

    def execute(self, sql: str, params: Sequence[Any]) -> None:
        """Run one write (its answer is never read)."""
        self.db.execute_sql(sql, params)

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one write per row of `rows` (``executemany``); nothing for no rows."""
        if rows:
            with __exception_wrapper__:  # psycopg's or sqlite3's errors as peewee's, as `execute_sql` gives them
                self.db.cursor().executemany(sql, rows)

    def __exit__(self, kind: Optional[type[BaseException]], exc: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        self._atomic.__exit__(kind, exc, traceback)


class PipelinedWrite(LockedWrite):
    """PostgreSQL's locked write in two round trips (see the module docstring for what it keeps, and how)."""

    def __init__(self, db: Any) -> None:
        super().__init__(db)
        self._conn: Any = None
        self._pipeline: Any = None
        self._cursor: Any = None  # BEGIN, the writes and COMMIT
        self._transaction: Any = None  # what stands for this transaction on peewee's stack
        self._writes: list[tuple[str, Sequence[Any]]] = []  # held until the commit (`_send_writes`)
        self._depth = 0  # peewee's transaction depth before this one

    def __enter__(self) -> PipelinedWrite:
        return self  # nothing is sent before the reads: BEGIN goes with them

    def read(self, *reads: Read) -> list[Optional[tuple[Any, ...]]]:
        """BEGIN and `reads` in one round trip; the first row of each (None where it found none)."""
        assert self._pipeline is None, "read() comes first, once"
        psycopg = loaded_psycopg()
        connection_lost = (OperationalError, InterfaceError, psycopg.OperationalError, psycopg.InterfaceError)
        for attempt in (1, 2):
            try:
                with __exception_wrapper__:  # psycopg's errors as peewee's, as `execute_sql` gives them
                    self._begin()
                    cursors = [self._conn.cursor() for _ in reads]
                    for cursor, (sql, params) in zip(cursors, reads, strict=True):
                        cursor.execute(sql, params)
                    return [cursor.fetchone() for cursor in cursors]  # the first fetch sends them all, one flush
            except connection_lost as error:
                if attempt == 2 or not self._session_ended(error):
                    raise
                self._abandon()
                self._conn.close()  # whatever libpq has not read of it yet, the session is gone
                self.db.replace_broken_connection()
        raise AssertionError("unreachable")  # pragma: no cover

    def execute(self, sql: str, params: Sequence[Any]) -> None:
        """Hold one write until the commit (a refusal by the server is raised at the commit's sync)."""
        self._writes.append((sql, params))

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Hold one write per row of `rows` until the commit."""
        self._writes.extend((sql, row) for row in rows)

    def _send_writes(self, cursor: Any) -> None:
        """Queue the held writes on `cursor`, `MERGED_WRITES` at a time as one statement (see the module)."""
        writes, self._writes = self._writes, []
        for start in range(0, len(writes), MERGED_WRITES):
            group = writes[start:start + MERGED_WRITES]
            if len(group) == 1:
                cursor.execute(*group[0])
                continue
            params: list[Any] = []
            for _sql, values in group:
                params.extend(values)
            cursor.execute(merged_statement(tuple(sql for sql, _values in group)), params)

    def _begin(self) -> None:
        db = self.db
        conn = db.connection()
        if conn.closed:  # known dead: replaced before anything is sent, so every statement goes to one connection
            db.replace_broken_connection()
            conn = db.connection()
        self._conn, self._depth = conn, db.transaction_depth()
        self._pipeline = conn.pipeline()
        self._pipeline.__enter__()
        self._cursor = conn.cursor()
        self._transaction = db.transaction()
        db.push_transaction(self._transaction)  # peewee's stack, as `atomic()` would leave it (see the module)
        self._cursor.execute("BEGIN")  # queued: sent with the reads

    def _session_ended(self, error: BaseException) -> bool:
        """Whether `error` means the connection is gone: closed, broken, or the server ending the session.

        A server shutting down or killing the backend sends a FATAL error
        (SQLSTATE 57P01-57P03) before it closes; read in pipeline mode, that
        error can arrive before libpq has seen the connection close.
        """
        if self._connection_broken():
            return True
        causes = (error, error.__cause__, error.__context__)
        return any(str(getattr(cause, "sqlstate", "") or "").startswith("57P") for cause in causes)

    def _connection_broken(self) -> bool:
        conn = self._conn
        return conn is not None and bool(conn.closed or conn.broken)

    def _end_transaction(self) -> None:
        """Take this transaction (and anything left above it) off peewee's stack."""
        self._transaction = None
        while self.db.transaction_depth() > self._depth:
            self.db.pop_transaction()

    def _abandon(self) -> None:
        """Forget a transaction whose connection died: peewee's stack popped, the pipeline left with it."""
        self._pipeline = self._cursor = None
        self._writes = []
        self._end_transaction()
        self.db._clear_commit_callbacks()

    def __exit__(self, kind: Optional[type[BaseException]], exc: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        if self._pipeline is None:
            return  # nothing began (read never called, or it raised before BEGIN was queued)
        if self._connection_broken():
            self._abandon()  # nothing to roll back or sync on a dead connection: it is discarded
            if kind is None:  # never a silent success: the commit was not even sent
                raise OperationalError("the connection to PostgreSQL was lost before the commit")
            return
        pipeline, cursor, self._pipeline, self._cursor = self._pipeline, self._cursor, None, None
        self._end_transaction()
        error: Optional[BaseException] = exc
        try:
            try:
                with __exception_wrapper__:  # a value psycopg cannot send raises here, as peewee's class
                    if kind is None:
                        self._send_writes(cursor)
                    cursor.execute("COMMIT" if kind is None else "ROLLBACK")
            except BaseException as raised:  # a refused statement's error, met while queuing COMMIT
                error = raised
            try:
                # The sync: the writes and COMMIT in one round trip. With an error in flight psycopg
                # logs a failure here instead of raising it: the first error is the one that matters.
                pipeline.__exit__(None if error is None else type(error), error, None)
            except BaseException as raised:
                error = raised
        finally:
            self._settle()
        if error is None:
            self.db._run_commit_callbacks()
            return
        self.db._clear_commit_callbacks()
        if kind is None:
            with __exception_wrapper__:  # psycopg's errors as peewee's, as each statement's are
                raise error

    def _settle(self) -> None:
        """Leave the connection idle and out of pipeline mode, or closed (the pool then discards it).

        A statement the server refused makes it skip the rest until the
        sync, ROLLBACK and COMMIT included, and the error may arrive while
        later statements are still being queued: the transaction is then
        left aborted, so it is rolled back here whatever path raised.
        """
        conn = self._conn
        if conn.closed or conn.broken:
            return
        psycopg = loaded_psycopg()
        try:
            if conn.pgconn.pipeline_status != psycopg.pq.PipelineStatus.OFF:
                raise psycopg.OperationalError("the connection is still in pipeline mode")
            if conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.rollback()
        except psycopg.Error:
            conn.close()


@lru_cache(maxsize=256)
def merged_statement(statements: tuple[str, ...]) -> str:
    """`statements` (writes without ``RETURNING``) as one: each but the last a ``WITH`` member, in order.

    Their ``%s`` parameters keep their order, so the statement takes the
    writes' parameters one after another.
    """
    members = ", ".join(f'"write_{index}" AS ({sql})' for index, sql in enumerate(statements[:-1]))
    return f"WITH {members} {statements[-1]}"
