"""Numbered schema migrations, and the runner that applies them when a `TaskStore` opens.

A fresh database gets every table at the current version at once; a database
written by an older release gets the missing columns here. Each migration
runs in the same transaction as the version bump, so a crash leaves the
schema at one version or the next, never between.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import orjson
from peewee import Database, Field, OperationalError, fn

from .context import StoreContext
from .dialect import is_busy
from .errors import SchemaTooNew
from .tables import SCHEMA_VERSION, Tables


@dataclass(frozen=True)
class SchemaMigration:
    """What opening a store did to its schema: from `from_version` (0: empty database) to `to_version`."""

    from_version: int
    to_version: int

    @property
    def changed(self) -> bool:
        return self.from_version != self.to_version


def migrate_waiting_for_writers(ctx: StoreContext, *, timeout_s: float) -> SchemaMigration:
    """`migrate`, retried while another process holds SQLite's lock, for up to `timeout_s`.

    Switching a fresh file to WAL (a pragma run at connect) gets
    SQLITE_BUSY at once, without the busy handler, while another
    connection writes it: workers opening a new database together would
    crash at start-up. Retry until the busy timeout runs out instead.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return migrate(ctx)
        except OperationalError as exc:
            if not ctx.db.is_closed():
                ctx.db.close()
            if not is_busy(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def migrate(ctx: StoreContext) -> SchemaMigration:
    """Create the schema if missing and migrate an older one (idempotent); record the version.

    A current schema is only read: no DDL, no write lock. That matters
    on PostgreSQL, where even ``CREATE INDEX IF NOT EXISTS`` locks its
    table against writes, so every worker or CLI start would stall the
    running tasks' checkpoints (and could deadlock with them). Otherwise
    the whole migration is one transaction (DDL included; PostgreSQL
    under an advisory lock, as hosts starting together on a fresh
    database would race in ``CREATE TABLE IF NOT EXISTS``). A database
    newer than this code raises `SchemaTooNew`.
    """
    db, tables = ctx.db, ctx.tables
    SchemaVersion = tables.SchemaVersion
    stored = schema_version(tables) if db.table_exists(SchemaVersion._meta.table_name) else 0
    if stored > SCHEMA_VERSION:
        raise SchemaTooNew(stored, SCHEMA_VERSION)
    if stored == SCHEMA_VERSION:
        return SchemaMigration(from_version=stored, to_version=stored)
    with db.atomic():
        ctx.dialect.lock_migrations()
        db.create_tables(tables.all, safe=True)
        found = schema_version(tables)
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(found, SCHEMA_VERSION)
        for version, migration in pending(found, SCHEMA_VERSION):
            migration(db, tables)
            SchemaVersion.insert(version=version, applied_at=ctx.clock()).on_conflict_ignore().execute()
        if found < SCHEMA_VERSION:
            SchemaVersion.insert(version=SCHEMA_VERSION, applied_at=ctx.clock()).on_conflict_ignore().execute()
    return SchemaMigration(from_version=found, to_version=max(found, SCHEMA_VERSION))


def schema_version(tables: Tables) -> int:
    """The highest schema version recorded (0 if none); the table must exist."""
    SchemaVersion = tables.SchemaVersion
    return SchemaVersion.select(fn.MAX(SchemaVersion.version)).scalar() or 0

#: Columns schema 2 added to `task`, with their constant defaults (its trace table was made by create_tables).
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


def _to_v3(db: Database, tables: Tables) -> None:
    """Schema 3: trace events are stored a batch per row (`trace_batch`, made by create_tables).

    `task` gets the next trace sequence and `checkpoint` its step's trace
    columns; each schema-2 event row becomes a batch of one, in sequence
    order, and `trace_event` is dropped.
    """
    if "trace_next_sequence" not in {column.name for column in db.get_columns("task")}:
        column_type = sql_type(db, tables.Task._meta.fields["trace_next_sequence"])
        db.execute_sql(f'ALTER TABLE "task" ADD COLUMN "trace_next_sequence" {column_type} NOT NULL DEFAULT 0')
    existing = {column.name for column in db.get_columns("checkpoint")}
    for name in ("trace_first_sequence", "trace"):
        if name not in existing:
            column_type = sql_type(db, tables.Checkpoint._meta.fields[name])
            db.execute_sql(f'ALTER TABLE "checkpoint" ADD COLUMN "{name}" {column_type}')
    if "trace_event" not in db.get_tables():
        return
    TraceBatch = tables.TraceBatch
    cursor = db.execute_sql(
        'SELECT "task_id", "sequence", "recorded_at", "elapsed_ms", "agent", "model", "job_type", "event_type", '
        '"data" FROM "trace_event" ORDER BY "task_id", "sequence"'
    )
    while rows := cursor.fetchmany(100):  # 100 rows x 9 values stays under SQLite's old 999-variable limit
        TraceBatch.insert_many([
            dict(task=task_pk, first_sequence=sequence, last_sequence=sequence,
                 started_at=recorded_at - elapsed_ms / 1000, agent=agent, model=model, job_type=job_type,
                 events=_one_event(elapsed_ms, event_type, data), refers_to_messages=False)
            for task_pk, sequence, recorded_at, elapsed_ms, agent, model, job_type, event_type, data in rows
        ]).execute()
    db.execute_sql('DROP TABLE "trace_event"')
    db.execute_sql(
        'UPDATE "task" SET "trace_next_sequence" = COALESCE((SELECT MAX(b."last_sequence") + 1 '
        'FROM "trace_batch" b WHERE b."task_id" = "task"."id"), 0)'
    )


def _to_v4(db: Database, tables: Tables) -> None:
    """Schema 4: `task` records the broker's id of the message last sent for it (`delivery_message_id`)."""
    if "delivery_message_id" not in {column.name for column in db.get_columns("task")}:
        column_type = sql_type(db, tables.Task._meta.fields["delivery_message_id"])
        db.execute_sql(f'ALTER TABLE "task" ADD COLUMN "delivery_message_id" {column_type}')


def _to_v5_otel_trace_parent(db: Database, tables: Tables) -> None:
    """Schema 5 (OpenTelemetry): `task` keeps the trace its runs continue (`otel_trace_parent`)."""
    if "otel_trace_parent" not in {column.name for column in db.get_columns("task")}:
        column_type = sql_type(db, tables.Task._meta.fields["otel_trace_parent"])
        db.execute_sql(f'ALTER TABLE "task" ADD COLUMN "otel_trace_parent" {column_type}')


def _to_v6_threads(db: Database, tables: Tables) -> None:
    """Schema 6 (threads): an index on ``task (thread_id, status, id)``, and ``task.cancel_reason``.

    Every claim of a queued task asks whether its thread is free, and every
    thread's story is read in arrival order: both walk this index. The
    column says who asked a running task to stop (``if_busy="interrupt"``),
    so its end names the newer task.
    """
    if "cancel_reason" not in {column.name for column in db.get_columns("task")}:
        column_type = sql_type(db, tables.Task._meta.fields["cancel_reason"])
        db.execute_sql(f'ALTER TABLE "task" ADD COLUMN "cancel_reason" {column_type}')
    db.execute_sql('CREATE INDEX IF NOT EXISTS "task_thread_id_status_id" ON "task" ("thread_id", "status", "id")')


def _to_v7_task_listing_indexes(db: Database, tables: Tables) -> None:
    """Schema 7 (task listing indexes): `task(updated_at, id)` and `task(created_at, id)`, for keyset paging.

    A step of its own (not shared with another change), so it can be
    renumbered when merged next to other schema changes. ``IF NOT EXISTS``:
    the opening `create_tables` may have made them already. On PostgreSQL
    this locks `task` against writes while each index builds (about a
    second per million tasks); run `longhaul migrate` when that is fine.
    """
    tables.Task._schema.create_indexes(safe=True)


def _to_v8_waiting(db: Database, tables: Tables) -> None:
    """Schema 8 (waiting for a reply, steering): ``task.waiting_for``, ``task.reply_due_at``, ``task.steering``."""
    present = {column.name for column in db.get_columns("task")}
    for name in ("waiting_for", "reply_due_at", "steering"):
        if name not in present:
            column_type = sql_type(db, tables.Task._meta.fields[name])
            db.execute_sql(f'ALTER TABLE "task" ADD COLUMN "{name}" {column_type}')


def _to_v9_tool_succeeded(db: Database, tables: Tables) -> None:
    """Schema 9 (journal): a tool result's row says whether its call succeeded (`message.tool_succeeded`).

    Nullable, no default: rows stored before keep NULL (their flag is
    guessed from their text, as before), and on PostgreSQL adding the
    column rewrites nothing.
    """
    if "tool_succeeded" not in {column.name for column in db.get_columns("message")}:
        column_type = sql_type(db, tables.Message._meta.fields["tool_succeeded"])
        db.execute_sql(f'ALTER TABLE "message" ADD COLUMN "tool_succeeded" {column_type}')


def _to_v10_task_end_counts(db: Database, tables: Tables) -> None:
    """Schema 10 (metrics): ``task_end_count``, tasks that reached each terminal status per agent (`task_ends.py`).

    A step of its own, so it can be renumbered when merged next to other
    schema changes. The opening `create_tables` made the table; counts
    start at zero here (tasks that ended before are not counted: a
    Prometheus counter only needs to grow from its first scrape).
    """
    tables.TaskEndCount.create_table(safe=True)


def _to_v11_steered(db: Database, tables: Tables) -> None:
    """Schema 10 (steering in the story): ``task.steered``, the steering texts a task took, for its thread's story.

    A step of its own, so it can be renumbered when merged next to other
    schema changes. Nullable, no default: tasks stored before were never
    steered as far as their story knows.
    """
    if "steered" not in {column.name for column in db.get_columns("task")}:
        column_type = sql_type(db, tables.Task._meta.fields["steered"])
        db.execute_sql(f'ALTER TABLE "task" ADD COLUMN "steered" {column_type}')


def _one_event(elapsed_ms: float, event_type: str, data: str) -> str:
    """A schema-2 event as a schema-3 batch of one (its data JSON kept as it was, or wrapped if unreadable)."""
    try:
        decoded = orjson.loads(data)
    except orjson.JSONDecodeError:
        decoded = {"unreadable_data": data}
    return orjson.dumps([[elapsed_ms, event_type, decoded]]).decode()


#: version -> migration that brings the schema from version - 1 to it.
MIGRATIONS: dict[int, Callable[[Database, Tables], None]] = {
    2: _to_v2, 3: _to_v3, 4: _to_v4, 5: _to_v5_otel_trace_parent, 6: _to_v6_threads, 7: _to_v7_task_listing_indexes,
    8: _to_v8_waiting,
    9: _to_v9_tool_succeeded,
    10: _to_v10_task_end_counts,
    11: _to_v11_steered,
}


def pending(found: int, target: int) -> list[tuple[int, Callable[[Database, Tables], None]]]:
    """The migrations to run, in order, for a database at `found` (0: fresh, nothing to migrate)."""
    if found == 0:
        return []
    return [(version, MIGRATIONS[version]) for version in range(found + 1, target + 1)]
