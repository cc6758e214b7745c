"""Rows to schemas and back: message rows, checkpoint items, task summaries, and message-text references.

Text a checkpoint item or trace event shares with a message stored in the
same write is kept once, in the message; the item or event holds the
message's position in the execution history instead (``output_at`` in an
item, a ``{key: position}`` map in an event). Reading puts the text back,
through a `Texts` lookup. A stored cell that cannot be decoded raises
`CorruptRecord` naming the task and the field, never a bare decoding error.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Optional, Protocol, Sequence

import orjson
from pydantic import ValidationError

from .errors import CorruptRecord, InvalidInput
from .redact import redact_text
from .schemas import ChatMessage, CheckpointItem, LeaseInfo, TaskCheckpointRecord, TaskSpec, TaskStatus, ToolCall, Usage
from .traces import MIN_REFERENCED_CHARS, StoredBatch, StoredEvent, decode_events, decode_step_trace

#: PostgreSQL text cannot hold NUL; `escape_nul` writes it as DLE (``\x10``, "data link escape") and ``0``.
_DLE, _NUL = "\x10", "\x00"
_ESCAPED_NUL = re.compile("\x10([\x100])")
#: The identifiers that may not hold NUL on either backend (they are compared, indexed and shown).
NUL_FREE_FIELDS = ("task_id", "thread_id", "channel")

#: The usage counters summed on a task row, in `Usage` field order.
USAGE_FIELDS = tuple(Usage.model_fields)
_NO_USAGE = Usage()


def to_datetime(epoch_s: Optional[float]) -> Optional[datetime]:
    """A stored time (epoch seconds) as an aware UTC datetime; None stays None."""
    return None if epoch_s is None else datetime.fromtimestamp(epoch_s, tz=timezone.utc)


# -- text PostgreSQL cannot hold ------------------------------------------------------


def escape_nul(text: str) -> str:
    """`text` with NUL written as DLE ``0`` and DLE as DLE DLE, so PostgreSQL can store it; `unescape_nul` undoes it.

    Applied to every text parameter and result of a PostgreSQL connection
    (`db.PostgresStore`), so model and tool text round-trips byte-exact on
    both backends. Text without DLE or NUL (nearly all) is returned as is.
    """
    if _DLE not in text and _NUL not in text:
        return text
    return text.replace(_DLE, _DLE + _DLE).replace(_NUL, _DLE + "0")


def unescape_nul(text: str) -> str:
    """The text `escape_nul` was given."""
    if _DLE not in text:
        return text
    return _ESCAPED_NUL.sub(lambda found: _NUL if found.group(1) == "0" else _DLE, text)


def refuse_nul_identifiers(**fields: object) -> None:
    """`InvalidInput` naming the first of `fields` (task_id, thread_id, channel) that holds a NUL character."""
    for name, value in fields.items():
        if isinstance(value, str) and _NUL in value:
            raise InvalidInput(f"{name}: must not contain a NUL character (\\x00), got {value!r}")


# -- writing ---------------------------------------------------------------------------


def message_rows(task_pk: int, history: int, first_position: int, messages: Sequence[ChatMessage],
                 step_index: Optional[int], *, tool_succeeded: Optional[bool] = None) -> list[tuple[Any, ...]]:
    """`message` rows for `messages`, numbered from `first_position`, in `Statements.insert_message` order.

    `tool_succeeded` is stored with the tool results among `messages` (the
    journal stores one result at a time); None leaves the flag unknown.
    """
    return [
        (
            task_pk,
            history,
            first_position + offset,
            step_index,
            message.role,
            message.content,
            message.tool_call_id,
            message.name,
            None if message.tool_calls is None
            else orjson.dumps([call.model_dump() for call in message.tool_calls]).decode(),
            tool_succeeded if message.role == "tool" else None,
        )
        for offset, message in enumerate(messages)
    ]


def positions_by_text(messages: Sequence[ChatMessage], first_position: int) -> dict[str, int]:
    """text -> position of the messages about to be stored from `first_position`, long texts only."""
    return {message.content: first_position + offset for offset, message in enumerate(messages)
            if len(message.content) >= MIN_REFERENCED_CHARS}


def items_json(items: Sequence[CheckpointItem], positions: dict[str, int]) -> str:
    """A checkpoint's items as JSON; an output some new message holds becomes ``output_at``: its position."""
    encoded = []
    for item in items:
        fields = item.model_dump()
        position = positions.get(item.output) if positions else None
        if position is not None:
            del fields["output"]
            fields["output_at"] = position
        encoded.append(fields)
    return orjson.dumps(encoded).decode()


def counters(messages: Sequence[ChatMessage]) -> tuple[int, int]:
    """(assistant turns, tool calls) among `messages`."""
    turns = sum(1 for m in messages if m.role == "assistant")
    return turns, sum(len(m.tool_calls or ()) for m in messages)


def usage_params(usage: Optional[Usage]) -> tuple[Any, ...]:
    """`usage`'s counters in `USAGE_FIELDS` order (zeros for None)."""
    usage = usage or _NO_USAGE
    return tuple(getattr(usage, name) for name in USAGE_FIELDS)


# -- message-text references --------------------------------------------------------


class Texts(Protocol):
    """position -> text of a task's execution messages (what stored references point at)."""

    def __getitem__(self, position: int) -> str: ...


