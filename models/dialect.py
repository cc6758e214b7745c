"""`Dialect`: everything the store does differently on SQLite and on PostgreSQL, and nowhere else.

- Which backend: decided once, from the database class (`is_sqlite`).
- Read snapshots: SQLite (WAL) reads in a deferred transaction, which takes
  no write lock and fixes its snapshot at the first read; PostgreSQL's READ
  COMMITTED takes a new snapshot per statement, so multi-statement reads ask
  for REPEATABLE READ (a read-only transaction there never fails to
  serialise).
- Row locks: a write that reads a task before changing it locks the row on
  PostgreSQL (``SELECT ... FOR UPDATE``); on SQLite ``BEGIN IMMEDIATE``
  already serialises writers, and peewee renders no lock clause.
- ``RETURNING``: PostgreSQL hands back updated columns in the same
  statement; peewee leaves it off on SQLite, where the writer lock keeps a
  follow-up read consistent.
- Advisory locks: schema creation on PostgreSQL is serialised across hosts
  by a transaction-scoped advisory lock, and so are new tasks on one thread
  (`lock_thread`); SQLite's ``BEGIN IMMEDIATE`` file lock does both there.
- Step writes: a locked read, then writes that need no answer; on
  PostgreSQL they go in two round trips (psycopg's pipeline mode), on
  SQLite statement by statement (`locked_writes.py`, `locked_write`).
- Driver errors: `StoreFailures` turns peewee's, sqlite3's and psycopg's
  errors into longhaul's, so nothing above the store sees a driver class.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Optional

from peewee import DatabaseError, DataError, InterfaceError, OperationalError, SqliteDatabase

from .drivers import loaded_psycopg
from .errors import StoreUnavailable, StoreUnusable, UnstorableValue
from .locked_writes import LockedWrite, PipelinedWrite
from .presumed_writes import KnownRow, PresumedWrite, connection_quiet

#: pg_advisory_xact_lock key that serialises schema creation and migration across processes and hosts.
MIGRATION_LOCK_KEY = 0x6C6F6E67  # "long"
#: First key of the two-key advisory locks that serialise new tasks on one thread (the second: the thread's
#: hash). The two-key form is a key space of its own: it never meets `MIGRATION_LOCK_KEY`.
THREAD_LOCK_NAMESPACE = 0x7468  # "th"

#: What a driver raises for data it cannot bind or a column cannot hold (SQLite: an int beyond 64 bits).
#: Permanent: retrying the same value fails the same way, so these are never treated as an outage.
_BASE_VALUE_ERRORS: tuple[type[BaseException], ...] = (DataError, sqlite3.DataError, OverflowError)
#: Every other driver failure: locks, full disks, lost connections, refused statements. Raw psycopg
#: errors count too (see `_driver_errors`): peewee lets some through unwrapped (a connection lost while rolling back).
_BASE_DRIVER_ERRORS: tuple[type[BaseException], ...] = (DatabaseError, InterfaceError, sqlite3.Error)


def _value_errors() -> tuple[type[BaseException], ...]:
    """`_BASE_VALUE_ERRORS`, plus psycopg's once loaded (it is imported only for PostgreSQL: `drivers.py`)."""
    psycopg = loaded_psycopg()
    return _BASE_VALUE_ERRORS if psycopg is None else (*_BASE_VALUE_ERRORS, psycopg.DataError)


def _driver_errors() -> tuple[type[BaseException], ...]:
    """Every driver error class: `_BASE_DRIVER_ERRORS`, psycopg's once loaded, and the value errors."""
    psycopg = loaded_psycopg()
    extra = () if psycopg is None else (psycopg.Error,)
    return (*_BASE_DRIVER_ERRORS, *extra, *_value_errors())


