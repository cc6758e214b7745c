"""`Forks`: a new task whose history is another task's through step N, to run from step N+1.

Like DBOS's ``fork_workflow`` or LangGraph's time travel: the original is
only read. In one transaction, the new task's row is inserted `queued`
with the original's spec (its prompt replaced, if a new one is given), and
the original's execution messages through step N and checkpoints 1..N are
copied by ``INSERT ... SELECT`` (positions kept, so the references a
checkpoint's items make to message text still hold). The copied
checkpoints carry no trace: the fork's trace starts with its own run. A
new prompt is appended as a user message of step N, after the step's tool
results. A claim then sees a task with checkpoints, and the step loop
continues at step N+1.
"""

from __future__ import annotations

from typing import Optional

from peewee import fn

from .codec import decode_spec, message_rows
from .context import StoreContext
from .errors import StepNotForkable
from .schemas import ChatMessage, TaskSpec, TaskStatus
from .tables import EXECUTION


class Forks:
    """Forking tasks."""

    def __init__(self, ctx: StoreContext) -> None:
        self.ctx = ctx

    def fork(self, task_id: str, *, at_step: int, new_task_id: str, thread_id: str,
             prompt: Optional[str]) -> bool:
        """Create `new_task_id` from `task_id` through step `at_step`; False if `new_task_id` exists.

        `StepNotForkable` if the original has no checkpoint `at_step`.
        """
        ctx = self.ctx
        Task, Message, Checkpoint = ctx.tables.Task, ctx.tables.Message, ctx.tables.Checkpoint
        now = ctx.clock()
        with ctx.db.atomic():
            ctx.dialect.lock_thread(thread_id)  # a thread's row ids follow its admissions' order
            row = ctx.task_row(task_id)
            last_step = Checkpoint.select(fn.MAX(Checkpoint.step_index)).where(Checkpoint.task == row.id).scalar() or 0
            if not 1 <= at_step <= last_step:
                raise StepNotForkable(task_id, at_step, last_step)
            spec = decode_spec(task_id, row.spec) or TaskSpec(prompt="(no prompt stored)")
            if prompt is not None:
                spec = spec.model_copy(update={"prompt": prompt})
            note = Checkpoint.select(Checkpoint.checkpoint_note).where(
                (Checkpoint.task == row.id) & (Checkpoint.step_index == at_step)).scalar()
            through = Message.select(fn.MAX(Message.position)).where(
                (Message.task == row.id) & (Message.history == EXECUTION) & (Message.step_index <= at_step)).scalar()
            inserted = Task.insert(
                task_id=new_task_id, thread_id=thread_id, channel=row.channel, provider=row.provider,
                model=row.model, status=TaskStatus.QUEUED.value, spec=spec.model_dump_json(),
                latest_checkpoint_note=note, checkpoint_count=at_step, created_at=now, updated_at=now,
                delivery_due_at=now,
            ).on_conflict_ignore().as_rowcount().execute()
            if not inserted:
                return False
            new_pk = Task.select(Task.id).where(Task.task_id == new_task_id).scalar()
            Message.insert_from(
                Message.select(new_pk, Message.history, Message.position, Message.step_index, Message.role,
                               Message.content, Message.tool_call_id, Message.name, Message.tool_calls,
                               Message.tool_succeeded)
                .where((Message.task == row.id) & (Message.history == EXECUTION) & (Message.position <= through)),
                [Message.task, Message.history, Message.position, Message.step_index, Message.role,
                 Message.content, Message.tool_call_id, Message.name, Message.tool_calls, Message.tool_succeeded],
            ).execute()
            Checkpoint.insert_from(
                Checkpoint.select(new_pk, Checkpoint.step_index, Checkpoint.checkpoint_note, Checkpoint.items,
                                  Checkpoint.created_at)
                .where((Checkpoint.task == row.id) & (Checkpoint.step_index <= at_step)),
                [Checkpoint.task, Checkpoint.step_index, Checkpoint.checkpoint_note, Checkpoint.items,
                 Checkpoint.created_at],
            ).execute()
            count = (through or -1) + 1
            if prompt is not None:
                ctx.insert_messages(message_rows(new_pk, EXECUTION, count, [ChatMessage.user(prompt)], at_step))
                count += 1
            Task.update(execution_count=count).where(Task.id == new_pk).execute()
        return True
