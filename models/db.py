"""Opening the database behind a task store: SQLite (embedded) or PostgreSQL (shared).

SQLite is the embedded default. Each thread gets its own connection
(peewee's default), every connection runs with WAL, ``synchronous=NORMAL``
(or ``FULL``, see `DEFAULT_SQLITE_SYNCHRONOUS`),
foreign keys on and a busy timeout, and every write transaction starts with
``BEGIN IMMEDIATE`` so that concurrent writers queue on the busy timeout
instead of failing with ``database is locked`` when a read lock cannot be
upgraded.

PostgreSQL (``postgresql://user:pass@host:5432/db``) is the store many
worker hosts share. It is opened through psycopg 3 with a connection pool
per process: each thread checks a connection out on first use and keeps it,
so the pool must hold at least a process's worker threads plus two (its
maintenance thread and the main thread). Transactions run at READ
COMMITTED; the store takes row locks (``SELECT ... FOR UPDATE``) where
SQLite's single writer made a read-then-write safe.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Union
from urllib.parse import urlparse

from peewee import Database, InterfaceError, OperationalError
from playhouse.pool import MaxConnectionsExceeded, PooledPostgresqlDatabase, PooledSqliteDatabase

from .codec import escape_nul, unescape_nul
from .drivers import load_psycopg, loaded_psycopg
from .errors import InvalidDatabaseUrl, InvalidInput
from .fork_safety import track
from .pg_waits import use_hub_waits

#: Where a task store lives when nothing else is configured.
DEFAULT_DATABASE_URL = "sqlite:///state/tasks.db"
#: How long a writer waits for another writer's transaction, in milliseconds.
DEFAULT_BUSY_TIMEOUT_MS = 30_000
#: SQLite's durability: ``normal`` (WAL) survives process crashes, the last commits may roll back on power
#: loss; ``full`` syncs every commit and survives that too (LONGHAUL_SQLITE_SYNCHRONOUS).
DEFAULT_SQLITE_SYNCHRONOUS = "normal"
SQLITE_SYNCHRONOUS_LEVELS = ("normal", "full")
#: PostgreSQL connections one process may hold (LONGHAUL_DB_POOL_SIZE).
DEFAULT_POOL_SIZE = 16
#: URL schemes that select PostgreSQL.
POSTGRES_SCHEMES = ("postgresql", "postgres")
#: How long opening a PostgreSQL connection may take, in seconds (a URL's ?connect_timeout= wins).
CONNECT_TIMEOUT_S = 10
#: How long a thread waits for a free pooled connection before the store reports itself unavailable.
POOL_WAIT_S = 30
#: How often a full pool looks for connections of threads that ended holding one (`_PoolRepairs`).
RECLAIM_EVERY_S = 0.25
#: How long a thread waiting for a pooled connection sleeps before it looks for such threads itself.
WAIT_SLICE_S = 1.0
#: Pooled connections older than this are closed when they come back (servers and proxies drop idle ones).
POOL_STALE_S = 3600


def sqlite_path_from_url(url_or_path: Union[str, Path]) -> Path | None:
    """The file a SQLite URL or plain path names, or None for other backends."""
    text = str(url_or_path)
    if "://" not in text:
        return Path(text)
    parsed = urlparse(text)
    if parsed.scheme != "sqlite":
        return None
    # sqlite:///relative/path and sqlite:////absolute/path, as SQLAlchemy and
    # playhouse.db_url read them.
    if text.startswith("sqlite:///"):
        return Path(text[len("sqlite:///"):])
    return Path(text[len("sqlite://"):])  # sqlite://:memory: and other two-slash forms


def is_postgres_url(url_or_path: Union[str, Path]) -> bool:
    return urlparse(str(url_or_path).strip()).scheme in POSTGRES_SCHEMES


def redact_url(url: str) -> str:
    """`url` with its password replaced by ``***`` (for messages and logs)."""
    parsed = urlparse(url)
    if not parsed.password:
        return url
    netloc = parsed.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0] + ":***"
    return parsed._replace(netloc=f"{userinfo}@{netloc[1]}").geturl()


def open_database(
    url_or_path: Union[str, Path],
    *,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    pool_size: int = DEFAULT_POOL_SIZE,
    sqlite_synchronous: str = DEFAULT_SQLITE_SYNCHRONOUS,
) -> Database:
    """Open (but do not connect) the database named by a URL or a path.

    Parent folders of a SQLite file are created; `pool_size` bounds a
    PostgreSQL store's connections in this process; a forked child gets
    fresh connections (`models.fork_safety`). Raises
    `InvalidDatabaseUrl` naming the problem for anything that cannot hold a
    shared, durable store (an in-memory SQLite database, an unsupported
    scheme, PostgreSQL without its driver).
    """
    text = str(url_or_path).strip()
    if not text:
        raise InvalidDatabaseUrl(text, "empty; give a path or a URL such as sqlite:///state/tasks.db")
    path = sqlite_path_from_url(text)
    if path is not None:
        return track(_open_sqlite(text, path, busy_timeout_ms, sqlite_synchronous, pool_size))
    if is_postgres_url(text):
        return track(_open_postgres(text, pool_size))
    raise InvalidDatabaseUrl(
        redact_url(text),
        f"unsupported scheme {urlparse(text).scheme!r}; use sqlite:///path/tasks.db (one host) or "
        "postgresql://user:pass@host:5432/db (many hosts)",
    )


def connect_or_explain(db: Database, url: str) -> None:
    """Connect now, so an unreachable server is one clear `InvalidDatabaseUrl`, not a driver traceback."""
    try:
        db.connect(reuse_if_open=True)
    except (OperationalError, InterfaceError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise InvalidDatabaseUrl(redact_url(url), f"cannot connect to PostgreSQL: {reason}") from None


def _open_sqlite(text: str, path: Path, busy_timeout_ms: int, synchronous: str, pool_size: int) -> SqliteStore:
    if synchronous not in SQLITE_SYNCHRONOUS_LEVELS:
        raise InvalidInput(f"sqlite_synchronous (LONGHAUL_SQLITE_SYNCHRONOUS): must be one of "
                           f"{', '.join(SQLITE_SYNCHRONOUS_LEVELS)}, got {synchronous!r}")
    if str(path) in ("", ":memory:"):
        raise InvalidDatabaseUrl(
            text,
            "an in-memory SQLite database is private to one connection, so worker "
            "threads would not see each other's writes; give a file path",
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidDatabaseUrl(text, f"cannot create folder {str(path.parent)!r}: {exc.strerror}") from None
    if path.is_dir():
        raise InvalidDatabaseUrl(text, "names a folder, not a database file")
    if pool_size < 1:
        raise InvalidDatabaseUrl(text, f"the pool size must be at least 1, got {pool_size}")
    return SqliteStore(
        str(path),
        max_connections=pool_size,
        timeout_s=busy_timeout_ms / 1000,
        pragmas={
            # First: every pragma after it may meet another process's lock (journal_mode=wal needs the file's).
            "busy_timeout": busy_timeout_ms,
            # Before any table exists: only then does it take effect (older files: `space.vacuum`).
            "auto_vacuum": "incremental",
            "journal_mode": "wal",
            "synchronous": synchronous,
            "foreign_keys": 1,
            "cache_size": -16_000,  # 16 MB page cache per connection
        },
        lock_type="IMMEDIATE",
    )


def _open_postgres(text: str, pool_size: int) -> PostgresStore:
    shown = redact_url(text)
    try:
        load_psycopg()  # deferred until now: SQLite users never import it (drivers.py)
    except ImportError:
        raise InvalidDatabaseUrl(
            shown, "PostgreSQL needs the psycopg driver: pip install 'psycopg[binary]' (a longhaul dependency)"
        ) from None
    if greenlets_patched():
        use_hub_waits()  # psycopg's waits on a gevent watcher, not the patched poll (pg_waits.py)
    if pool_size < 1:
        raise InvalidDatabaseUrl(shown, f"the pool size must be at least 1, got {pool_size}")
    # Query parameters (sslmode=require, options=..., connect_timeout=5) go to libpq as they are.
    from playhouse import db_url  # here, not at the top: it imports playhouse.postgres_ext, hence psycopg

    params: dict[str, Any] = db_url.parse(text, unquote_password=True, unquote_user=True)
    database = params.pop("database", "")
    if not database:
        raise InvalidDatabaseUrl(shown, "names no database; use postgresql://user:pass@host:5432/dbname")
    params.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    return PostgresStore(database, max_connections=pool_size, stale_timeout=POOL_STALE_S, timeout=POOL_WAIT_S,
                         prefer_psycopg3=True, **params)


def install_nul_escaping(conn: Any) -> None:
    """Make a psycopg connection write NUL in text as `codec.escape_nul` does, and read it back.

    PostgreSQL refuses NUL in ``text`` (SQLite stores it), and model or tool
    output can hold one. Escaping in the driver's text adapters covers every
    text column and parameter at once, so no write path can miss it.
    """
    from psycopg.types.string import StrBinaryDumper, StrDumper, StrDumperUnknown, TextBinaryLoader, TextLoader

    class EscapingDumper(StrDumperUnknown):
        def dump(self, obj: str) -> Any:
            return super().dump(escape_nul(obj))

    class EscapingTextDumper(StrDumper):
        def dump(self, obj: str) -> Any:
            return super().dump(escape_nul(obj))

    class EscapingBinaryDumper(StrBinaryDumper):
        def dump(self, obj: str) -> Any:
            return super().dump(escape_nul(obj))

    class UnescapingLoader(TextLoader):
        def load(self, data: Any) -> Any:
            return unescape_nul(super().load(data))

    class UnescapingBinaryLoader(TextBinaryLoader):
        def load(self, data: Any) -> Any:
            return unescape_nul(super().load(data))

    adapters = conn.adapters
    adapters.register_dumper(str, EscapingBinaryDumper)
    adapters.register_dumper(str, EscapingTextDumper)
    adapters.register_dumper(str, EscapingDumper)
    for type_name in ("text", "varchar", "bpchar"):
        adapters.register_loader(type_name, UnescapingLoader)
        adapters.register_loader(type_name, UnescapingBinaryLoader)
    conn._longhaul_nul_escaping = True


class _PoolRepairs:
    """What both pooled backends add to peewee's pool, for long-running workers with many threads.

    - A thread that ended without giving its connection back (peewee keeps
      one per thread until closed) gives it back when another thread needs
      one, so a finished thread never pins a pool slot. Looking for such
      threads goes through every connection in use: with a thousand tasks
      on a pool of 16 the pool is full at most checkouts, so it is done at
      most every `RECLAIM_EVERY_S`, by a checkout or by a waiter between
      slices (`WAIT_SLICE_S`) of its wait.
    - A pool with no free connection for `POOL_WAIT_S` raises
      `OperationalError` (transient: `StoreUnavailable`, retried) naming
      LONGHAUL_DB_POOL_SIZE, not a bare ``ValueError``.

    - Connections are handed out in arrival order. peewee's pool lets a
      thread that just arrived take a freed connection ahead of threads
      already waiting for one, so with a thousand threads some waited out
      the whole `POOL_WAIT_S` (seen when 1,000 redelivered messages arrived
      at once after a restart). A thread that finds the pool full, or
      others already waiting, queues here; each connection given back
      wakes the longest waiter, and the slot stays promised to it until it
      takes it.

    - A task's start goes first (`first_in_line`): its claim is served
      ahead of every other waiting call, in arrival order among claims.
      A thousand tasks delivered at once each make a claim and then a few
      more calls before their first model request; served in plain
      arrival order, the started tasks' later calls queued ahead of the
      claims still waiting, and the last task was claimed only as the
      last start finished (5-6 s on PostgreSQL, against under 2 s).

    Store calls borrow a connection only for their duration
    (`dialect.StoreFailures`), so the pool bounds connections, not threads.
    """

    _pool_lock: Any
    _in_use: dict[int, Any]
    _max_connections: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._owners: dict[int, threading.Thread] = {}  # checked-out connection -> the thread holding it
        self._waiting: collections.deque[threading.Event] = collections.deque()  # threads queued for a turn
        self._waiting_first: collections.deque[threading.Event] = collections.deque()  # ... that go first
        self._goes_first = threading.local()  # .on: this thread's calls go first (`first_in_line`)
        self._promised = 0  # free slots handed to woken waiters that have not taken them yet
        self._next_reclaim = 0.0  # monotonic time from which a full pool looks for finished threads again
        super().__init__(*args, **kwargs)

    def _connect(self) -> Any:
        conn = super()._connect()  # type: ignore[misc]
        with self._pool_lock:
            self._owners[self.conn_key(conn)] = threading.current_thread()  # type: ignore[attr-defined]
        return conn

    def _close(self, conn: Any, close_conn: bool = False) -> None:
        with self._pool_lock:
            self._owners.pop(self.conn_key(conn), None)  # type: ignore[attr-defined]
            super()._close(conn, close_conn)  # type: ignore[misc]
            self._wake_next_waiter()

    @contextlib.contextmanager
    def first_in_line(self) -> Iterator[None]:
        """The calls of this thread inside the block are served ahead of other waiting calls (see the class)."""
        outer = getattr(self._goes_first, "on", False)
        self._goes_first.on = True
        try:
            yield
        finally:
            self._goes_first.on = outer

    def _wake_next_waiter(self) -> None:
        """With `_pool_lock` held: give a free slot, if there is one, to the first waiter in line."""
        while len(self._in_use) + self._promised < self._max_connections:
            queue = self._waiting_first or self._waiting
            if not queue:
                return
            self._promised += 1
            queue.popleft().set()

    def _wait_for_turn(self) -> bool:
        """Queue behind the threads already waiting when the pool is full or has waiters (see the class).

        Returns whether this thread waited and was handed a promised slot
        (which its connect then takes); False when a slot was free at once.
        """
        first = getattr(self._goes_first, "on", False)
        line = self._waiting_first if first else self._waiting
        with self._pool_lock:
            ahead = self._waiting_first if first else (self._waiting_first or self._waiting)
            if not ahead and len(self._in_use) + self._promised < self._max_connections:
                return False
            turn = threading.Event()
            line.append(turn)
        try:
            deadline = time.monotonic() + POOL_WAIT_S
            while not (woken := turn.wait(min(WAIT_SLICE_S, max(0.0, deadline - time.monotonic())))):
                now = time.monotonic()
                if now >= deadline:
                    break
                if now >= self._next_reclaim:  # one scan per interval, however many wait
                    self._reclaim_from_finished_threads()  # may wake this thread: a slot freed by one that ended
        except BaseException:  # raised into the wait (a time limit, a shutdown): leave the line as found
            with self._pool_lock:
                if turn in line:
                    line.remove(turn)
                else:  # woken meanwhile: the slot promised to this thread goes to the next in line
                    self._promised -= 1
                    self._wake_next_waiter()
            raise
        if not woken:
            with self._pool_lock:
                if turn in line:  # not woken: give up
                    line.remove(turn)
                    raise MaxConnectionsExceeded(f"no connection for {POOL_WAIT_S} s")
            # Woken just as the wait ran out: the slot is this thread's.
        return True

    def close_all(self) -> None:
        super().close_all()  # type: ignore[misc]
        with self._pool_lock:
            self._owners.clear()

    def _reclaim_from_finished_threads(self) -> None:
        with self._pool_lock:
            self._next_reclaim = time.monotonic() + RECLAIM_EVERY_S
            for key, thread in list(self._owners.items()):
                if not thread.is_alive():
                    del self._owners[key]
                    held = self._in_use.pop(key, None)
                    if held is not None:
                        self._close_raw(held.connection)  # type: ignore[attr-defined]
            self._wake_next_waiter()

    def connect(self, reuse_if_open: bool = False) -> bool:
        if len(self._in_use) >= self._max_connections and time.monotonic() >= self._next_reclaim:
            self._reclaim_from_finished_threads()  # only a full pool needs them back (a scan per call costs)
        try:
            if not self.is_closed():  # type: ignore[attr-defined]
                return super().connect(reuse_if_open)  # type: ignore[misc, no-any-return]  # reuse, or peewee's error
            promised = self._wait_for_turn()
            try:
                opened: bool = super().connect(reuse_if_open)  # type: ignore[misc]
            except BaseException:
                with self._pool_lock:  # the slot this thread would have taken is free: the next waiter's
                    self._promised -= promised
                    self._wake_next_waiter()
                raise
            if promised:  # taken: no longer promised (a call that waited for nothing takes no lock here)
                with self._pool_lock:
                    self._promised -= 1
            return opened
        except MaxConnectionsExceeded:
            raise OperationalError(
                f"all {self._max_connections} pooled database connections of this process are in use "
                f"for {POOL_WAIT_S} s; raise LONGHAUL_DB_POOL_SIZE (default {DEFAULT_POOL_SIZE})"
            ) from None


def greenlets_patched() -> bool:
    """Whether this process runs its tasks as greenlets: gevent patched its standard library (`worker.greenlets`)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("time"))