#: SQLite's messages for a file it can never use as it is, each with what the operator can do about it.
_UNUSABLE_SQLITE_FILE: tuple[tuple[tuple[str, ...], str], ...] = (
    (("file is not a database", "database disk image is malformed"),
     "the file is damaged or not a longhaul database: restore it from a backup, or point LONGHAUL_DATABASE_URL "
     "at another file"),
    (("attempt to write a readonly database", "unable to open database file"),
     "longhaul must write the file, its -wal and -shm files and its folder: make them writable, or point "
     "LONGHAUL_DATABASE_URL at a writable place"),
)
#: How long recovery and lease renewal wait for another transaction's row lock on PostgreSQL, in ms.
ROW_LOCK_TIMEOUT_MS = 2_000


def is_sqlite(db: Any) -> bool:
    """True for a SQLite database (peewee's class or a subclass), False for PostgreSQL."""
    return isinstance(db, SqliteDatabase)


def is_busy(exc: BaseException) -> bool:
    """True if `exc` is SQLite refusing at once because another connection holds its lock."""
    text = str(exc)
    return isinstance(exc, OperationalError) and ("locked" in text or "busy" in text)


#: What SQLite says when asked to roll back a transaction it already rolled back itself.
_NOTHING_TO_ROLL_BACK = "cannot rollback - no transaction is active"


def original_error(exc: BaseException) -> BaseException:
    """The error that failed the call, not the failed rollback after it.

    When a COMMIT fails on a full disk (or an I/O error), SQLite rolls the
    transaction back itself; the rollback peewee then issues fails with
    "cannot rollback - no transaction is active", and that error would hide
    the one that matters ("database or disk is full"), kept as its context.
    """
    while _NOTHING_TO_ROLL_BACK in str(exc) and isinstance(exc.__context__, _driver_errors()):
        exc = exc.__context__
    return exc


def unusable_file_remedy(exc: BaseException) -> Optional[str]:
    """What to do about a SQLite file that no retry can make usable (damaged, read-only), or None."""
    if not isinstance(exc, (DatabaseError, sqlite3.DatabaseError)) or isinstance(exc, _value_errors()):
        return None
    text = str(exc)
    for messages, remedy in _UNUSABLE_SQLITE_FILE:
        if any(message in text for message in messages):
            return remedy
    return None


def describe(exc: BaseException) -> str:
    """``ClassName: message`` on one line, what `StoreUnavailable` and `UnstorableValue` report."""
    reason = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


