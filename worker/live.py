"""Live output: a task's streamed chunks, tool calls and results and its end, for followers in any process.

Design (issue 15, point 5). The store stays the durable record: a step's
events are written with its checkpoint, one commit per step, as before.
Live events go to **Redis Streams** beside it, one ``XADD`` per event into
the task's stream and its thread's stream (one pipelined round trip, no
database commit on the hot path). A stream entry's id is the follower's
cursor: ``XREAD`` after a cursor returns exactly the entries after it, so a
follower that reconnects (after its own restart, or a worker's SIGKILL: the
entries live in Redis, not in the worker) continues with no duplicate and
no gap. A task's ``done`` is published only once its final status is
committed (`LivePublisher`). A resumed run publishes ``resumed`` (with the step it restarts
from) before it streams that step again, so a bot knows to replace the
partial answer of the step that was in flight.

Streams are capped (``LONGHAUL_FOLLOW_MAX_EVENTS``, trimmed approximately)
and expire ``LONGHAUL_FOLLOW_RETENTION_S`` after their last event. A
task whose stream is gone (expired, Redis restarted empty, or run without
Redis) is followed from its stored trace, step by step, with cursors
``0-N`` that sort before every live one.

Publishing never fails a task: if Redis cannot take an event, live output
pauses for `PAUSE_AFTER_FAILURE_S` (one warning) and the trace still has
the events.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator, Optional

import orjson

from longhaul.models.redact import redact_text

logger = logging.getLogger(__name__)

#: After Redis refused an event, live output of this process pauses this long.
PAUSE_AFTER_FAILURE_S = 5.0
#: Socket timeout of the live-output client: a slow Redis must not stall a model's stream.
SOCKET_TIMEOUT_S = 1.0

#: One followed event: its cursor and its fields (``type``, ``task_id``, and the type's own).
FollowedEvent = tuple[str, dict[str, Any]]


def task_key(task_id: str) -> str:
    return f"longhaul:live:task:{task_id}"


def thread_key(thread_id: str) -> str:
    return f"longhaul:live:thread:{thread_id}"


def live_event(event_type: str, data: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The follower's view of a trace event, or None for events followers do not get (usage, ...)."""
    if event_type == "content":
        return {"type": "chunk", "text": redact_text(str(data.get("text", "")))}
    if event_type == "reasoning":
        return {"type": "reasoning", "text": redact_text(str(data.get("text", "")))}
    if event_type == "tool_call_started":
        return {"type": "tool_call", "step": data.get("step"), "tool": data.get("tool"),
                "call_id": data.get("call_id"), "arguments": data.get("arguments")}
    if event_type in ("tool_call_completed", "tool_call_failed"):
        return {"type": "tool_result", "step": data.get("step"), "tool": data.get("tool"),
                "call_id": data.get("call_id"), "success": event_type == "tool_call_completed",
                "output": redact_text(str(data.get("output", "")))}
    if event_type == "checkpoint":
        return {"type": "step", "step": data.get("step"), "note": data.get("note")}
    if event_type == "session_started":
        return {"type": "started"}
    if event_type == "resumed":
        return {"type": "resumed", "from_step": data.get("from_step")}
    if event_type == "waiting":
        return {"type": "waiting", "kind": data.get("kind"), "question": redact_text(str(data.get("question", ""))),
                "step": data.get("step"), "tool": data.get("tool")}
    if event_type == "done":
        return {"type": "done", "status": data.get("status"), "answer": redact_text(data.get("final_response") or ""),
                "error": data.get("last_error")}
    return None


