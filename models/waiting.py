"""`Waiting`: a task that waits for a reply or an approval, holding no lease and no worker; and steering.

A tool call that needs the user (`ask_user`, a tool raising `WaitForReply`,
a ``needs_approval`` tool not yet approved) leaves its step open in the
journal (`models.journal`) with that call pending. `wait` then stores
status `waiting`, what it waits for (`task.waiting_for`, JSON: `Wait`) and
when it stops waiting (`task.reply_due_at`), and clears the lease: nothing
runs it and recovery does not resend it (only `queued`/`running` tasks are
claimable), so it survives any number of worker restarts.

`answer` (a reply, or a denial) stores the text as that pending call's
result in its reserved journal position and makes the task `running`
without a lease, due now: resumable, exactly like a task a shutdown
released; the caller sends it, and recovery does if the send is lost. The
resumed run reopens the step (`OpenStep`) with the result recorded and runs
only the calls still pending. `approve` records the decision in
`waiting_for` (kept after the wait): the resumed run then runs the tool.

`expire` ends the waiting tasks whose `reply_due_at` has passed
(`timed_out`, "no reply within N s"); the recovery scan calls it.

Steering (``if_busy="steer"``): `steer` appends a text to the running
task's `task.steering`; the loop takes them (`take_steering`) at its next
step boundary, in the same transaction appending them to its histories as
user messages, so a crash either keeps them pending or has them stored.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from typing import Optional

import orjson

from .codec import decode_spec, message_rows
from .context import StoreContext
from .errors import NotWaiting
from .journal import close_open_step, load_open_step, tool_result
from .leases import require_lease
from .schemas import ChatMessage, TaskSpec, TaskStatus
from .tables import EXECUTION, NO_LEASE, RESUMABLE
from .task_ends import count_end

_WAITING = TaskStatus.WAITING.value
_RUNNING = TaskStatus.RUNNING.value


@dataclass(frozen=True)
class Wait:
    """What a waiting task waits for: a ``reply`` to `question`, or an ``approval`` of its call to `tool`."""

    kind: str  # "reply" | "approval"
    question: str
    step: int
    call: int
    tool: str
    since: float
    #: None while waiting; then "replied", "approved" or "denied".
    decision: Optional[str] = None
    reply_timeout_s: Optional[float] = None

    def to_json(self) -> str:
        return orjson.dumps(asdict(self)).decode()

    @classmethod
    def from_json(cls, raw: Optional[str]) -> Optional[Wait]:
        if not raw:
            return None
        try:
            return cls(**orjson.loads(raw))
        except (orjson.JSONDecodeError, TypeError):
            return None


def denial(tool: str, reason: Optional[str]) -> str:
    """The tool result of a denied call: what the model is told instead of the tool's output."""
    return f"[denied: the user did not approve this call to {tool}{': ' + reason if reason else ''}]"


def queue_late_steering(ctx: StoreContext, row: object, now: float) -> list[str]:
    """Steering messages a task never took (they came after its last step boundary): each a new queued task.

    Called in the transaction that ends the task, on its locked row, so a
    steer is either taken, or stored here, never lost: each text becomes a
    task of the thread with the ended task's provider, model and spec (its
    prompt replaced), queued after it. Returns their ids (none, mostly).
    """
    if not row.steering:
        return []
    Task = ctx.tables.Task
    spec = decode_spec(row.task_id, row.spec) or TaskSpec(prompt="(no prompt stored)")
    ids = []
    for text in orjson.loads(row.steering):
        task_id = f"{row.task_id}-steer-{uuid.uuid4().hex[:8]}"
        Task.insert(task_id=task_id, thread_id=row.thread_id, channel=row.channel, provider=row.provider,
                    model=row.model, status=TaskStatus.QUEUED.value,
                    spec=spec.model_copy(update={"prompt": text}).model_dump_json(),
                    created_at=now, updated_at=now, delivery_due_at=now).execute()
        ids.append(task_id)
    Task.update(steering=None).where(Task.id == row.id).execute()
    return ids


