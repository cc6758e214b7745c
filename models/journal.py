"""The step journal: a model's answer stored before any of its tool calls runs, and the calls still lacking a result.

A step is journaled in parts. Its answer (the assistant message with its
tool calls, its usage) is committed as soon as the model has given it,
with one history position reserved per tool call; each tool result is
committed into its reserved position when the tool returns; the
checkpoint row then marks the step complete. A step that has an answer
stored but no checkpoint is an *open step* (`OpenStep`): resuming it
replays the answer and runs only `OpenStep.pending_calls`, with the same
idempotency keys, and never asks the model again.

No history may hold a tool call without its result (providers refuse one,
Anthropic with a 400): a task that ends while a step is open gets a
synthetic result for every pending call (`close_open_step`, called by
every terminal write), and provider requests are built from
`with_orphans_answered` histories.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterable, Optional

from .codec import decode_tool_calls, message_rows
from .schemas import ChatMessage, ToolCall, stored_message
from .tables import EXECUTION

if TYPE_CHECKING:
    from .context import StoreContext


@dataclass(frozen=True)
class OpenStep:
    """A journaled step without its checkpoint: the answer, and a result (or None) per tool call, in answer order.

    `answer_position` is the answer's execution-history position; the
    result of call ``i`` is stored at ``answer_position + 1 + i``
    (`result_position`), whatever order the calls finish in.
    `succeeded[i]` is whether that stored result says its call succeeded
    (None: no result yet, or one stored before schema 8 without the flag);
    empty means unknown for every call.
    """

    task_id: str
    step_index: int
    answer: ChatMessage
    answer_position: int
    results: tuple[Optional[ChatMessage], ...]
    succeeded: tuple[Optional[bool], ...] = ()

    @property
    def calls(self) -> list[ToolCall]:
        return list(self.answer.tool_calls or ())

    @property
    def pending_calls(self) -> list[tuple[int, ToolCall]]:
        """``(call_index, call)`` of every call that has no stored result yet, in answer order."""
        return [(index, call) for index, (call, result) in enumerate(zip(self.calls, self.results, strict=True))
                if result is None]

    @property
    def is_complete(self) -> bool:
        return all(result is not None for result in self.results)

    @property
    def stored_messages(self) -> list[ChatMessage]:
        """The answer and the results stored so far, in position order (what a loaded history ends with)."""
        return [self.answer, *(result for result in self.results if result is not None)]

    @property
    def messages(self) -> list[ChatMessage]:
        """The answer and every result; only for a complete step."""
        if not self.is_complete:
            raise ValueError(f"step {self.step_index} of task {self.task_id!r} still has pending tool calls")
        return [self.answer, *(result for result in self.results if result is not None)]

    def result_position(self, call_index: int) -> int:
        return self.answer_position + 1 + call_index

    def result_succeeded(self, call_index: int) -> Optional[bool]:
        """Whether the stored result of call `call_index` says it succeeded; None if no flag was stored."""
        return self.succeeded[call_index] if call_index < len(self.succeeded) else None

    def with_result(self, call_index: int, message: ChatMessage, *, succeeded: Optional[bool] = None) -> OpenStep:
        results = list(self.results)
        results[call_index] = message
        flags = list(self.succeeded) + [None] * (len(results) - len(self.succeeded))
        flags[call_index] = succeeded
        return replace(self, results=tuple(results), succeeded=tuple(flags))


def tool_result(call: ToolCall, output: str) -> ChatMessage:
    """The tool message answering `call`."""
    return ChatMessage(role="tool", content=output, tool_call_id=call.id or None, name=call.name)


def orphan_result(call: ToolCall, reason: str) -> ChatMessage:
    """The synthetic result of a call whose real result can never come, saying why."""
    return tool_result(call, f"[no result: this tool call did not complete: {reason}]")


def with_orphans_answered(history: Iterable[ChatMessage], *,
                          reason: str = "its result was never recorded") -> list[ChatMessage]:
    """`history` with a synthetic result after every tool call that has none (matched by call id, else by name).

    What a provider request is built from: a history stored by an older
    release, or by `save_snapshot`, may hold an orphan; this one never does.
    """
    messages = list(history)
    repaired: list[ChatMessage] = []
    index = 0
    while index < len(messages):
        message = messages[index]
        repaired.append(message)
        index += 1
        if message.role != "assistant" or not message.tool_calls:
            continue
        answered: set[str] = set()
        while index < len(messages) and messages[index].role == "tool":
            answered.add(messages[index].tool_call_id or messages[index].name or "")
            repaired.append(messages[index])
            index += 1
        repaired.extend(orphan_result(call, reason) for call in message.tool_calls
                        if (call.id or call.name) not in answered)
    return repaired


# -- reading and closing an open step (inside the caller's transaction) ------------------------------


def load_open_step(ctx: StoreContext, task_pk: int, task_id: str) -> Optional[OpenStep]:
    """The task's open step, or None: the messages stored after its highest checkpoint, if they start with an answer."""
    Message, Checkpoint = ctx.tables.Message, ctx.tables.Checkpoint
    last_step = Checkpoint.select(Checkpoint.step_index).where(Checkpoint.task == task_pk).order_by(
        Checkpoint.step_index.desc()).limit(1).scalar() or 0
    rows = list(
        Message.select(Message.position, Message.step_index, Message.role, Message.content, Message.tool_call_id,
                       Message.name, Message.tool_calls, Message.tool_succeeded)
        .where((Message.task == task_pk) & (Message.history == EXECUTION) & (Message.step_index > last_step))
        .order_by(Message.position).tuples()
    )
    if not rows or rows[0][2] != "assistant" or rows[0][6] is None:
        return None
    position, step_index, _role, content, _call_id, _name, raw_calls, _flag = rows[0]
    calls = decode_tool_calls(task_id, raw_calls)
    if not calls:
        return None
    answer = stored_message("assistant", content, None, None, calls)
    results: list[Optional[ChatMessage]] = [None] * len(calls)
    succeeded: list[Optional[bool]] = [None] * len(calls)
    for result_position, result_step, role, text, call_id, name, _calls, flag in rows[1:]:
        call_index = result_position - position - 1
        if result_step == step_index and role == "tool" and 0 <= call_index < len(calls):
            results[call_index] = stored_message(role, text, call_id, name, None)
            succeeded[call_index] = None if flag is None else bool(flag)  # SQLite gives 0/1
    return OpenStep(task_id=task_id, step_index=step_index, answer=answer, answer_position=position,
                    results=tuple(results), succeeded=tuple(succeeded))


def close_open_step(ctx: StoreContext, task_pk: int, task_id: str, reason: str) -> Optional[OpenStep]:
    """Store a synthetic result (saying `reason`) for every pending call of the task's open step; returns it closed.

    Called by every write that ends a task, so no finished task's history
    holds a tool call without a result. A no-op (None) without an open step.
    """
    step = load_open_step(ctx, task_pk, task_id)
    if step is None or step.is_complete:
        return step
    for call_index, call in step.pending_calls:
        message = orphan_result(call, reason)
        ctx.insert_messages(message_rows(task_pk, EXECUTION, step.result_position(call_index), [message],
                                         step.step_index, tool_succeeded=False))
        step = step.with_result(call_index, message, succeeded=False)
    return step
