"""Peewee table definitions, bound to one database per store.

Tables are declared inside :func:`bind_tables` so that two stores opened on
two databases in one process never share (and silently re-bind) model
classes.

Time columns hold seconds since the epoch as double-precision floats:
comparable on every backend, cheap to write on the hot path, converted to
``datetime`` on load. (``DoubleField``, never ``FloatField``: peewee maps the
latter to PostgreSQL's 4-byte ``REAL``, which rounds today's epoch seconds to
whole minutes. Both are ``REAL``, 8 bytes, on SQLite.) Counters that grow
without bound (tokens, message and trace rows) are 64-bit on PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass

from peewee import (
    AutoField,
    BigAutoField,
    BigIntegerField,
    BooleanField,
    CharField,
    CompositeKey,
    Database,
    DoubleField,
    ForeignKeyField,
    IntegerField,
    Model,
    SmallIntegerField,
    TextField,
)

from .dialect import is_sqlite

#: The schema this code writes. Bump it with a migration in `migrations.py`.
SCHEMA_VERSION = 11

#: Column values of a task that nobody holds.
NO_LEASE = dict(lease_token=None, lease_owner=None, lease_host=None, lease_pid=None,
                lease_pid_started_at=None, lease_expires_at=None)

#: `Message.history` values: the full execution log, or the user-visible turns.
EXECUTION = 0
RESUMABLE = 1


@dataclass(frozen=True)
class Tables:
    """The model classes of one database."""

    Task: type[Model]
    Message: type[Model]
    Checkpoint: type[Model]
    TraceBatch: type[Model]
    SchemaVersion: type[Model]
    TaskEndCount: type[Model]

    @property
    def all(self) -> list[type[Model]]:
        return [self.Task, self.Message, self.Checkpoint, self.TraceBatch, self.SchemaVersion, self.TaskEndCount]


def bind_tables(db: Database) -> Tables:
    """Declare longhaul's tables on `db`."""

    sqlite = is_sqlite(db)

    class Base(Model):
        class Meta:
            database = db
            legacy_table_names = False

    class Task(Base):
        id = AutoField()
        task_id = CharField(max_length=200, unique=True)
        thread_id = CharField(max_length=200)
        channel = CharField(max_length=200)
        provider = CharField(max_length=200)
        model = CharField(max_length=200)
        status = CharField(max_length=16)
        spec = TextField(null=True)  # TaskSpec as JSON
        latest_checkpoint_note = TextField(null=True)
        checkpoint_count = IntegerField(default=0)
        # Next free `Message.position` per history: appends never count rows.
        execution_count = IntegerField(default=0)
        resumable_count = IntegerField(default=0)
        final_response = TextField(null=True)
        last_error = TextField(null=True)
        created_at = DoubleField()
        updated_at = DoubleField()
        completed_at = DoubleField(null=True)
        started_at = DoubleField(null=True)  # first claim: the time limit counts from here
        # When the latest message sent for this task should reach a worker;
        # recovery leaves the task alone until then (plus a grace period).
        delivery_due_at = DoubleField(null=True)
        # The broker's id of that message (Redis's ``redis_message_id``), if known: recovery checks it still
        # exists, so a message lost with the broker's data is re-sent at once, not after the grace period.
        delivery_message_id = CharField(max_length=64, null=True)
        # Since schema 5: the OpenTelemetry trace every run of the task continues, as
        # "<trace id>-<span id>" (hex, the first run's span); null until a traced run starts.
        otel_trace_parent = CharField(max_length=64, null=True)
        # The lease: who runs the task now. `lease_token` is unique per claim.
        lease_token = CharField(max_length=64, null=True)
        lease_owner = CharField(max_length=200, null=True)
        lease_host = CharField(max_length=200, null=True)
        lease_pid = IntegerField(null=True)
        lease_pid_started_at = DoubleField(null=True)
        lease_expires_at = DoubleField(null=True)
        recovery_count = IntegerField(default=0)
        cancel_requested = BooleanField(default=False)
        # Since schema 6 (threads): who asked the running task to stop, said in its end
        # ("interrupted by task 'X'"); None for a plain cancel.
        cancel_reason = CharField(max_length=300, null=True)
        # Since schema 8 (waiting for a reply): what a `waiting` task waits for, as JSON (`models/waiting.py`),
        # kept after the reply (an approval's decision lives here), and when it stops waiting (None: never).
        waiting_for = TextField(null=True)
        reply_due_at = DoubleField(null=True)
        # Since schema 8: messages sent with if_busy="steer", a JSON list of texts, taken before the next model call.
        steering = TextField(null=True)
        # Since schema 11: the steering messages the task took, in order (JSON list of texts): its story's turns.
        steered = TextField(null=True)
        # Since schema 3: the next trace sequence; a trace batch must start at or after it.
        trace_next_sequence = BigIntegerField(default=0)
        # Since schema 2: what the task said and spent, summed as it runs.
        turn_count = IntegerField(default=0)  # assistant messages
        tool_call_count = IntegerField(default=0)
        input_tokens = BigIntegerField(default=0)
        output_tokens = BigIntegerField(default=0)
        cache_read_tokens = BigIntegerField(default=0)
        cache_creation_tokens = BigIntegerField(default=0)
        reasoning_tokens = BigIntegerField(default=0)
        request_count = IntegerField(default=0)
        cost_usd = DoubleField(default=0.0)

        class Meta:
            table_name = "task"
            indexes = (
                (("thread_id", "updated_at"), False),
                # Since schema 6 (threads): who runs on a thread, who starts next, its story in arrival order.
                (("thread_id", "status", "id"), False),
                (("status", "lease_expires_at"), False),
                (("status", "updated_at"), False),
                # Since schema 7: what `tasks` pages on, newest first (keyset: `paging.py`).
                (("updated_at", "id"), False),
                (("created_at", "id"), False),
            )

    class Message(Base):
        id = BigAutoField()
        task = ForeignKeyField(Task, on_delete="CASCADE", column_name="task_id", index=False)
        history = SmallIntegerField()
        position = IntegerField()
        step_index = IntegerField(null=True)
        role = CharField(max_length=16)
        content = TextField()
        tool_call_id = CharField(max_length=200, null=True)
        name = CharField(max_length=200, null=True)
        tool_calls = TextField(null=True)  # list[ToolCall] as JSON
        # Since schema 9: whether a tool result says its call succeeded (None: not a tool result, or one
        # stored before schema 9, whose flag `worker.tools.failed_output` guesses from its text).
        tool_succeeded = BooleanField(null=True)

        class Meta:
            table_name = "message"
            indexes = ((("task", "history", "position"), True),)

    class Checkpoint(Base):
        id = BigAutoField()
        task = ForeignKeyField(Task, on_delete="CASCADE", column_name="task_id", index=False)
        step_index = IntegerField()
        checkpoint_note = TextField(null=True)
        items = TextField()  # list[CheckpointItem] as JSON
        created_at = DoubleField()
        # Since schema 3: the step's trace events (`PendingTraces.encode_with_header`), numbered from
        # `trace_first_sequence`. In this row, not a row of their own: the commit then writes no
        # extra page, which is most of what tracing a step costs.
        trace_first_sequence = BigIntegerField(null=True)
        trace = TextField(null=True)

        class Meta:
            table_name = "checkpoint"
            indexes = ((("task", "step_index"), True),)

    class TraceBatch(Base):
        """Trace events written together outside a step (a start, a resume, an end); since schema 3.

        A step's own events live in its checkpoint row (`Checkpoint.trace`),
        and move here when a rerun deletes the checkpoints. Event
        ``first_sequence + i`` is ``events[i]``; sequences continue across
        resumes and processes, and events are only stored after every
        stored one (see `TaskStore`). Text an event shares with a message
        stored with it is kept once, in the message, and referenced.
        """

        task = ForeignKeyField(Task, on_delete="CASCADE", column_name="task_id", index=False)
        first_sequence = BigIntegerField()
        last_sequence = BigIntegerField()
        started_at = DoubleField()  # the task's first step (epoch s); events hold milliseconds since
        agent = CharField(max_length=200)  # provider
        model = CharField(max_length=200)
        job_type = CharField(max_length=64)
        # JSON: [[ms since started_at, event type, data(, {key: message position})], ...], secrets redacted
        events = TextField()
        refers_to_messages = BooleanField(default=False)

        class Meta:
            table_name = "trace_batch"
            # Keyed by (task, last sequence): reads seek "events after N" on it. On SQLite the rows
            # live in that key's b-tree (no rowid, no second index), one b-tree write per step fewer.
            primary_key = CompositeKey("task", "last_sequence")
            without_rowid = sqlite

    class SchemaVersion(Base):
        version = IntegerField(primary_key=True)
        applied_at = DoubleField()

        class Meta:
            table_name = "schema_version"

    class TaskEndCount(Base):
        """Since schema 10: how many tasks reached each terminal status, per agent (`task_ends.py`)."""

        status = CharField(max_length=16)
        agent = CharField(max_length=200)
        count = BigIntegerField(default=0)

        class Meta:
            table_name = "task_end_count"
            primary_key = CompositeKey("status", "agent")

    return Tables(Task=Task, Message=Message, Checkpoint=Checkpoint, TraceBatch=TraceBatch,
                  SchemaVersion=SchemaVersion, TaskEndCount=TaskEndCount)
