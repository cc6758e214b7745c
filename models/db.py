"""Opening the database behind a task store.

SQLite is the embedded default. Each thread gets its own connection
(peewee's default), every connection runs with WAL, ``synchronous=NORMAL``,
foreign keys on and a busy timeout, and every write transaction starts with
``BEGIN IMMEDIATE`` so that concurrent writers queue on the busy timeout
instead of failing with ``database is locked`` when a read lock cannot be
upgraded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union
from urllib.parse import urlparse

from peewee import Database, SqliteDatabase
from playhouse import db_url

from .errors import InvalidDatabaseUrl

#: Where a task store lives when nothing else is configured.
DEFAULT_DATABASE_URL = "sqlite:///state/tasks.db"
#: How long a writer waits for another writer's transaction, in milliseconds.
DEFAULT_BUSY_TIMEOUT_MS = 30_000


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


def open_database(url_or_path: Union[str, Path], *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> Database:
    """Open (but do not connect) the database named by a URL or a path.

    Parent folders of a SQLite file are created. Raises
    `InvalidDatabaseUrl` naming the problem for anything that cannot hold a
    shared, durable store.
    """
    text = str(url_or_path).strip()
    if not text:
        raise InvalidDatabaseUrl(text, "empty; give a path or a URL such as sqlite:///state/tasks.db")
    path = sqlite_path_from_url(text)
    if path is not None:
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
        return SqliteDatabase(
            str(path),
            pragmas={
                "journal_mode": "wal",
                "synchronous": "normal",
                "foreign_keys": 1,
                "busy_timeout": busy_timeout_ms,
                "cache_size": -16_000,  # 16 MB page cache per connection
            },
            timeout=busy_timeout_ms / 1000,
            lock_type="IMMEDIATE",
        )
    try:
        return db_url.connect(text)
    except (RuntimeError, ValueError, ImportError) as exc:
        raise InvalidDatabaseUrl(text, f"{exc}; use sqlite:///path or postgresql://user:pass@host/db") from None