class LoadedTexts:
    """`Texts` of an execution history already loaded (positions are list indexes)."""

    def __init__(self, messages: list[ChatMessage]) -> None:
        self.messages = messages

    def __getitem__(self, position: int) -> str:
        if not (isinstance(position, int) and 0 <= position < len(self.messages)):
            raise KeyError(position)
        return self.messages[position].content


def text_at(task_id: str, texts: Texts, position: Any) -> str:
    """The referenced message text; `CorruptRecord` if the message is gone."""
    try:
        return texts[position]
    except (KeyError, TypeError):
        raise CorruptRecord(task_id, "message", f"a checkpoint or trace refers to execution message "
                                                f"{position!r}, which is not stored") from None


def with_texts(task_id: str, data: dict[str, Any], refs: dict[str, int], texts: Texts) -> dict[str, Any]:
    """An event's data with each referenced text put back, redacted like the rest of a trace."""
    if not refs:
        return data
    return {**data, **{key: redact_text(text_at(task_id, texts, position)) for key, position in refs.items()}}


def inlined_events(task_id: str, events: list[StoredEvent], texts: Texts) -> str:
    """Stored events as JSON again, each reference replaced by its (redacted) text."""
    return orjson.dumps([[ms, event_type, with_texts(task_id, data, refs, texts)]
                         for _sequence, ms, event_type, data, refs in events]).decode()


# -- reading -------------------------------------------------------------------------


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "value"
    return f"{where}: {err['msg']}"


def decode_spec(task_id: str, raw: Optional[str]) -> Optional[TaskSpec]:
    if raw is None:
        return None
    try:
        return TaskSpec.model_validate_json(raw)
    except ValidationError as exc:
        raise CorruptRecord(task_id, "spec", _first_error(exc)) from None


def decode_tool_calls(task_id: str, raw: str) -> list[ToolCall]:
    try:
        return [ToolCall.model_validate(call) for call in orjson.loads(raw)]
    except (orjson.JSONDecodeError, ValidationError, TypeError) as exc:
        raise CorruptRecord(task_id, "message.tool_calls", str(exc).splitlines()[0]) from None


def decode_items(task_id: str, step_index: int, raw: str, texts: Texts) -> list[CheckpointItem]:
    """A checkpoint's items; an output stored once, in the step's tool message, is read from `texts`."""
    try:
        items = orjson.loads(raw)
        for item in items:
            if "output_at" in item:
                item["output"] = text_at(task_id, texts, item.pop("output_at"))
        return [CheckpointItem.model_validate(item) for item in items]
    except (orjson.JSONDecodeError, ValidationError, TypeError) as exc:
        raise CorruptRecord(task_id, f"checkpoint[{step_index}].items", str(exc).splitlines()[0]) from None


def checkpoint_record(task_id: str, row: Any, texts: Texts) -> TaskCheckpointRecord:
    """A `checkpoint` row (its `checkpoint_columns`) as a record, item outputs read back from `texts`."""
    return TaskCheckpointRecord(step_index=row.step_index, checkpoint_note=row.checkpoint_note,
                                items=decode_items(task_id, row.step_index, row.items, texts),
                                created_at=to_datetime(row.created_at))


def checkpoint_columns(Checkpoint: Any) -> tuple[Any, ...]:
    """What loading a checkpoint reads: not its step trace, which can be long."""
    return (Checkpoint.task, Checkpoint.step_index, Checkpoint.checkpoint_note, Checkpoint.items,
            Checkpoint.created_at)


def summary_fields(row: Any) -> dict[str, Any]:
    """A `task` row as `TaskSummary` fields; `CorruptRecord` for a status no `TaskStatus` names."""
    lease = None
    if row.lease_token is not None:
        lease = LeaseInfo(owner=row.lease_owner or "", host=row.lease_host or "", pid=row.lease_pid or 0,
                          expires_at=to_datetime(row.lease_expires_at or 0))
    try:
        status = TaskStatus(row.status)
    except ValueError:
        raise CorruptRecord(row.task_id, "status", f"{row.status!r} is not a task status") from None
    return dict(
        task_id=row.task_id, thread_id=row.thread_id, channel=row.channel, provider=row.provider,
        model=row.model, status=status, checkpoint_count=row.checkpoint_count,
        message_count=row.execution_count, recovery_count=row.recovery_count,
        final_response=row.final_response, last_error=row.last_error,
        created_at=to_datetime(row.created_at), updated_at=to_datetime(row.updated_at),
        started_at=to_datetime(row.started_at), completed_at=to_datetime(row.completed_at), lease=lease,
        turn_count=row.turn_count, tool_call_count=row.tool_call_count,
        usage=Usage(**{name: getattr(row, name) for name in USAGE_FIELDS}),
    )


def stored_step_trace(task_id: str, first_sequence: int, raw: str) -> StoredBatch:
    """A checkpoint's `trace` cell, decoded; `CorruptRecord` if it cannot be read."""
    try:
        return decode_step_trace(first_sequence, raw)
    except ValueError as exc:
        raise CorruptRecord(task_id, f"checkpoint.trace[{first_sequence}]", str(exc)) from None


def stored_events(task_id: str, first_sequence: int, raw: Any) -> list[StoredEvent]:
    """The events of one stored batch, decoded; `CorruptRecord` if they cannot be read."""
    try:
        return list(decode_events(first_sequence, raw))
    except ValueError as exc:
        raise CorruptRecord(task_id, f"trace_batch[{first_sequence}].events", str(exc)) from None
