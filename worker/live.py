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

Publishing never fails a task and never makes it wait on Redis: an event
is queued in memory and the process's one sender thread sends whatever is
queued, from every task, in one pipelined round trip (a stream's expiry is
renewed once per round trip, not once per event), on one connection. A
round trip per event from each task's own thread ran redis-py's pool (100
connections) dry with hundreds of tasks in flight, which paused live output
and dropped events. Only a
task's ``done`` waits until it is sent (`LivePublisher.publish_done`), so a
run that returns has published its end. If Redis cannot take a batch,
live output pauses for `PAUSE_AFTER_FAILURE_S` (one warning; what is queued
meanwhile is dropped) and the trace still has the events.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator, Optional

import orjson

from longhaul.models.redact import redact_text

logger = logging.getLogger(__name__)

#: After Redis refused an event, live output of this process pauses this long.
PAUSE_AFTER_FAILURE_S = 5.0
#: Socket timeout of the live-output client: a slow Redis must not stall a model's stream.
SOCKET_TIMEOUT_S = 1.0
#: Events queued for the sender at most; past it (Redis slower than the tasks), new events are dropped.
MAX_QUEUED_EVENTS = 100_000
#: Events sent in one pipelined round trip at most.
MAX_BATCH_EVENTS = 2_000

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
        # Queued for the sender: (task id, stream keys, encoded event) or a `threading.Event` to set once
        # everything queued before it is sent. deque's append and popleft are atomic: no lock needed.
        self._queued: deque[Any] = deque()
        self._wake = threading.Event()
        self._sender: Optional[threading.Thread] = None
        self._sender_pid = 0
        self._start_lock = threading.Lock()
        self._closed = False
        self._dropping = False  # whether the queue overflowed (one warning per overflow)

    def publisher(self, task_id: str, thread_id: str) -> LivePublisher:
        """A trace listener (`TraceWriter.on_event`) that publishes one task's events as they happen."""
        return LivePublisher(self, task_id, (task_key(task_id), thread_key(thread_id)))

    def _publish(self, task_id: str, keys: tuple[str, ...], event: dict[str, Any]) -> None:
        """Queue `event` for `keys` (sent by the sender thread, after every event queued before it)."""
        if self._closed or time.monotonic() < self._paused_until:
            return
        if len(self._queued) >= MAX_QUEUED_EVENTS:
            if not self._dropping:
                self._dropping = True
                logger.warning("task %r: live output is dropping events: %d wait for Redis", task_id,
                               len(self._queued))
            return
        self._dropping = False
        self._enqueue((task_id, keys, orjson.dumps(event, default=str)))

    def flush(self, timeout_s: float = 2 * SOCKET_TIMEOUT_S) -> bool:
        """Wait until every event queued so far is sent (or dropped by a failure); False past `timeout_s`."""
        if not self._queued:
            return True
        sent = threading.Event()
        self._enqueue(sent)
        return sent.wait(timeout_s)

    def _enqueue(self, item: Any) -> None:
        if self._sender is None or self._sender_pid != os.getpid() or not self._sender.is_alive():
            self._start_sender()
        self._queued.append(item)
        self._wake.set()

    def _start_sender(self) -> None:
        """Start this process's sender thread (again in a forked child: threads do not survive fork)."""
        with self._start_lock:
            if self._sender is not None and self._sender_pid == os.getpid() and self._sender.is_alive():
                return
            self._sender_pid = os.getpid()
            self._sender = threading.Thread(target=self._send_forever, name="longhaul-live-output", daemon=True)
            self._sender.start()

    def _send_forever(self) -> None:
        while not self._closed:
            self._wake.wait(1.0)
            self._wake.clear()
            while self._queued:
                self._send_batch()

    def _send_batch(self) -> None:
        """Send what is queued (up to `MAX_BATCH_EVENTS`) in one round trip; then wake its flush waiters."""
        events: list[tuple[str, tuple[str, ...], bytes]] = []
        waiters: list[threading.Event] = []
        while self._queued and len(events) < MAX_BATCH_EVENTS:
            item = self._queued.popleft()
            (waiters if isinstance(item, threading.Event) else events).append(item)
        try:
            if events and time.monotonic() >= self._paused_until:
                self._send(events)
        except Exception as exc:  # live output is a convenience: the trace keeps the events
            self._paused_until = time.monotonic() + PAUSE_AFTER_FAILURE_S
            logger.warning("task %r: live output paused for %.0f s: Redis refused an event (%s: %s)",
                           events[0][0], PAUSE_AFTER_FAILURE_S, type(exc).__name__, exc)
        finally:
            for waiter in waiters:
                waiter.set()

    def _send(self, events: list[tuple[str, tuple[str, ...], bytes]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        streams: dict[str, None] = {}  # in order of first use
        for _task_id, keys, encoded in events:
            for key in keys:
                pipe.xadd(key, {"e": encoded}, maxlen=self.max_events, approximate=True)
                streams[key] = None
        for key in streams:
            pipe.pexpire(key, self.retention_ms)
        pipe.execute()

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
        """Send what is queued (waiting at most a few seconds), stop the sender, close the client."""
        self.flush()
        self._closed = True
        self._wake.set()
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
        """The task's end is committed: publish its held ``done`` event, and wait until it is sent.

        Waiting makes a run that returns one whose end its followers can
        see; it costs a round trip per task, not per event.
        """
        if self._held_done is not None:
            event, self._held_done = self._held_done, None
            self.live._publish(self.task_id, self.keys, event)
            self.live.flush()


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
