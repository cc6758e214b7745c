"""Fresh database connections in a forked child.

``fork()`` copies a process with its open SQLite connections and pooled
PostgreSQL sockets. SQLite forbids using a connection in the child (its
locks belong to the parent; the child would corrupt the file's locking
state), and a PostgreSQL socket shared by two processes interleaves their
protocol messages, so either side's next query fails or reads the other's
answer. Closing the inherited copies is no better: closing a PostgreSQL
connection sends the server a Terminate message, which ends the *parent's*
session.

So after a fork (`os.register_at_fork`), the child forgets every
connection it inherited from each database this process opened: each
database gets a fresh per-thread state, lock and (for a pool) empty pool,
and connects anew at its next statement. The inherited connection objects
are kept referenced, never closed, so garbage collection cannot close them
either; the sockets of inherited PostgreSQL connections are first pointed
at ``/dev/null`` in the child, so nothing the child's copy writes reaches
the parent's session.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

from peewee import Database, _ConnectionLocal, _ConnectionState
from playhouse.pool import PooledDatabase

#: Every database this process opened (`track`), so a forked child can reset each one.
_TRACKED: weakref.WeakSet[Database] = weakref.WeakSet()
#: What this process inherited through fork() and must neither use nor close.
_INHERITED: list[Any] = []


def track(database: Database) -> Database:
    """Give `database` fresh connections in any child this process forks from now on; returns it."""
    _TRACKED.add(database)
    return database


def _silence(connection: Any) -> None:
    """Point an inherited driver connection's socket at /dev/null, in this process only."""
    fileno = getattr(connection, "fileno", None)
    if fileno is None:
        return
    try:
        fd = fileno()
    except Exception:  # already closed or broken: nothing to silence
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _forget_pool(database: PooledDatabase) -> None:
    connections = [conn for _ts, _counter, conn in database._connections]
    connections += [held.connection for held in database._in_use.values()]
    for connection in connections:
        _silence(connection)
    _INHERITED.extend(connections)
    database._pool_lock = threading.RLock()  # another thread may have held it at the fork
    database._pool_available = threading.Condition(database._pool_lock)
    database._connections = []
    database._in_use = {}
    owners = getattr(database, "_owners", None)
    if isinstance(owners, dict):
        owners.clear()


def forget_inherited_connections() -> None:
    """In a forked child: drop every connection inherited with the tracked databases (see the module doc)."""
    for database in list(_TRACKED):
        if isinstance(database, PooledDatabase):
            _forget_pool(database)
        _INHERITED.append(database._state)
        database._state = _ConnectionLocal() if database.thread_safe else _ConnectionState()
        database._lock = threading.Lock() if database.thread_safe else database._lock


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=forget_inherited_connections)
