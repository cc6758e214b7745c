"""Trace events: what a task did, in order, across resumes and processes.

A `TraceWriter` buffers one run's events in memory and hands them to the
store with the next checkpoint (same transaction) as one `PendingTraces`,
stored as one row: tracing costs one insert per step, never a commit (or a
row) per event. Consecutive streamed ``content`` (or ``reasoning``) chunks
become one event, flushed when the event type changes, at a turn boundary,
at a checkpoint and at shutdown. A crash loses at most the events buffered
since the last checkpoint: those of the step in flight, which runs again
and emits them again.

Text an event shares with a message the same checkpoint appends (the
assistant's answer, a tool's output) is stored once, in the message, and the
event refers to it by position; reads put it back (redacted). So tracing
adds little more than the events' own metadata to each step's bytes.

Sequence numbers continue after the highest one stored for the task, from a
counter on its row, so they never repeat across resumes and processes; the
store refuses a batch that does not come after every stored one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterator, Mapping, Optional

import orjson
from pydantic import BaseModel

from .redact import is_secret_key, might_hold_secret, redact, redact_text

#: Event types whose consecutive chunks are consolidated into one event.
STREAMED = frozenset({"content", "reasoning"})

#: Shorter text is stored inline even when a message holds it: a reference would not be smaller.
MIN_REFERENCED_CHARS = 32

#: One buffered event: (recorded_at epoch s, event type, data).
PendingEvent = tuple[float, str, dict[str, Any]]


@dataclass(frozen=True)
class PendingTraces:
    """Events one writer buffered, numbered from `first_sequence`; stored as one row."""

    agent: str
    model: str
    job_type: str
    started_at: float
    first_sequence: int
    events: tuple[PendingEvent, ...]

    def __bool__(self) -> bool:
        return bool(self.events)

    @property
    def last_sequence(self) -> int:
        return self.first_sequence + len(self.events) - 1

    def encode(self, message_positions: Mapping[str, int]) -> tuple[str, bool]:
        """(events JSON, whether it refers to messages), secrets redacted.

        `message_positions` maps the text of each message stored with these
        events to its position in the execution history.
        """
        encoded: list[list[Any]] = []
        refers = False
        for recorded_at, event_type, data in self.events:
            ms = round((recorded_at - self.started_at) * 1000, 3)
            refs = _references(data, message_positions) if message_positions else None
            if refs:
                refers = True
                encoded.append([ms, event_type, _capped({key: value for key, value in data.items() if key not in refs}),
                                refs])
            else:
                encoded.append([ms, event_type, _capped(data)])
        text = orjson.dumps(encoded, default=str).decode()
        if might_hold_secret(text):  # rare: walk every value
            for event in encoded:
                event[2] = redact(event[2])
            text = orjson.dumps(encoded, default=str).decode()
        return text, refers

    def encode_with_header(self, message_positions: Mapping[str, int]) -> tuple[str, bool]:
        """Like `encode`, as one JSON object that also holds the writer's fields (a checkpoint's `trace`)."""
        events, refers = self.encode(message_positions)
        return step_trace_json(self.started_at, self.agent, self.model, self.job_type, events), refers


#: Texts the step loop may emit whole because a message usually holds them; stored inline
#: (no message did), they are cut to this many characters.
INLINE_CAPS = {"output": 2_000, "final_response": 2_000}


def _capped(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with each `INLINE_CAPS` text redacted and cut to its cap (copied only when one is cut)."""
    cut = {key: redact_text(value)[:cap] for key, cap in INLINE_CAPS.items()
           if (value := data.get(key)).__class__ is str and len(value) > cap}
    return {**data, **cut} if cut else data


def _references(data: dict[str, Any], message_positions: Mapping[str, int]) -> Optional[dict[str, int]]:
    """{key: position} for each top-level text of `data` that a message holds.

    Never a secret-named key's value: `redact` blanks those whole, which a
    reference (redacted by pattern when read) would not.
    """
    refs = None
    for key, value in data.items():
        if value.__class__ is str and len(value) >= MIN_REFERENCED_CHARS and not is_secret_key(key):
            position = message_positions.get(value)
            if position is not None:
                if refs is None:
                    refs = {}
                refs[key] = position
    return refs


#: One decoded event: (sequence, ms since the task's first step, event type, data, {key: message position}).
StoredEvent = tuple[int, float, str, dict[str, Any], dict[str, int]]


def step_trace_json(started_at: float, agent: str, model: str, job_type: str, events_json: str) -> str:
    """A checkpoint's `trace`: the writer's fields and its already-encoded events, as one JSON object."""
    header = orjson.dumps({"started_at": started_at, "agent": agent, "model": model, "job_type": job_type}).decode()
    return f'{header[:-1]},"events":{events_json}}}'


#: A stored batch as read back: (first sequence, started_at, agent, model, job type, events JSON or list).
StoredBatch = tuple[int, float, str, str, str, Any]