class Waiting:
    """Waits for replies and approvals, their answers, their expiry; steering messages."""

    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx

    def wait(self, task_id: str, wait: Wait, *, lease_token: Optional[str]) -> None:
        """Fenced: the running task now waits (status `waiting`, no lease, nothing due)."""
        ctx = self.ctx
        Task = ctx.tables.Task
        now = ctx.clock()
        due = now + wait.reply_timeout_s if wait.reply_timeout_s is not None else None
        with ctx.db.atomic():
            row = ctx.task_row(task_id, for_update=True)
            require_lease(task_id, row.lease_token, lease_token)
            Task.update(status=_WAITING, waiting_for=wait.to_json(), reply_due_at=due, delivery_due_at=None,
                        delivery_message_id=None, updated_at=now, **NO_LEASE).where(Task.id == row.id).execute()

    def waiting_task(self, thread_id: str) -> Optional[str]:
        """The thread's task waiting for a reply or an approval, or None."""
        Task = self.ctx.tables.Task
        return (Task.select(Task.task_id).where((Task.thread_id == thread_id) & (Task.status == _WAITING))
                .order_by(Task.id).limit(1).scalar())

    def wait_of(self, task_id: str) -> Optional[Wait]:
        """What the task waits (or last waited) for, or None."""
        Task = self.ctx.tables.Task
        raw = Task.select(Task.waiting_for).where(Task.task_id == task_id).scalar()
        return Wait.from_json(raw)

    def answer(self, task_id: str, text: str, *, decision: str, kinds: tuple[str, ...]) -> Wait:
        """Store `text` as the pending call's result and make the task resumable (see the module docstring).

        `NotWaiting` unless the task waits for one of `kinds`.
        """
        ctx = self.ctx
        now = ctx.clock()
        with ctx.db.atomic():
            row = ctx.task_row(task_id, for_update=True)
            wait = self._require_waiting(task_id, row, kinds)
            step = load_open_step(ctx, row.id, task_id)
            if step is None or step.step_index != wait.step or step.results[wait.call] is not None:
                raise NotWaiting(f"task {task_id!r}", f"its step {wait.step} has no pending call {wait.call + 1}")
            ctx.insert_messages(message_rows(row.id, EXECUTION, step.result_position(wait.call),
                                             [tool_result(step.calls[wait.call], text)], step.step_index))
            decided = Wait(**{**asdict(wait), "decision": decision})
            self._resume(row.id, decided, now)
        return decided

    def approve(self, task_id: str) -> Wait:
        """Record the approval and make the task resumable: its next run runs the tool."""
        ctx = self.ctx
        with ctx.db.atomic():
            row = ctx.task_row(task_id, for_update=True)
            wait = self._require_waiting(task_id, row, ("approval",))
            decided = Wait(**{**asdict(wait), "decision": "approved"})
            self._resume(row.id, decided, ctx.clock())
        return decided

    def expire(self, *, limit: int = 100) -> list[str]:
        """End the waiting tasks whose `reply_due_at` has passed (`timed_out`); their ids."""
        ctx = self.ctx
        Task = ctx.tables.Task
        now = ctx.clock()
        due = [row[0] for row in Task.select(Task.task_id).where(
            (Task.status == _WAITING) & (Task.reply_due_at <= now)).limit(limit).tuples()]
        ended = []
        for task_id in due:
            with ctx.db.atomic():
                row = ctx.task_row(task_id, for_update=True)
                if row.status != _WAITING or row.reply_due_at is None or row.reply_due_at > now:
                    continue  # answered or cancelled meanwhile
                wait = Wait.from_json(row.waiting_for)
                timeout = wait.reply_timeout_s if wait is not None else None
                error = f"no reply within {timeout:g} s" if timeout is not None else "no reply in time"
                close_open_step(ctx, row.id, task_id, error)
                Task.update(status=TaskStatus.TIMED_OUT.value, last_error=error, completed_at=now, updated_at=now,
                            reply_due_at=None).where(Task.id == row.id).execute()
                count_end(ctx, row, TaskStatus.TIMED_OUT.value)
            ended.append(task_id)
        return ended

    # -- steering ----------------------------------------------------------------------------------

    def steer(self, task_id: str, text: str) -> bool:
        """Add `text` to the running task's pending steering messages (inside the caller's transaction).

        False (nothing stored) if the task is no longer running: it finished
        since the caller looked, and the message must become a task of its own.
        """
        ctx = self.ctx
        Task = ctx.tables.Task
        row = ctx.task_row(task_id, for_update=True)
        if row.status != _RUNNING:
            return False
        pending = orjson.loads(row.steering) if row.steering else []
        pending.append(text)
        Task.update(steering=orjson.dumps(pending).decode(), updated_at=ctx.clock()).where(
            Task.id == row.id).execute()
        return True

    def take_steering(self, task_id: str, *, lease_token: Optional[str]) -> list[ChatMessage]:
        """Fenced: the pending steering messages as user messages, appended to both histories and cleared."""
        ctx = self.ctx
        Task = ctx.tables.Task
        with ctx.db.atomic():
            row = ctx.task_row(task_id, for_update=True)
            require_lease(task_id, row.lease_token, lease_token)
            if not row.steering:
                return []
            texts = orjson.loads(row.steering)
            messages = [ChatMessage.user(text) for text in texts]
            ctx.insert_messages(message_rows(row.id, EXECUTION, row.execution_count, messages, None)
                                + message_rows(row.id, RESUMABLE, row.resumable_count, messages, None))
            steered = (orjson.loads(row.steered) if row.steered else []) + texts
            Task.update(steering=None, steered=orjson.dumps(steered).decode(),
                        execution_count=Task.execution_count + len(messages),
                        resumable_count=Task.resumable_count + len(messages)).where(Task.id == row.id).execute()
        return messages

    # -- helpers -----------------------------------------------------------------------------------

    def _require_waiting(self, task_id: str, row: object, kinds: tuple[str, ...]) -> Wait:
        status = row.status
        wait = Wait.from_json(row.waiting_for)
        if status != _WAITING or wait is None or wait.decision is not None:
            raise NotWaiting(f"task {task_id!r}", f"it is {status}, not waiting for {' or '.join(kinds)}")
        if wait.kind not in kinds:
            raise NotWaiting(f"task {task_id!r}", f"it waits for {'a reply' if wait.kind == 'reply' else 'an approval'}"
                             f", not for {' or '.join(kinds)}")
        return wait

    def _resume(self, task_pk: int, wait: Wait, now: float) -> None:
        """Waiting -> running without a lease, due now: resumable (the caller sends it; recovery if that is lost)."""
        Task = self.ctx.tables.Task
        Task.update(status=_RUNNING, waiting_for=wait.to_json(), reply_due_at=None, delivery_due_at=now,
                    delivery_message_id=None, updated_at=now).where(Task.id == task_pk).execute()