#: Per process and SQLite file: the lock its writers take (see `SqliteStore`).
_WRITER_LOCKS: dict[tuple[int, str], threading.Lock] = {}
_WRITER_LOCKS_GUARD = threading.Lock()


def _writer_lock(path: str) -> threading.Lock:
    """This process's writer lock of the file at `path` (a fresh one in a forked child)."""
    key = (os.getpid(), path)
    lock = _WRITER_LOCKS.get(key)
    if lock is None:
        with _WRITER_LOCKS_GUARD:
            lock = _WRITER_LOCKS.setdefault(key, threading.Lock())
    return lock


class SqliteStore(_PoolRepairs, PooledSqliteDatabase):
    """peewee's pooled SQLite database, with one writer at a time per process.

    Why a process-wide writer lock: SQLite admits one writer per file, and
    a writer that finds the file locked sleeps and polls (its busy
    handler), with no queue and no fairness. With hundreds of threads
    claiming and checkpointing at once, some lose every poll until their
    busy timeout runs out (``database is locked``). So every write
    transaction (``BEGIN IMMEDIATE``) first takes this process's lock for
    the file, a real queue where each waiter is woken in turn, and holds it
    until its COMMIT or ROLLBACK; the busy handler is then only ever
    contended by *other* processes. Reads (``BEGIN DEFERRED``, WAL) take no
    lock and run beside the writer. The lock is waited on for at most the
    busy timeout, then the write fails as SQLite's would (``database is
    locked``, transient).

    Connections come from a pool of `max_connections` (each thread borrows
    one per store call); they may move between threads, hence
    ``check_same_thread=False`` (a connection is used by one thread at a
    time, which is what SQLite requires).
    """

    #: Pragmas that set the file, not the connection: run on a store's first connection only (`_set_pragmas`).
    FILE_PRAGMAS = frozenset({"auto_vacuum", "journal_mode"})

    def __init__(self, database: str, *, timeout_s: float, **kwargs: Any) -> None:
        self._writer_wait_s = timeout_s
        self._writer_held = threading.local()
        self._file_set_up = False
        super().__init__(database, timeout=POOL_WAIT_S, check_same_thread=False, **kwargs)

    def _set_pragmas(self, conn: Any) -> None:
        """Per-connection pragmas on every new connection; the file's own (`FILE_PRAGMAS`) on the first only.

        ``journal_mode=wal`` waits for the file's write lock, and peewee
        opens a pooled connection holding its database-wide lock: run on
        every new connection, one pragma waiting behind a long write would
        stall every connect and close of the process (every store call of
        every thread) until that write committed. WAL mode and
        ``auto_vacuum`` are stored in the file, so setting them once per
        store is enough.
        """
        cursor = conn.cursor()
        try:
            for pragma, value in self._pragmas:
                if self._file_set_up and pragma in self.FILE_PRAGMAS:
                    continue
                cursor.execute(f"PRAGMA {pragma} = {value};")
        finally:
            cursor.close()
        self._file_set_up = True

    def begin(self, lock_type: Optional[str] = None) -> None:
        lock_type = lock_type or self._lock_type
        if (lock_type or "").upper() not in ("IMMEDIATE", "EXCLUSIVE"):
            super().begin(lock_type)
            return
        lock = _writer_lock(self.database)
        if not lock.acquire(blocking=False):
            self._wait_for_writer_turn(lock)
        try:
            if greenlets_patched():
                self._begin_cooperatively(lock_type)
            else:
                super().begin(lock_type)
        except BaseException:
            lock.release()
            raise
        self._writer_held.lock = lock

    def _begin_cooperatively(self, lock_type: str) -> None:
        """``BEGIN IMMEDIATE`` that waits for another process's writer without stalling this process.

        In a greenlet process every task shares one OS thread, and SQLite's
        busy handler sleeps in C: a writer of another process holding the
        file would freeze all of this process's tasks (their reads, lease
        renewals, model calls) for as long as it held it. So the busy timeout
        is 0 for this one statement, and a ``database is locked`` is retried
        after a cooperative sleep (1 ms, doubling to 50 ms) until the busy
        timeout has passed.
        """
        deadline = time.monotonic() + self._writer_wait_s
        delay_s = 0.001
        cursor = self.cursor()
        cursor.execute("PRAGMA busy_timeout = 0")
        try:
            while True:
                try:
                    super().begin(lock_type)
                    return
                except OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() + delay_s > deadline:
                        raise
                time.sleep(delay_s)  # patched: the process's other greenlets run meanwhile
                delay_s = min(delay_s * 2, 0.05)
        finally:
            cursor.execute(f"PRAGMA busy_timeout = {int(self._writer_wait_s * 1000)}")

    def _wait_for_writer_turn(self, lock: threading.Lock) -> None:
        """Queue for `lock`, holding no pooled connection while queued; `database is locked` past the busy timeout.

        A writer waits its turn with its connection given back to the pool
        and takes one again once the lock is its: otherwise a queue of
        writers as long as the pool would hold every connection, and a
        read (or the writer whose turn it is, after a retry) would wait
        for a connection while no write could commit (all 16 connections
        in use for 30 s, seen with 1,000 tasks resuming at once). Nothing
        is lost by giving it back: no transaction is open yet.
        """
        handed_back = not self.is_closed() and not self.in_transaction()
        if handed_back:
            self.close()
        got = lock.acquire(timeout=self._writer_wait_s)
        if handed_back:
            try:
                self.connect()
            except BaseException:
                if got:
                    lock.release()
                raise
        if not got:
            raise OperationalError(f"database is locked: waited {self._writer_wait_s:g} s for this process's "
                                   "other writers (LONGHAUL_SQLITE_BUSY_TIMEOUT_MS)")

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._release_writer()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._release_writer()

    def _release_writer(self) -> None:
        lock = getattr(self._writer_held, "lock", None)
        if lock is not None:
            self._writer_held.lock = None
            lock.release()