class StoreFailures:
    """Context manager: a driver error raised inside becomes a longhaul error about `task_id`.

    `UnstorableValue` (an `InvalidInput`) for a value the backend cannot
    hold; `StoreUnusable` (an `InvalidInput`, permanent) for a SQLite file
    that is damaged or read-only; `StoreUnavailable` (transient) for
    anything else the driver raises. longhaul's own errors pass through unchanged. The transaction
    the error aborted has already rolled back, so the message can promise
    that nothing was written. A class, not a generator: it wraps every
    store call, the per-step checkpoint included.

    With `db`, the call also *borrows* a connection of `db`'s pool for its
    duration: taken on entry if this thread holds none, given back on exit
    (an outer call, or a transaction opened outside, keeps its own). That
    is what lets a thousand tasks in flight share a pool of 16: a task holds
    a connection only while it reads or writes, never while it waits on a
    model. A pool with no free connection for `POOL_WAIT_S` is a
    `StoreUnavailable` like any other outage.
    """

    __slots__ = ("task_id", "db", "borrowed")

    def __init__(self, task_id: Optional[str] = None, *, db: Any = None) -> None:
        self.task_id = task_id
        self.db = db
        self.borrowed = False

    def __enter__(self) -> None:
        db = self.db
        if db is not None and db.is_closed():
            try:
                db.connect()
            except _driver_errors() as exc:
                self._translate(exc)
            self.borrowed = True
        return None

    def __exit__(self, kind: Optional[type[BaseException]], exc: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> bool:
        try:
            if kind is None or exc is None or not issubclass(kind, _driver_errors()):
                return False
            self._translate(exc)
        finally:
            if self.borrowed:
                self.borrowed = False
                self.db.close()  # back to the pool (a broken one is discarded there)
        return False  # pragma: no cover (_translate always raises)

    def _translate(self, exc: BaseException) -> None:
        exc = original_error(exc)
        kind = type(exc)
        if issubclass(kind, _value_errors()):
            raise UnstorableValue(self.task_id, describe(exc)) from exc
        remedy = unusable_file_remedy(exc)
        if remedy is not None:
            raise StoreUnusable(describe(exc), remedy) from exc
        raise StoreUnavailable(self.task_id, describe(exc)) from exc


class Dialect:
    """The backend-specific parts of one store's database (see the module docstring for why each exists)."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.is_sqlite = is_sqlite(db)
        #: Placeholder for a parameter in hand-written SQL: ``?`` or ``%s``.
        self.param: str = db.param
        #: Whether ``UPDATE ... RETURNING`` hands back columns (PostgreSQL) or a second read is needed (SQLite).
        self.returning = bool(db.returning_clause)

    def read_snapshot(self) -> AbstractContextManager[Any]:
        """A read transaction that sees one snapshot across its statements, taking no write lock."""
        if self.is_sqlite:
            return self.db.atomic("DEFERRED")
        return self.db.atomic(isolation_level="REPEATABLE READ")

    def locked(self, query: Any) -> Any:
        """`query` locking the rows it reads until the transaction ends (PostgreSQL; SQLite's writer lock covers it)."""
        return query.for_update() if self.db.for_update else query

    def locked_write(self) -> LockedWrite:
        """A step's write transaction: its locked reads (`LockedWrite.read`) first, then writes needing no answer.

        PostgreSQL: two round trips (`PipelinedWrite`); inside a transaction
        opened outside (a savepoint then), and on SQLite, statement by statement.
        """
        if self.is_sqlite or self.db.in_transaction():
            return LockedWrite(self.db)
        return PipelinedWrite(self.db)

    def presumed_write(self, known: KnownRow) -> Optional[PresumedWrite]:
        """A step write in one round trip, fenced on `known` (`presumed_writes.py`); None where it cannot be:
        SQLite (no round trip to save), a transaction opened outside, or a connection that is not idle and
        quiet (the locked write deals with it)."""
        if self.is_sqlite or self.db.in_transaction() or not connection_quiet(self.db.connection()):
            return None
        return PresumedWrite(self.db, known)

    def limit_lock_wait(self, timeout_ms: int = ROW_LOCK_TIMEOUT_MS) -> None:
        """Inside a transaction on PostgreSQL: give up (`StoreUnavailable`) on a row lock held past `timeout_ms`.

        Lease renewal and recovery must never queue behind a checkpoint
        transaction of a paused or stuck worker: a lock timeout turns that
        wait into an error the caller skips and retries on its next pass.
        On SQLite the busy timeout bounds every wait already.
        """
        if not self.is_sqlite:
            self.db.execute_sql(f"SET LOCAL lock_timeout = {int(timeout_ms)}")

    def server_epoch_s(self) -> float:
        """The database server's clock, seconds since the epoch (PostgreSQL); this host's on SQLite."""
        if self.is_sqlite:
            return time.time()
        return float(self.db.execute_sql("SELECT EXTRACT(EPOCH FROM clock_timestamp())").fetchone()[0])

    def lock_thread(self, thread_id: str) -> None:
        """Inside a write transaction: wait until no other transaction is adding a task to `thread_id`.

        PostgreSQL: a transaction-scoped advisory lock on the thread's hash
        (two threads sharing a hash only wait for each other). SQLite: the
        writer lock of ``BEGIN IMMEDIATE`` already serialises every write.
        """
        if not self.is_sqlite:
            self.db.execute_sql(f"SELECT pg_advisory_xact_lock({THREAD_LOCK_NAMESPACE}, hashtext({self.param}))",
                                (thread_id,))

    def lock_migrations(self) -> None:
        """Inside a transaction: wait until no other process or host is creating or migrating the schema."""
        if not self.is_sqlite:
            self.db.execute_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
