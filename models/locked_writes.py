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
- peewee's bookkeeping is its own: the transaction is a `db.atomic()`
  (``in_transaction()`` holds inside), entered inside the pipeline so its
  ``BEGIN`` and ``COMMIT`` are queued with the other statements. Commit
  callbacks (``db.after_commit``) would run before the sync: none is used.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Optional, Sequence

from peewee import InterfaceError, OperationalError, __exception_wrapper__

from .drivers import loaded_psycopg

#: (SQL, parameters) of one read.
Read = tuple[str, Sequence[Any]]


class LockedWrite:
    """SQLite's locked write: a ``BEGIN IMMEDIATE`` transaction; `read` runs each statement in turn.

    Use it as ``with dialect.locked_write() as write: rows = write.read(...)``,
    then write with `db.execute_sql` as in any transaction; it commits on
    leaving, or rolls back if the block raises.
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

    def __exit__(self, kind: Optional[type[BaseException]], exc: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        self._atomic.__exit__(kind, exc, traceback)


class PipelinedWrite(LockedWrite):
    """PostgreSQL's locked write in two round trips (see the module docstring for what it keeps, and how)."""

    def __init__(self, db: Any) -> None:
        super().__init__(db)
        self._conn: Any = None
        self._pipeline: Any = None
        self._depth = 0  # peewee's transaction depth before this one

    def __enter__(self) -> PipelinedWrite:
        return self  # nothing is sent before the reads: BEGIN goes with them

    def read(self, *reads: Read) -> list[Optional[tuple[Any, ...]]]:
        """BEGIN and `reads` in one round trip; the first row of each (None where it found none)."""
        assert self._atomic is None, "read() comes first, once"
        psycopg = loaded_psycopg()
        connection_lost = (OperationalError, InterfaceError, psycopg.OperationalError, psycopg.InterfaceError)
        for attempt in (1, 2):
            try:
                self._begin()
                cursors = [self.db.execute_sql(sql, params) for sql, params in reads]
                return [cursor.fetchone() for cursor in cursors]  # the first fetch sends them all, one flush
            except connection_lost as error:
                if attempt == 2 or not self._session_ended(error):
                    raise
                self._abandon()
                self._conn.close()  # whatever libpq has not read of it yet, the session is gone
                self.db.replace_broken_connection()
        raise AssertionError("unreachable")  # pragma: no cover

    def _begin(self) -> None:
        conn = self.db.connection()
        if conn.closed:  # known dead: replaced before anything is sent, so every statement goes to one connection
            self.db.replace_broken_connection()
            conn = self.db.connection()
        self._conn, self._depth = conn, self.db.transaction_depth()
        self._pipeline = conn.pipeline()
        self._pipeline.__enter__()
        self._atomic = self.db.atomic()
        self._atomic.__enter__()  # queues BEGIN (`PostgresStore.begin` leaves a pipelined one to `read`)

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

    def _abandon(self) -> None:
        """Forget a transaction whose connection died: peewee's stack popped, the pipeline left with it."""
        self._atomic = self._pipeline = None
        while self.db.transaction_depth() > self._depth:
            self.db.pop_transaction()
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
        atomic, pipeline, self._atomic, self._pipeline = self._atomic, self._pipeline, None, None
        error: Optional[BaseException] = exc
        try:
            try:
                atomic.__exit__(kind, exc, traceback)  # queues COMMIT (or ROLLBACK)
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
        if kind is None and error is not None:
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
