"""Tool-call tags in assistant text, and turns normalized for resumption.

Some models write tool calls into their text (``<tool_call>{...}</tool_call>``
and six other spellings). Those tags are parsed into tool calls while a task
runs, and stripped when a thread's turns are replayed to a new task, which
wants only what the user and assistant said, strictly alternating.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterable, Optional, Protocol

from pydantic import ValidationError

from .schemas import ChatMessage, InvalidArguments, ToolCall

if TYPE_CHECKING:
    from .schemas import TaskRecord


class HasThreadStory(Protocol):
    """What `load_resumable_state` needs of a store (`TaskStore.thread_story`); no import of the store here."""

    def thread_story(self, thread_id: str, *, before_task_id: Optional[str] = None) -> Any: ...

#: The tags models wrap tool calls in written as text: opening tag -> closing tag.
TOOL_CALL_TAGS: dict[str, str] = {
    "<function_calls>": "</function_calls>",
    "<function_call>": "</function_call>",
    "<tool_call>": "</tool_call>",
    "<toolcall>": "</toolcall>",
    "<tool-call>": "</tool-call>",
    "<tool>": "</tool>",
    "<invoke>": "</invoke>",
}

_DECODER = json.JSONDecoder()


def _first_open_tag(text: str, start: int) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for tag in TOOL_CALL_TAGS:
        idx = text.find(tag, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, tag)
    return best


#: How many ``{``/``[`` positions to try as a JSON start: bounds the work on
#: adversarial text (thousands of brackets) to linear; real payloads start early.
MAX_JSON_CANDIDATES = 64


def _json_value_end(text: str, start: int) -> tuple[int, object] | None:
    """End offset (and value) of the first JSON object/array at or after `start`."""
    tried = 0
    for idx in range(start, len(text)):
        if text[idx] not in "{[":
            continue
        tried += 1
        if tried > MAX_JSON_CANDIDATES:
            return None
        try:
            value, end = _DECODER.raw_decode(text, idx)
        except (ValueError, RecursionError):
            continue
        return end, value
    return None


def _skip_leading_close_tags(text: str, start: int) -> int:
    """Offset after any ``</...>`` tags (and blanks) at `start`; len(text) if one never closes."""
    pos = start
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if not text.startswith("</", pos):
            return pos
        close = text.find(">", pos)
        if close == -1:
            return len(text)
        pos = close + 1


def _scan(text: str) -> tuple[list[str], list[object]]:
    """Split `text` into kept segments and the JSON payloads of its tool-call tags."""
    kept: list[str] = []
    payloads: list[object] = []
    pos = 0
    while (found := _first_open_tag(text, pos)) is not None:
        start, open_tag = found
        kept.append(text[pos:start])
        body_start = start + len(open_tag)
        close_tag = TOOL_CALL_TAGS[open_tag]
        close_idx = text.find(close_tag, body_start)
        if close_idx != -1:
            parsed = _json_value_end(text[body_start:close_idx], 0)
            if parsed is not None:
                payloads.append(parsed[1])
            pos = close_idx + len(close_tag)
            continue
        parsed = _json_value_end(text, body_start)
        if parsed is not None:
            payloads.append(parsed[1])
            pos = _skip_leading_close_tags(text, parsed[0])
            continue
        # An unclosed tag with no JSON after it is ordinary text.
        kept.append(text[start:])
        pos = len(text)
        break
    kept.append(text[pos:])
    return kept, payloads


def _strip_once(text: str) -> str:
    return _tidy("".join(_scan(text)[0]))


def _tidy(text: str) -> str:
    """Runs of blank lines collapsed to one, the ends trimmed."""
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip()


def strip_tool_call_tags(text: str) -> str:
    """Remove tool-call tags (and their JSON payloads) from assistant text.

    Handles closed tags, unclosed tags followed by a JSON value (and stray
    closing tags after it); an unclosed tag without JSON is kept as text.
    Runs of blank lines collapse to one, and the result is trimmed. Never
    raises, and is idempotent: removing a tag can splice a new one together,
    so it repeats until nothing changes (each pass only shortens the text).
    """
    if "<" not in text:  # no tag at all (most answers): a thread's story strips 1,000 of them per read
        return _tidy(text)
    current = text
    while True:
        stripped = _strip_once(current)
        if stripped == current:
            return stripped
        current = stripped


def parse_tool_call_tags(text: str) -> list[ToolCall]:
    """The tool calls written as tags in `text`, in order.

    A payload is ``{"name": ..., "arguments": {...}}`` (``arguments`` may be a
    JSON string, as OpenAI-style models write it); anything else is skipped,
    because text that merely looks like a tag must not become an action.
    """
    calls: list[ToolCall] = []
    for payload in _scan(text)[1]:
        for entry in payload if isinstance(payload, list) else [payload]:
            call = _tool_call_from_payload(entry, index=len(calls))
            if call is not None:
                calls.append(call)
    return calls


def _tool_call_from_payload(entry: object, *, index: int) -> Optional[ToolCall]:
    if not isinstance(entry, dict):
        return None
    name = entry.get("name")
    arguments = entry.get("arguments", entry.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    call_id, name = _storable_text(str(entry.get("id") or f"call_{index}"))[:200], _storable_text(name)[:200]
    try:
        return ToolCall(id=call_id, name=name, arguments=arguments)
    except ValidationError as exc:
        # NaN, Infinity, 1e400, integers past 64 bits, lone surrogates: JSON the store cannot hold. As for a
        # native call, the model gets a failed result naming the problem, never a failed task.
        problem = f"the arguments are not plain JSON values ({exc.errors()[0]['msg']})"
        raw = json.dumps(arguments, ensure_ascii=True, default=str)[:MAX_QUOTED_RAW_CHARS]
        return ToolCall(id=call_id, name=name, invalid_arguments=InvalidArguments(problem=problem, raw=raw))


#: How much of a refused payload's arguments the history replays, in characters.
MAX_QUOTED_RAW_CHARS = 500


def _storable_text(text: str) -> str:
    """`text` with any lone surrogate replaced, so a name or id from a payload can be stored."""
    return text.encode("utf-8", "replace").decode("utf-8")


def normalize_resumable_turns(turns: Iterable[ChatMessage]) -> list[ChatMessage]:
    """Strictly alternating user/assistant turns, starting with a user turn.

    A turn out of order is merged into the previous one with a blank line;
    turns before the first user turn and other roles are dropped.
    """
    normalized: list[ChatMessage] = []
    expecting_user = True
    for turn in turns:
        if turn.role not in ("user", "assistant"):
            continue
        if (turn.role == "user") == expecting_user:
            normalized.append(ChatMessage(role=turn.role, content=turn.content))
            expecting_user = not expecting_user
        elif normalized and turn.content:
            last = normalized[-1]
            joined = f"{last.content}\n\n{turn.content}" if last.content else turn.content
            normalized[-1] = ChatMessage(role=last.role, content=joined)
    return normalized


def resumable_turns(history: Iterable[ChatMessage]) -> list[ChatMessage]:
    """User and assistant turns of `history`, tags stripped, normalized."""
    kept: list[ChatMessage] = []
    for message in history:
        if message.role == "user":
            kept.append(message)
        elif message.role == "assistant":
            cleaned = strip_tool_call_tags(message.content)
            if cleaned:
                kept.append(ChatMessage.assistant(cleaned))
    return normalize_resumable_turns(kept)


def resumable_turns_from_task_record(record: TaskRecord) -> list[ChatMessage]:
    """The normalized turns a new task on the same thread continues from."""
    return resumable_turns(record.resumable_history)


def load_resumable_state(
    store: HasThreadStory, thread_id: str, *, before_task_id: Optional[str] = None
) -> Optional[tuple[list[ChatMessage], Optional[str]]]:
    """``(turns, latest_checkpoint_note)`` of the thread's story, or None if it has no turns yet.

    The story is every finished task's own turns in arrival order (see
    `threads.py`); `before_task_id` keeps only the tasks that arrived before
    that one, which is what a new task on the thread starts from.
    """
    story = store.thread_story(thread_id, before_task_id=before_task_id)
    if not story.turns:
        return None
    return story.turns, story.latest_checkpoint_note
