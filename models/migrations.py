"""Numbered schema migrations, applied in order by `TaskStore` when it opens.

A fresh database gets every table at the current version at once; a database
written by an older release gets the missing columns here. Each migration
runs in the same transaction as the version bump, so a crash leaves the
schema at one version or the next, never between.
"""

from __future__ import annotations

from typing import Callable

from peewee import Database, Field

from .tables import Tables

#: Columns schema 2 added to `task`, with their constant defaults (the trace table is created by create_tables).
_V2_TASK_COLUMNS = {
    "turn_count": "0",
    "tool_call_count": "0",
    "input_tokens": "0",
    "output_tokens": "0",
    "cache_read_tokens": "0",
    "cache_creation_tokens": "0",
    "reasoning_tokens": "0",
    "request_count": "0",
    "cost_usd": "0.0",
}


def sql_type(db: Database, field: Field) -> str:
    """The column type `db` gives `field` (INTEGER/REAL on SQLite, BIGINT/DOUBLE PRECISION on PostgreSQL)."""
    return str(db.get_context_options()["field_types"].get(field.field_type, field.field_type))


def _to_v2(db: Database, tables: Tables) -> None:
    """Schema 2: usage and turn counters on `task` (traces get their own table).

    Plain ``ALTER TABLE ... ADD COLUMN`` with a constant default, not
    `playhouse.migrate`: on SQLite its add_column rebuilds the table for a
    NOT NULL column, and dropping the old `task` table cascades (foreign
    keys are on) to every message and checkpoint.
    """
    existing = {column.name for column in db.get_columns("task")}
    fields = tables.Task._meta.fields
    for name, default in _V2_TASK_COLUMNS.items():
        if name not in existing:
            column_type = sql_type(db, fields[name])
            db.execute_sql(f'ALTER TABLE "task" ADD COLUMN "{name}" {column_type} NOT NULL DEFAULT {default}')
    # Counters for tasks that already ran: recount once from their messages.
    db.execute_sql(
        'UPDATE "task" SET "turn_count" = (SELECT COUNT(*) FROM "message" m WHERE m."task_id" = "task"."id" '
        "AND m.\"history\" = 0 AND m.\"role\" = 'assistant')"
    )


#: version -> migration that brings the schema from version - 1 to it.
MIGRATIONS: dict[int, Callable[[Database, Tables], None]] = {2: _to_v2}


def pending(found: int, target: int) -> list[tuple[int, Callable[[Database, Tables], None]]]:
    """The migrations to run, in order, for a database at `found` (0: fresh, nothing to migrate)."""
    if found == 0:
        return []
    return [(version, MIGRATIONS[version]) for version in range(found + 1, target + 1)]
