"""Threads: a chat's tasks as one story, and the rule that runs them one at a time, in arrival order.

A thread's tasks are ordered by their row id, which the store hands out at
`create` time: that is the order they arrived in (and, since a thread runs
one task at a time in that order, the order they start in). A rerun keeps
its task's id, so its turns stay in place.

**The story.** Each finished task contributes its own turns, once: its
prompt, then its final answer (tool-call tags stripped), or, for a task that
ended otherwise, what its steps did (its assistant text and tool results,
so an interrupted task's work stays in the thread) and a short note of how
it ended ("interrupted by task 'x' after step 3"), so user and
assistant strictly alternate without merging unrelated prompts. A task
steered (``if_busy="steer"``) also contributes each steering message it
took, in order, after its prompt, each after a short assistant note
(`STEERED_NOTE`), so the alternation holds and the message is in the story. A queued,
running or waiting task contributes nothing yet. The whole story is one indexed query
over the thread's task rows: no message rows are read, except for the rare
task that ended otherwise after taking steps (its partial work) and the task
stored by `save_snapshot` (no spec; its resumable history is its turns).

**One at a time.** The claim condition is `thread_rule.startable`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import orjson
from peewee import fn

from .context import StoreContext
from .errors import CorruptRecord
from .schemas import ChatMessage, TaskStatus, stored_message
from .statements import prepare
from .tables import EXECUTION, RESUMABLE
from .thread_rule import in_story_before, startable
from .turns import normalize_resumable_turns, strip_tool_call_tags

_RUNNING = TaskStatus.RUNNING.value
_QUEUED = TaskStatus.QUEUED.value
_WAITING = TaskStatus.WAITING.value
_COMPLETED = TaskStatus.COMPLETED.value
_TERMINAL_VALUES = tuple(s.value for s in TaskStatus if s.is_terminal)

#: How much of a task's `last_error` its "how it ended" note quotes.
ENDING_NOTE_CHARS = 200
#: The assistant turn before each steering message in a task's story (it was still working when the message came).
STEERED_NOTE = "(still working: the user added the next message)"
#: How much of each tool result an unfinished task's partial work quotes in the story.
PARTIAL_RESULT_CHARS = 200


@dataclass(frozen=True)
class ThreadStory:
    """A thread's turns so far, the tasks they came from, and the latest checkpoint note among them."""

    thread_id: str
    turns: list[ChatMessage] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)
    latest_checkpoint_note: Optional[str] = None


def ending_note(status: str, last_error: Optional[str]) -> str:
    """The assistant turn a task that did not complete leaves in its thread's story."""
    reason = (last_error or "").strip()[:ENDING_NOTE_CHARS]
    label = {"cancelled": "cancelled", "failed": "failed", "timed_out": "timed out"}.get(status, status)
    return f"(no answer: this task was {label}{': ' + reason if reason else ''})"


