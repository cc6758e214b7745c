"""`LockedWrite`: a step's write transaction, its locked reads first, in as few round trips as the backend allows.

A step write (`Checkpoints.record`, `journal_answer`, `journal_result`)
reads the task row locked, decides from it (the lease fence, the trace
sequence, positions, a repeated step), then writes rows whose values depend
on what it read, and commits. Nothing it writes needs a result back.

- SQLite: ``BEGIN IMMEDIATE`` (the process's writer lock, then the file's),
  the reads, the writes, ``COMMIT``, each a call into the library: there
  is no round trip to save.
- PostgreSQL: two round trips in psycopg's pipeline mode, whatever the
  number of statements: the reads, then every write with the sync that
  commits them. Statement by statement it was six (``BEGIN``, the locked
  read, the checkpoint, the messages, the task update, ``COMMIT``).

A lease holder's later step writes need no read at all: they go as one
fenced statement (`presumed_writes.py`), and come here only when the fence
finds the row changed.

Every statement of the block goes through the transaction object:
`LockedWrite.read`, `LockedWrite.execute` and `LockedWrite.execute_many`
(the writes, held until the commit on PostgreSQL) and
`LockedWrite.execute_now` (a write the block reads back before it decides,
such as a missing task's row), never `db.execute_sql`.

What a pipelined write must keep, and how:

- One transaction without ``BEGIN`` or ``COMMIT``: in the extended query
  protocol a transaction lasts from the first statement to the next sync,
  and the sync commits it (or rolls it back after an error). The reads'
  answers come back on a flush, which ends nothing, so the row lock the
  first read takes holds until the writes commit. Two statements fewer per
  write, each a send and a result for psycopg to handle.
- The decisions are made on the first round trip's answers, before any
  write is sent: a writer that must not write (`LeaseLost`, a repeated
  step, `TraceSequenceClash`) raises or returns there, and the sync ends a
  transaction that wrote nothing (after an `execute_now`, a ``ROLLBACK``
  goes first). A write's own result (a row count) is not known until the
  sync, so no decision may wait for one.
- Reads after the locked one see what committed before the lock was
  granted: at READ COMMITTED each statement takes a fresh snapshot, and
  the second statement starts after the first got its lock. (A subquery
  of the locking statement itself would not: it reads the snapshot from
  before the wait.)
- The writes are held until the commit, then sent as one statement (up to
  `MERGED_WRITES` of them): each but the last as a data-modifying ``WITH``
  member, which PostgreSQL runs once and to completion whether or not
  anything reads it. psycopg's client work is per statement, so four
  writes in one cost about one. The writes of a step touch different rows
  and none reads another's, which is what makes one statement the same as
  several: every one still runs, its triggers and constraints with it.
- A failure inside the pipeline (a statement the server refused, a value
  it cannot hold) raises at the sync, as peewee's exception class (what a
  statement-by-statement write raised, so `StoreFailures` translates it
  the same), and the transaction is rolled back, so the connection goes
  back to the pool usable.
- A dead pooled connection (a server restart) is replaced and the first
  round trip sent again, once, as `PostgresStore.begin` does for a lone
  ``BEGIN``: that round trip holds only reads, so nothing can have been
  written. A later failure, the commit's included, is never repeated here
  (a lost commit's outcome is unknown): it surfaces as `StoreUnavailable`,
  retried from stored state.
- peewee's bookkeeping holds: the transaction is on peewee's stack while
  it is open (``in_transaction()`` holds inside), as a manual-commit
  block, so a nested ``db.atomic()`` or ``db.after_commit`` (a savepoint
  needs ``BEGIN``) fails loudly in the client instead of being sent.
- psycopg's cursors: one per read (each holds its own answer); the first
  read's, once its answer is in, takes the writes, whose results are never
  read, only their errors, which the sync raises.
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
        """The first row of each read (None where it found none), in order."""
        return [self.db.execute_sql(sql, params).fetchone() for sql, params in reads]

    def execute(self, sql: str, params: Sequence[Any]) -> None:
        """Run one write (its answer is never read)."""
        self.db.execute_sql(sql, params)

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one write per row of `rows` (``executemany``); nothing for no rows."""
        if rows:
            with __exception_wrapper__:  # psycopg's or sqlite3's errors as peewee's, as `execute_sql` gives them
                self.db.cursor().executemany(sql, rows)

    def execute_now(self, sql: str, params: Sequence[Any]) -> None:
        """Run one write that a later `read` of the block must see (here: at once, as every statement)."""
        self.db.execute_sql(sql, params)

    def __exit__(self, kind: Optional[type[BaseException]], exc: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        self._atomic.__exit__(kind, exc, traceback)


class PipelinedWrite(LockedWrite):
    """PostgreSQL's locked write in two round trips (see the module docstring for what it keeps, and how)."""

    def __init__(self, db: Any) -> None:
        super().__init__(db)
        self._conn: Any = None
        self._pipeline: Any = None
        self._cursor: Any = None  # the writes': the first read's, once its answer is in
        self._writes: list[tuple[str, Sequence[Any]]] = []  # held until the commit (`_send_writes`)
        self._wrote_now = False  # whether an `execute_now` write went ahead of the decisions
        self._depth = 0  # peewee's transaction depth before this one

    def __enter__(self) -> PipelinedWrite:
        return self  # nothing is sent before the reads

    def read(self, *reads: Read) -> list[Optional[tuple[Any, ...]]]:
        """`reads` in one round trip; the first row of each (None where it found none).

        The first call opens the transaction (on a fresh connection once if
        the pooled one turns out dead); later calls read inside it.
        """
        if self._pipeline is not None:
            return self._read(reads)
        psycopg = loaded_psycopg()
        connection_lost = (OperationalError, InterfaceError, psycopg.OperationalError, psycopg.InterfaceError)
        for attempt in (1, 2):
            try:
                self._begin()
                return self._read(reads)
            except connection_lost as error:
                if attempt == 2 or not self._session_ended(error):
                    raise
                self._abandon()
                self._conn.close()  # whatever libpq has not read of it yet, the session is gone
                self.db.replace_broken_connection()
        raise AssertionError("unreachable")  # pragma: no cover

    def _read(self, reads: Sequence[Read]) -> list[Optional[tuple[Any, ...]]]:
        with __exception_wrapper__:  # psycopg's errors as peewee's, as `execute_sql` gives them
            cursors = [self._conn.cursor() for _ in reads]
            for cursor, (sql, params) in zip(cursors, reads, strict=True):
                cursor.execute(sql, params)
            rows = [cursor.fetchone() for cursor in cursors]  # the first fetch flushes them all, one round trip
        if self._cursor is None:
            self._cursor = cursors[0]  # its answer is read: the writes need no cursor of their own
        return rows

    def execute(self, sql: str, params: Sequence[Any]) -> None:
        """Hold one write until the commit (a refusal by the server is raised at the sync)."""
        self._writes.append((sql, params))

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Hold one write per row of `rows` until the commit."""
        self._writes.extend((sql, row) for row in rows)

    def execute_now(self, sql: str, params: Sequence[Any]) -> None:
        """Send one write now, ahead of the held ones, for a later `read` to see; the block's end rolls it back
        if the block raises."""
        self._wrote_now = True
        with __exception_wrapper__:
            self._cursor.execute(sql, params)

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
        db.push_transaction(db.manual_commit())  # peewee's stack: in a transaction, no savepoint (see the module)

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
        while self.db.transaction_depth() > self._depth:
            self.db.pop_transaction()

    def _abandon(self) -> None:
        """Forget a transaction whose connection died: peewee's stack popped, the pipeline left with it."""
        self._pipeline = self._cursor = None
        self._writes, self._wrote_now = [], False
        self._end_transaction()

    def __exit__(self, kind: Optional[type[BaseException]], exc: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        if self._pipeline is None:
            return  # nothing began (read never called, or it raised before the pipeline was entered)
        if self._connection_broken():
            self._abandon()  # nothing to roll back or sync on a dead connection: it is discarded
            if kind is None:  # never a silent success: the commit was not even sent
                raise OperationalError("the connection to PostgreSQL was lost before the commit")
            return
        pipeline, cursor, self._pipeline, self._cursor = self._pipeline, self._cursor or self._conn.cursor(), None, None
        self._end_transaction()
        error: Optional[BaseException] = exc
        try:
            try:
                with __exception_wrapper__:  # a value psycopg cannot send raises here, as peewee's class
                    if kind is None:
                        self._send_writes(cursor)
                    elif self._wrote_now:
                        cursor.execute("ROLLBACK")  # the sync would commit what `execute_now` wrote
            except BaseException as raised:
                error = raised
                # Part of the writes may be queued, or the ROLLBACK not: a sync would commit them. A
                # session that ends without one rolls its transaction back; the pool discards it.
                self._conn.close()
            try:
                # The sync: the writes in the round trip that commits them. With an error in flight psycopg
                # logs a failure here instead of raising it: the first error is the one that matters.
                pipeline.__exit__(None if error is None else type(error), error, None)
            except BaseException as raised:
                error = raised
        finally:
            self._writes = []
            self._settle()
        if kind is None and error is not None:
            with __exception_wrapper__:  # psycopg's errors as peewee's, as each statement's are
                raise error

    def _settle(self) -> None:
        """Leave the connection idle and out of pipeline mode, or closed (the pool then discards it).

        A statement the server refused makes it skip the rest until the
        sync, and the error may arrive while later statements are still
        being queued, or a value psycopg could not send may leave a write
        unsent ahead of the sync: whatever path raised, a transaction still
        open is rolled back here.
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