class PostgresStore(_PoolRepairs, PooledPostgresqlDatabase):
    """peewee's pooled PostgreSQL database, with repairs for long-running workers.

    - A thread whose connection broke (a server restart, a proxy that cut
      it) gets a fresh one at its next statement instead of failing forever.
    - A dead connection is replaced before it fails a call: when the first
      statement of a transaction (``BEGIN``) or a read outside one fails
      because the connection is broken, the connection is replaced and the
      statement sent once more. Nothing can have been written by then:
      ``BEGIN`` changes nothing and a lone ``SELECT`` only reads, so the
      repeat is safe, and it costs nothing while connections are healthy
      (a liveness ping on checkout would cost a round trip per
      transaction). A failure later in a transaction, or of ``COMMIT``, is
      not repeated here (the outcome of a lost ``COMMIT`` is unknown): it
      surfaces as `StoreUnavailable`, which callers retry from stored state.
    - The pool's bookkeeping of `_PoolRepairs` (connections of finished
      threads reclaimed, a clear error when the pool runs dry).
    - Text holding NUL is stored escaped (`install_nul_escaping`).
    """

    def cursor(self, named_cursor: Optional[Any] = None) -> Any:
        if not self.is_closed() and self._state.conn.closed and not self.in_transaction():
            self.close()  # the pool sees the broken connection and discards it
        return super().cursor(named_cursor)

    def begin(self, isolation_level: Optional[str] = None) -> None:
        try:
            super().begin(isolation_level)
        except (OperationalError, InterfaceError):
            if not self.replace_broken_connection():
                raise
            super().begin(isolation_level)

    def execute_sql(self, sql: str, params: Any = None) -> Any:
        if self.in_transaction() or not sql.lstrip()[:6].upper() == "SELECT":
            return super().execute_sql(sql, params)
        try:
            return super().execute_sql(sql, params)
        except (OperationalError, InterfaceError):
            if not self.replace_broken_connection():
                raise
            return super().execute_sql(sql, params)

    def replace_broken_connection(self) -> bool:
        """If this thread's connection is broken, discard it (a fresh one opens on next use); whether it was."""
        conn = None if self.is_closed() else self._state.conn
        if conn is None or not (conn.closed or getattr(conn, "broken", False)):
            return False
        self.close()  # the pool sees the broken connection and discards it
        return True

    def _is_closed(self, conn: Any) -> bool:
        """At checkout: whether to discard `conn`, without peewee's liveness ping (a ``SELECT 1`` per borrow).

        Every store call borrows a connection, so the ping was a round trip
        per call; a dead connection is replaced when its first statement
        fails instead (see the class docstring). One left in a transaction
        is still rolled back here, or discarded.
        """
        if conn.closed or conn.broken:
            return True
        psycopg = loaded_psycopg()
        assert psycopg is not None
        if conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            return False
        return bool(super()._is_closed(conn))

    def _connect(self) -> Any:
        conn = super()._connect()
        if not getattr(conn, "_longhaul_nul_escaping", False):
            install_nul_escaping(conn)
        return conn