class ThreadReads:
    """Reads of a store's threads."""

    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx
        # Rendered once per store: a new task reads its thread's story as it starts, and rendering
        # this query cost several times what running it does on SQLite.
        self._story_of_thread = prepare(lambda slot: _story_query(ctx.tables.Task, slot("thread_id", str)))
        self._story_before = prepare(lambda slot: _story_query(ctx.tables.Task, slot("thread_id", str),
                                                               before_task_id=slot("before_task_id", str)))

    def story(self, thread_id: str, *, before_task_id: Optional[str] = None) -> ThreadStory:
        """The thread's story (see the module docstring); with `before_task_id`, only the tasks before that one."""
        ctx = self.ctx
        if before_task_id is None:
            query = self._story_of_thread.sql, self._story_of_thread.params(thread_id=thread_id)
        else:
            query = self._story_before.sql, self._story_before.params(thread_id=thread_id,
                                                                      before_task_id=before_task_id)
        turns: list[ChatMessage] = []
        task_ids: list[str] = []
        note: Optional[str] = None
        with ctx.dialect.read_snapshot():
            rows = ctx.db.execute_sql(*query).fetchall()
            for pk, task_id, status, spec, final_response, last_error, checkpoint_note, steps, steered in rows:
                if spec is None:
                    own = self._snapshot_turns(pk, task_id)
                else:
                    work = self._partial_work(pk) if steps and status != _COMPLETED else ""
                    own = _own_turns(task_id, status, spec, final_response, last_error, work, steered)
                if own:
                    turns.extend(own)
                    task_ids.append(task_id)
                    note = checkpoint_note or note
        return ThreadStory(thread_id=thread_id, turns=turns, task_ids=task_ids,
                           latest_checkpoint_note=note)

    def _partial_work(self, task_pk: int) -> str:
        """What a task that did not complete did in its steps: its assistant text and its tools' results.

        Only tasks that ended otherwise and took steps are read this way (an
        interrupted one, a failed one): rare, so the story stays one query.
        """
        Message = self.ctx.tables.Message
        rows = (Message.select(Message.role, Message.content, Message.name)
                .where((Message.task == task_pk) & (Message.history == EXECUTION) & Message.step_index.is_null(False))
                .order_by(Message.position).tuples())
        lines = []
        for role, content, name in rows:
            if role == "assistant":
                text = strip_tool_call_tags(content)
                if text:
                    lines.append(text)
            elif role == "tool":
                lines.append(f"[{name} result: {content[:PARTIAL_RESULT_CHARS]}]")
        return "\n".join(lines)

    def _snapshot_turns(self, task_pk: int, task_id: str) -> list[ChatMessage]:
        """The turns of a task stored by `save_snapshot` (no spec): its resumable history."""
        ctx = self.ctx
        rows = ctx.db.execute_sql(ctx.sql.select_history, (task_pk, RESUMABLE)).fetchall()
        try:
            messages = [stored_message(role, content, call_id, name, None) for role, content, call_id, name, _ in rows]
        except ValueError as exc:
            raise CorruptRecord(task_id, "message", str(exc)) from None
        kept = []
        for message in messages:
            if message.role == "assistant":
                cleaned = strip_tool_call_tags(message.content)
                if cleaned:
                    kept.append(ChatMessage.assistant(cleaned))
            elif message.role == "user":
                kept.append(message)
        turns = normalize_resumable_turns(kept)
        if turns and turns[-1].role == "user":  # keep the alternation for the task after it
            turns.append(ChatMessage.assistant("(no answer)"))
        return turns

    def busy(self, thread_id: str, *, excluding: Optional[str] = None) -> list[tuple[str, TaskStatus]]:
        """The thread's unfinished tasks, ``(task_id, status)`` in arrival order (running and waiting ones first)."""
        Task = self.ctx.tables.Task
        query = Task.select(Task.task_id, Task.status).where(
            (Task.thread_id == thread_id) & Task.status.in_((_QUEUED, _RUNNING, _WAITING)))
        if excluding is not None:
            query = query.where(Task.task_id != excluding)
        rows = [(task_id, TaskStatus(status)) for task_id, status in query.order_by(Task.id).tuples()]
        return sorted(rows, key=lambda row: row[1] is TaskStatus.QUEUED)

    def next_startable(self, task_id: str) -> Optional[str]:
        """The task of `task_id`'s thread that may start now (the earliest queued one, if nothing runs), or None."""
        Task = self.ctx.tables.Task
        thread = Task.select(Task.thread_id).where(Task.task_id == task_id)
        return (Task.select(Task.task_id)
                .where((Task.thread_id == thread) & (Task.status == _QUEUED) & startable(Task))
                .order_by(Task.id).limit(1).scalar())


def _story_query(Task: Any, thread_id: str, *, before_task_id: Optional[str] = None) -> Any:
    """The thread's finished tasks in arrival order, with what their turns are made of (`ThreadReads.story`)."""
    if before_task_id is None:
        where = (Task.thread_id == thread_id) & Task.status.in_(_TERMINAL_VALUES)
    else:
        asking = Task.select(Task.id).where(Task.task_id == before_task_id)
        where = in_story_before(Task, thread_id, fn.COALESCE(asking, 0))
    return (Task.select(Task.id, Task.task_id, Task.status, Task.spec, Task.final_response, Task.last_error,
                        Task.latest_checkpoint_note, Task.checkpoint_count, Task.steered)
            .where(where).order_by(Task.id))


def _own_turns(task_id: str, status: str, spec: str, final_response: Optional[str],
               last_error: Optional[str], partial_work: str = "", steered: Optional[str] = None) -> list[ChatMessage]:
    try:
        prompt = orjson.loads(spec)["prompt"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise CorruptRecord(task_id, "spec", "not a task spec with a prompt") from None
    if not isinstance(prompt, str):
        raise CorruptRecord(task_id, "spec", "its prompt is not text")
    if status == TaskStatus.COMPLETED.value:
        answer = strip_tool_call_tags(final_response or "") or "(no answer text)"
    else:  # what it did before it ended, then how it ended
        answer = f"{partial_work}\n\n{ending_note(status, last_error)}" if partial_work else ending_note(
            status, last_error)
    # Built without a second validation: a story of 1,000 tasks is read in a few milliseconds.
    turns = [stored_message("user", prompt, None, None, None)]
    for text in _steered_texts(task_id, steered):  # each message that steered it, in order, answered by a note
        turns += [stored_message("assistant", STEERED_NOTE, None, None, None),
                  stored_message("user", text, None, None, None)]
    turns.append(stored_message("assistant", answer, None, None, None))
    return turns


def _steered_texts(task_id: str, steered: Optional[str]) -> list[str]:
    if not steered:
        return []
    try:
        texts = orjson.loads(steered)
    except orjson.JSONDecodeError:
        raise CorruptRecord(task_id, "steered", "not a JSON list of texts") from None
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise CorruptRecord(task_id, "steered", "not a JSON list of texts")
    return texts