class LiveOutput:
    """The live streams on one Redis: publishing (worker side) and reading (follower side)."""

    def __init__(self, redis_url: str, *, retention_s: float, max_events: int) -> None:
        import redis

        self.client = redis.Redis.from_url(redis_url, socket_timeout=SOCKET_TIMEOUT_S,
                                           socket_connect_timeout=SOCKET_TIMEOUT_S)
        self.retention_ms = int(retention_s * 1000)
        self.max_events = max_events
        self._paused_until = 0.0

    def publisher(self, task_id: str, thread_id: str) -> LivePublisher:
        """A trace listener (`TraceWriter.on_event`) that publishes one task's events as they happen."""
        return LivePublisher(self, task_id, (task_key(task_id), thread_key(thread_id)))

    def _publish(self, task_id: str, keys: tuple[str, ...], event: dict[str, Any]) -> None:
        if time.monotonic() < self._paused_until:
            return
        fields = {"e": orjson.dumps(event, default=str)}
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.xadd(key, fields, maxlen=self.max_events, approximate=True)
                pipe.pexpire(key, self.retention_ms)
            pipe.execute()
        except Exception as exc:  # live output is a convenience: the trace keeps the events
            self._paused_until = time.monotonic() + PAUSE_AFTER_FAILURE_S
            logger.warning("task %r: live output paused for %.0f s: Redis refused an event (%s: %s)",
                           task_id, PAUSE_AFTER_FAILURE_S, type(exc).__name__, exc)

    def exists(self, key: str) -> bool:
        return bool(self.client.exists(key))

    def read(self, key: str, *, after: str, block_ms: int) -> list[FollowedEvent]:
        """The entries of `key` after cursor `after`, waiting up to `block_ms` for the first one."""
        answer = self.client.xread({key: after}, block=block_ms, count=500)
        events = []
        for _key, entries in answer or ():
            for entry_id, fields in entries:
                events.append((entry_id.decode(), orjson.loads(fields[b"e"])))
        return events

    def close(self) -> None:
        self.client.close()


class LivePublisher:
    """One task's live output: every event published as it is emitted, except ``done``, held until committed.

    A follower that sees ``done`` reads the task's end from the store next
    (`wait_for`, the story of its thread): so the run calls `publish_done`
    only after the store has committed the final status. A run whose
    commit fails (lease lost, store down) publishes no ``done``: the task is
    not finished, and a later run publishes its own.
    """

    def __init__(self, live: LiveOutput, task_id: str, keys: tuple[str, ...]) -> None:
        self.live = live
        self.task_id = task_id
        self.keys = keys
        self._held_done: Optional[dict[str, Any]] = None

    def __call__(self, event_type: str, data: dict[str, Any]) -> None:
        event = live_event(event_type, data)
        if event is None:
            return
        event["task_id"] = self.task_id
        if event["type"] == "done":
            self._held_done = event
            return
        self.live._publish(self.task_id, self.keys, event)

    def publish_done(self) -> None:
        """The task's end is committed: publish its held ``done`` event."""
        if self._held_done is not None:
            event, self._held_done = self._held_done, None
            self.live._publish(self.task_id, self.keys, event)


#: How long a task's live stream may stay quiet before its follower asks the store whether the task ended.
STORE_CHECK_AFTER_S = 1.0


def follow_stream(live: LiveOutput, key: str, *, after: str, until_done_of: Optional[str],
                  idle_timeout_s: Optional[float], block_ms: int = 200,
                  ended: Optional[Callable[[], Optional[dict[str, Any]]]] = None) -> Iterator[FollowedEvent]:
    """Yield `key`'s entries after `after` as they arrive.

    Ends after the ``done`` event of task `until_done_of` (None: never), or
    once `idle_timeout_s` passes without an event. A follower never hangs on
    a task whose worker died between storing its end and publishing ``done``:
    after `STORE_CHECK_AFTER_S` of quiet it calls `ended`, and if that returns
    a ``done`` event (built from the store) yields it, with the last cursor
    seen, and ends. Each ``XREAD`` blocks at
    most `block_ms`, so a stop is noticed quickly; a chunk is returned by
    Redis the moment it is added.
    """
    cursor = after
    idle_since = time.monotonic()
    while True:
        events = live.read(key, after=cursor, block_ms=block_ms)
        if events:
            idle_since = time.monotonic()
        for cursor, event in events:
            yield cursor, event
            if until_done_of is not None and event.get("type") == "done" and event.get("task_id") == until_done_of:
                return
        quiet_s = time.monotonic() - idle_since
        if ended is not None and quiet_s > STORE_CHECK_AFTER_S:
            done = ended()
            if done is not None:
                yield cursor, done
                return
            idle_since = time.monotonic() - STORE_CHECK_AFTER_S / 2  # ask again in half the time, not every read
        if idle_timeout_s is not None and quiet_s > idle_timeout_s:
            return