def decode_step_trace(first_sequence: int, raw: str) -> StoredBatch:
    """A checkpoint's `trace` (see `PendingTraces.encode_with_header`); ValueError if it cannot be read."""
    try:
        trace = orjson.loads(raw)
        return (first_sequence, float(trace["started_at"]), str(trace["agent"]), str(trace["model"]),
                str(trace["job_type"]), trace["events"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from None


def decode_events(first_sequence: int, raw: Any) -> Iterator[StoredEvent]:
    """The events of one stored batch (JSON text, or the list it holds); ValueError if they cannot be read."""
    if isinstance(raw, str):
        try:
            events = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ValueError(str(exc)) from None
    else:
        events = raw
    if not isinstance(events, list):
        raise ValueError("expected a list of events")
    for offset, event in enumerate(events):
        if not (isinstance(event, list) and 3 <= len(event) <= 4 and isinstance(event[0], (int, float))
                and isinstance(event[1], str)):
            raise ValueError(f"event {offset}: expected [ms, type, data(, refs)]")
        data = event[2] if isinstance(event[2], dict) else {"value": event[2]}
        refs = event[3] if len(event) == 4 and isinstance(event[3], dict) else {}
        yield first_sequence + offset, float(event[0]), event[1], data, refs


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
    _events: list[PendingEvent] = field(default_factory=list)
    _chunks: Optional[_Chunks] = None
    streamed_content: bool = False  # did the provider stream content during this turn?
    #: Hears every event but streamed chunks, as (type, data, recorded_at epoch s): metrics and spans
    #: (`worker.observe`). Called on the emitting thread; it must be cheap and never raise.
    listener: Optional[Callable[[str, dict[str, Any], float], None]] = None
    #: Called with every event as it is emitted, each chunk on its own (live output, `worker/live.py`).
    on_event: Optional[Callable[[str, dict[str, Any]], None]] = None

    def emit(self, event_type: str, data: dict[str, Any]) -> None:
        """Record an event; streamed chunks of the same type are merged.

        `data` is kept as given (redacted and encoded when the store takes
        it), so do not change it after emitting.
        """
        if self.on_event is not None:
            self.on_event(event_type, data)
        now = self.clock()
        if event_type in STREAMED:
            text = str(data.get("text", ""))
            if event_type == "content":
                self.streamed_content = True
            if self._chunks is not None and self._chunks.event_type == event_type:
                self._chunks.parts.append(text)
                return
            self._flush_chunks()
            self._chunks = _Chunks(event_type, [text], now)
            return
        self._flush_chunks()
        self._events.append((now, event_type, data))
        if self.listener is not None:
            self.listener(event_type, data, now)

    def end_turn(self) -> None:
        """A turn boundary: flush pending chunks; the next turn starts unstreamed."""
        self._flush_chunks()
        self.streamed_content = False

    def mark(self) -> int:
        """A point to `discard_streamed_since`: how many events are buffered now (pending chunks flushed)."""
        self._flush_chunks()
        return len(self._events)

    def discard_streamed_since(self, mark: int) -> tuple[int, str]:
        """Drop the streamed chunks buffered after `mark`; returns how many were dropped and their content text.

        For a model call that did not complete: the call is made again and
        streams its text again, which must not be traced twice.
        """
        self._flush_chunks()
        kept, dropped, text = self._events[:mark], 0, []
        for event in self._events[mark:]:
            if event[1] in STREAMED:
                dropped += int(event[2].get("chunks", 1))
                if event[1] == "content":
                    text.append(str(event[2].get("text", "")))
            else:
                kept.append(event)
        self._events = kept
        self.streamed_content = False
        return dropped, "".join(text)

    def take(self) -> PendingTraces:
        """Every buffered event (pending chunks flushed), leaving the buffer empty."""
        self._flush_chunks()
        events, self._events = tuple(self._events), []
        taken = PendingTraces(agent=self.agent, model=self.model, job_type=self.job_type,
                              started_at=self.started_at, first_sequence=self.next_sequence, events=events)
        self.next_sequence += len(events)
        return taken

    def _flush_chunks(self) -> None:
        chunks, self._chunks = self._chunks, None
        if chunks is not None:
            self._events.append((chunks.recorded_at, chunks.event_type,
                                 {"text": "".join(chunks.parts), "chunks": len(chunks.parts)}))


class NullTraceWriter(TraceWriter):
    """Tracing off (``LONGHAUL_TRACES=false``): events are dropped (the listener still hears them)."""

    def emit(self, event_type: str, data: dict[str, Any]) -> None:
        if self.listener is not None and event_type not in STREAMED:
            self.listener(event_type, data, self.clock())

    def take(self) -> PendingTraces:
        return PendingTraces(agent=self.agent, model=self.model, job_type=self.job_type,
                             started_at=self.started_at, first_sequence=self.next_sequence, events=())
