"""longhaul's durable task store: schemas, the store, and resumable turns."""

from __future__ import annotations

from . import drivers  # noqa: F401  (first: it imports peewee without psycopg, which only PostgreSQL needs)
from .db import DEFAULT_DATABASE_URL, open_database
from .errors import (
    CorruptRecord,
    InvalidCursor,
    InvalidDatabaseUrl,
    InvalidInput,
    LeaseLost,
    LonghaulError,
    NotWaiting,
    SchemaTooNew,
    StoreUnavailable,
    StoreUnusable,
    TaskNotFound,
    TaskNotResumable,
    TraceSequenceClash,
    UnstorableValue,
)
from .journal import OpenStep, orphan_result, with_orphans_answered
from .leases import Claim, Claimant, LeaseBook, LeaseRow, StepBoundary
from .schemas import (
    AgentSpec,
    Budget,
    ChatMessage,
    CheckpointItem,
    CheckpointUpdate,
    InvalidArguments,
    LeaseInfo,
    TaskCheckpointRecord,
    TaskRecord,
    TaskSnapshot,
    TaskSpec,
    TaskStatus,
    TaskSummary,
    ToolCall,
    Usage,
)
from .store import TaskStore
from .tasks import NewTask
from .turns import (
    TOOL_CALL_TAGS,
    load_resumable_state,
    normalize_resumable_turns,
    parse_tool_call_tags,
    resumable_turns,
    resumable_turns_from_task_record,
    strip_tool_call_tags,
)
from .waiting import Wait, denial

__all__ = [
    # Errors
    "LonghaulError", "CorruptRecord", "InvalidCursor", "InvalidDatabaseUrl", "InvalidInput", "LeaseLost",
    "NotWaiting", "SchemaTooNew", "StoreUnavailable", "StoreUnusable", "TaskNotFound",
    "TaskNotResumable", "TraceSequenceClash", "UnstorableValue",
    # Schemas
    "AgentSpec", "Budget", "ChatMessage", "CheckpointItem", "CheckpointUpdate", "InvalidArguments", "LeaseInfo",
    "TaskCheckpointRecord",
    "TaskRecord", "TaskSnapshot", "TaskSpec", "TaskStatus", "TaskSummary", "ToolCall", "Usage",
    # Store
    "DEFAULT_DATABASE_URL", "NewTask", "TaskStore", "open_database",
    # Waiting for a reply
    "Wait", "denial",
    # The step journal
    "OpenStep", "orphan_result", "with_orphans_answered",
    # Leases
    "Claim", "Claimant", "LeaseBook", "LeaseRow", "StepBoundary",
    # Turns
    "TOOL_CALL_TAGS", "load_resumable_state", "normalize_resumable_turns", "parse_tool_call_tags",
    "resumable_turns", "resumable_turns_from_task_record", "strip_tool_call_tags",
]
