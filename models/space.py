"""Disk space of a store: what deleting tasks gives back, and the vacuum that makes it so.

SQLite keeps the pages of deleted rows in the file as free pages: a
`prune` of 90% of the tasks left a 490 MB file at 490 MB. A store created
by this longhaul has ``auto_vacuum=INCREMENTAL`` (set in `db.py` before
the first table exists), and `reclaim_after_delete` runs
``PRAGMA incremental_vacuum`` after a prune: the free pages are cut off the
file's end and the file shrinks (at the WAL checkpoint that follows).
A file created before cannot switch mode in place: SQLite records
auto_vacuum only when the file is rebuilt, so `vacuum_store` (``longhaul
vacuum``) sets the mode and runs ``VACUUM``, once. That rewrites the whole
file under an exclusive lock (writers wait up to their busy timeout) and
needs free disk space of about the file's size while it runs.

PostgreSQL reuses the space of deleted rows itself (autovacuum); the
files do not shrink, which is what a shared server wants. `vacuum` runs a
plain ``VACUUM (ANALYZE)`` of longhaul's tables there (no exclusive lock);
returning space to the operating system takes ``VACUUM FULL``, which locks
each table while it rewrites it, and is left to the operator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from peewee import __exception_wrapper__

from .context import StoreContext

#: `PRAGMA auto_vacuum` values.
_AUTO_VACUUM_NAMES = {0: "none", 1: "full", 2: "incremental"}
INCREMENTAL = 2


@dataclass(frozen=True)
class StoreSpace:
    """A store's size on disk in bytes, and how much of it is free (SQLite's free pages; 0 on PostgreSQL).

    `auto_vacuum` is SQLite's mode (``incremental`` for stores whose prunes
    shrink the file; ``none`` until `vacuum` has run once on an older file)
    or ``postgresql``.
    """

    backend: str
    total_bytes: int
    free_bytes: int
    auto_vacuum: str

    @property
    def prune_shrinks_file(self) -> bool:
        return self.auto_vacuum == "incremental"


def measure_space(ctx: StoreContext) -> StoreSpace:
    """The store's `StoreSpace` now (SQLite: the file plus its WAL)."""
    db = ctx.db
    if not ctx.dialect.is_sqlite:
        sizes = [db.execute_sql("SELECT pg_total_relation_size(%s)", (model._meta.table_name,)).fetchone()[0]
                 for model in ctx.tables.all]
        return StoreSpace(backend="postgresql", total_bytes=int(sum(sizes)), free_bytes=0, auto_vacuum="postgresql")
    page_size = db.execute_sql("PRAGMA page_size").fetchone()[0]
    free_pages = db.execute_sql("PRAGMA freelist_count").fetchone()[0]
    mode = db.execute_sql("PRAGMA auto_vacuum").fetchone()[0]
    return StoreSpace(backend="sqlite", total_bytes=_file_bytes(str(db.database)), free_bytes=free_pages * page_size,
                      auto_vacuum=_AUTO_VACUUM_NAMES.get(mode, str(mode)))


def reclaim_after_delete(ctx: StoreContext) -> None:
    """Give the free pages back to the file system (SQLite in incremental mode, outside a transaction; else nothing).

    Inside a caller's transaction it does nothing: the pages stay free in
    the file and the next prune (or `vacuum_store`) returns them.
    """
    db = ctx.db
    if not ctx.dialect.is_sqlite or db.in_transaction():  # executescript would commit a caller's transaction
        return
    if db.execute_sql("PRAGMA auto_vacuum").fetchone()[0] != INCREMENTAL:
        return
    # sqlite3's execute() steps a statement once, and this pragma frees one page per step:
    # executescript (sqlite3_exec) runs it to the end. Outside any transaction, as here, it commits nothing else.
    with __exception_wrapper__:
        db.connection().executescript("PRAGMA incremental_vacuum;")
    _truncate_wal(ctx)


def vacuum_store(ctx: StoreContext) -> None:
    """Rebuild the store compactly, switching an older SQLite file to incremental auto-vacuum (see module doc)."""
    db = ctx.db
    if ctx.dialect.is_sqlite:
        db.execute_sql("PRAGMA auto_vacuum = INCREMENTAL")  # recorded by the VACUUM that follows
        db.execute_sql("VACUUM")
        _truncate_wal(ctx)
        return
    for model in ctx.tables.all:
        db.execute_sql(f'VACUUM (ANALYZE) "{model._meta.table_name}"')


def _truncate_wal(ctx: StoreContext) -> None:
    # The shrink reaches the main file only when the WAL is checkpointed; a reader
    # still on an older snapshot makes this a partial checkpoint, done later by SQLite.
    ctx.db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def _file_bytes(path: str) -> int:
    return sum(os.path.getsize(name) for name in (path, path + "-wal") if os.path.exists(name))


__all__ = ["StoreSpace", "measure_space", "reclaim_after_delete", "vacuum_store"]
