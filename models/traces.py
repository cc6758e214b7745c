"""Trace events: what a task did, in order, across resumes and processes.

A `TraceWriter` buffers one run's events in memory and hands them to the
store with the next checkpoint (same transaction), so tracing costs one
``executemany`` per step, never a commit per event. Consecutive streamed
``content`` (or ``reasoning``) chunks become one row, flushed when the event
type changes, at a turn boundary, at a checkpoint and at shutdown. A crash
loses at most the events buffered since the last checkpoint: those of the
step in flight, which runs again and emits them again.

Sequence numbers continue after the highest one stored for the task (the
seed restarted at 0 after a resume and collided); a unique index on
``(task, sequence)`` enforces it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Optional

import orjson
from pydantic import BaseModel

from .redact import redact

#: Event types whose consecutive chunks are consolidated into one row.
STREAMED = frozenset({"content", "reasoning"})

EVENT_TYPES = frozenset({
    "session_started", "resumed", "content", "reasoning", "tool_call_started", "tool_call_completed",
    "tool_call_failed", "checkpoint", "turn_completed", "usage_update", "error", "done",
})

#: One row as the store inserts it, after the task's key:
#: (sequence, recorded_at, elapsed_ms, agent, model, job_type, event_type, data_json)
TraceRow = tuple[int, float, float, str, str, str, str, str]


class TraceEventRecord(BaseModel):
    """A stored trace event, as loaded."""

    task_id: str
    sequence: int
    recorded_at: datetime
    elapsed_ms: float
    agent: str
    model: str
    job_type: str
    event_type: str
    data: dict[str, Any]


@dataclass
class _Chunks:
    event_type: str
    parts: list[str]
    recorded_at: float
    elapsed_ms: float


@dataclass
class TraceWriter:
    """Buffers one task run's events until the store takes them.

    `emit` has the provider `EmitEvent` signature, so providers stream
    chunks straight into it. Not thread-safe: one writer per running task.
    """

    agent: str
    model: str
    job_type: str
    next_sequence: int
    started_at: float  # the task's first step (epoch s): elapsed_ms counts from here
    clock: Callable[[], float] = time.time
    _rows: list[TraceRow] = field(default_factory=list)
    _chunks: Optional[_Chunks] = None
    streamed_content: bool = False  # did the provider stream content during this turn?

    def reserve_sequence(self) -> int:
        """Take the next sequence number, for a row the caller writes itself."""
        sequence = self.next_sequence
        self.next_sequence += 1
        return sequence

    def emit(self, event_type: str, data: dict[str, Any]) -> None:
        """Record an event; streamed chunks of the same type are merged."""
        now = self.clock()
        if event_type in STREAMED:
            text = str(data.get("text", ""))
            if event_type == "content":
                self.streamed_content = True
            if self._chunks is not None and self._chunks.event_type == event_type:
                self._chunks.parts.append(text)
                return
            self._flush_chunks()
            self._chunks = _Chunks(event_type, [text], now, self._elapsed_ms(now))
            return
        self._flush_chunks()
        self._append(event_type, data, now, self._elapsed_ms(now))

    def end_turn(self) -> None:
        """A turn boundary: flush pending chunks; the next turn starts unstreamed."""
        self._flush_chunks()
        self.streamed_content = False

    def take(self) -> list[TraceRow]:
        """Every buffered row (pending chunks flushed), leaving the buffer empty."""
        self._flush_chunks()
        rows, self._rows = self._rows, []
        return rows

    def _elapsed_ms(self, now: float) -> float:
        return round(max(0.0, now - self.started_at) * 1000, 3)

    def _flush_chunks(self) -> None:
        chunks, self._chunks = self._chunks, None
        if chunks is not None:
            self._append(chunks.event_type, {"text": "".join(chunks.parts), "chunks": len(chunks.parts)},
                         chunks.recorded_at, chunks.elapsed_ms)

    def _append(self, event_type: str, data: dict[str, Any], recorded_at: float, elapsed_ms: float) -> None:
        payload = orjson.dumps(redact(data), default=str).decode()
        self._rows.append((self.reserve_sequence(), recorded_at, elapsed_ms, self.agent, self.model,
                           self.job_type, event_type, payload))


class NullTraceWriter(TraceWriter):
    """Tracing off (``LONGHAUL_TRACES=false``): events are dropped."""

    def emit(self, event_type: str, data: dict[str, Any]) -> None:
        return None

    def take(self) -> list[TraceRow]:
        return []
