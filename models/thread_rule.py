"""One run at a time per thread, in arrival order: the condition a claim of a queued task adds.

A thread's tasks are ordered by their row id, handed out at `create` time:
the order they arrived in. `startable` is the condition a claim adds for a queued
task: no other task of its thread is running (leased or resumable) or waiting for a reply, and no
task that arrived before it is still queued. Why that is atomic:

- SQLite: the claim's ``UPDATE`` runs inside ``BEGIN IMMEDIATE``, so the
  ``NOT EXISTS`` is evaluated with no other writer.
- PostgreSQL (READ COMMITTED): the subquery sees the committed rows at the
  statement's start. Two queued tasks A (earlier) and B of one thread are
  both committed as `queued` before either is sent, so B's claim always sees
  A, queued or running, and refuses; only the earliest queued task can be
  claimed, and only while nothing runs. A task created after B's snapshot
  has a higher id (or, if its id is lower, sees B running when it claims).
"""

from __future__ import annotations

from typing import Any

from peewee import SQL, fn

from .schemas import TaskStatus

_RUNNING = TaskStatus.RUNNING.value
_QUEUED = TaskStatus.QUEUED.value
_WAITING = TaskStatus.WAITING.value
_FINISHED = tuple(status.value for status in TaskStatus if status.is_terminal)


def startable(Task: Any) -> Any:
    """The claim condition of the thread rule, as a peewee expression on `Task` (see the module docstring)."""
    Other = Task.alias("thread_peer")
    ahead = Other.select(SQL("1")).where(
        (Other.thread_id == Task.thread_id) & (Other.id != Task.id)
        & (Other.status.in_((_RUNNING, _WAITING)) | ((Other.status == _QUEUED) & (Other.id < Task.id))))
    return (Task.status == _RUNNING) | ~fn.EXISTS(ahead)


def in_story_before(Task: Any, thread_id: Any, before_id: Any) -> Any:
    """The rows a thread's story before a task is made of: its finished tasks that arrived before row `before_id`.

    `threads.ThreadReads.story` reads them; a claim's read-back asks whether
    any exists (`Statements.select_claimed_row`), so a new task with none
    skips reading its story.
    """
    return (Task.thread_id == thread_id) & Task.status.in_(_FINISHED) & (Task.id < before_id)
