"""`StoreContext`: what every part of a task store shares, and the row access they all use.

One context per `TaskStore`: its database, tables, dialect, prepared
statements and clock. The store's parts (`LeaseBook`, `TraceStore`,
`Checkpoints`, `TaskWrites`, `TaskReads`) each hold it and nothing else of
one another, so each can be read, and tested, on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterable, Optional, Protocol, Sequence, Union

from peewee import Database, __exception_wrapper__

from .clock import Clock
from .dialect import Dialect, StoreFailures
from .errors import TaskNotFound
from .presumed_writes import KnownRows
from .statements import Statements
from .tables import EXECUTION, Tables


@dataclass
class StoreContext:
    """A store's database, tables, dialect, prepared statements and clock (replaceable: read it per call)."""

    db: Database
    tables: Tables
    dialect: Dialect
    sql: Statements
    clock: Clock
    #: What this store's last write under a lease left in each task's row: its next step write may presume
    #: it (one round trip on PostgreSQL, `presumed_writes.py`). Remembers nothing on SQLite.
    known_rows: KnownRows = field(default_factory=KnownRows)

    @property
    def context(self) -> StoreContext:
        """Itself, so a part accepts a context wherever it accepts a `TaskStore` (see `HasContext`)."""
        return self

    def call(self, task_id: Optional[str] = None) -> StoreFailures:
        """One store call: a connection borrowed from the pool for its duration, driver errors translated."""
        return StoreFailures(task_id, db=self.db)

    def locked_task_row(self, task_id: str) -> Any:
        """The task's row or None, locked until the transaction ends (see `Dialect.locked`)."""
        # Rendered once (`Statements.select_task_locked`): rendering a select of every column costs more than
        # running it.
        return next(iter(self.tables.Task.raw(self.sql.select_task_locked, task_id)), None)

    def task_row(self, task_id: str, *, for_update: bool = False) -> Any:
        """The task's row (`TaskNotFound` if missing); `for_update` inside write transactions."""
        if for_update:
            row = self.locked_task_row(task_id)
        else:
            Task = self.tables.Task
            row = Task.get_or_none(Task.task_id == task_id)
        if row is None:
            raise TaskNotFound(task_id)
        return row

    def insert_messages(self, rows: list[tuple[Any, ...]]) -> None:
        """Insert `codec.message_rows` output with one ``executemany``."""
        if rows:
            # Raw executemany, translated to peewee's exceptions like every other statement.
            with __exception_wrapper__:
                self.db.cursor().executemany(self.sql.insert_message, rows)

    def execution_texts(self, task_pk: int, positions: Optional[set[int]]) -> dict[int, str]:
        """position -> content of the task's execution messages at `positions` (None: all of them)."""
        Message = self.tables.Message
        where = (Message.task == task_pk) & (Message.history == EXECUTION)
        if positions is None:
            return dict(Message.select(Message.position, Message.content).where(where).tuples())
        wanted, texts = sorted(positions), {}
        for start in range(0, len(wanted), 500):
            query = Message.select(Message.position, Message.content).where(
                where & Message.position.in_(wanted[start:start + 500]))
            texts.update(query.tuples())
        return texts


def named_row(cursor: Any, values: tuple[Any, ...]) -> SimpleNamespace:
    """A fetched row's columns by name (the cursor's description), without building a peewee model instance."""
    return row_by_name((column[0] for column in cursor.description), values)


def row_by_name(names: Iterable[str], values: Sequence[Any]) -> SimpleNamespace:
    """A row's `values` as attributes named `names` (in the same order)."""
    return SimpleNamespace(**dict(zip(names, values, strict=True)))


class HasContext(Protocol):
    """A `TaskStore` or a `StoreContext`: what the store's parts are built from."""

    @property
    def context(self) -> StoreContext: ...


class StoredTexts:
    """`codec.Texts` read from the database when first asked for: the one position, or the whole history."""

    def __init__(self, ctx: StoreContext, task_pk: int, *, whole_history: bool = False) -> None:
        self.ctx, self.task_pk, self.whole_history = ctx, task_pk, whole_history
        self.found: Optional[dict[int, str]] = None

    def __getitem__(self, position: Union[int, Any]) -> str:
        if self.whole_history:
            if self.found is None:
                self.found = self.ctx.execution_texts(self.task_pk, None)
            return self.found[position]
        found = self.ctx.execution_texts(self.task_pk, {position}) if isinstance(position, int) else {}
        return found[position]
