"""Dramatiq's Redis broker, hardened for workers that get SIGKILLed.

Two gaps in the stock broker matter to a durable worker:

- A body that does not decode (or decodes into something that is not a
  well-formed message) raises out of the consumer: the consumer restarts,
  and every message it had prefetched stays stranded in its Redis ack set
  until the broker's heartbeat timeout. Here such a message is moved to the
  dead-letter queue, with a short error naming it, and consumption goes on.
- A worker killed between fetching a message and claiming its task leaves
  the message in its ack set, which Dramatiq requeues only after a 60 s
  heartbeat timeout and a random maintenance draw. `requeue_stale_acks`
  requeues the ack sets of consumers whose heartbeat has gone quiet for a
  few seconds; a duplicate this may cause is harmless, because a task runs
  only under its lease.

Heartbeats are judged by one clock, Redis's own (``TIME``): a host whose
clock runs fast would otherwise see every other consumer as silent and
requeue what they are running. Dramatiq stamps heartbeats with the local
clock, so `LonghaulRedisBroker` stamps them with the local clock corrected
by its measured offset from Redis's, and the stale-consumer cutoff is
computed inside Redis from ``TIME``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Optional
from uuid import uuid4

from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import current_millis
from dramatiq.errors import DecodeError

logger = logging.getLogger(__name__)

#: How much of a bad body (or decode error) a log line shows.
PREVIEW_BYTES = 120

# Move every message id of stale consumers' ack sets back to the head of their
# queue (if its body still exists), then forget those consumers.
# KEYS[1] heartbeats zset; ARGV[1] namespace, ARGV[2] silence (ms), ARGV[3] own id, ARGV[4..] queue names.
_REQUEUE_STALE_ACKS = """
local now = redis.call("time")
local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[2])
local stale = redis.call("zrangebyscore", KEYS[1], 0, cutoff)
local moved = 0
for _, consumer in ipairs(stale) do
    if consumer ~= ARGV[3] then
        for i = 4, #ARGV do
            local queue = ARGV[1] .. ":" .. ARGV[i]
            local acks = ARGV[1] .. ":__acks__." .. consumer .. "." .. ARGV[i]
            for _, message_id in ipairs(redis.call("smembers", acks)) do
                if redis.call("hexists", queue .. ".msgs", message_id) == 1 then
                    redis.call("lpush", queue, message_id)
                    moved = moved + 1
                end
            end
            redis.call("del", acks)
        end
        redis.call("zrem", KEYS[1], consumer)
    end
end
return moved
"""


#: Redis connections the broker of one process holds at most; more callers at once wait for one.
MAX_BROKER_CONNECTIONS = 64
#: How long a caller waits for a free broker connection before the call fails (a broker error, retried).
BROKER_CONNECTION_WAIT_S = 30.0


def connection_pool(url: str) -> Any:
    """The broker's Redis connections: a pool that makes a caller wait for a free one, never refuses it.

    redis-py's default pool holds 100 connections and raises ``Too many
    connections`` to the 101st caller at once; with hundreds of tasks in
    flight, as many may send a message in the same instant (a thread's
    next task, a retry), and a refused send is a task left for recovery.
    A blocking pool queues them instead, on fewer connections.
    """
    import redis

    return redis.BlockingConnectionPool.from_url(url, max_connections=MAX_BROKER_CONNECTIONS,
                                                 timeout=BROKER_CONNECTION_WAIT_S)


#: How often the offset from Redis's clock is measured again, in seconds.
CLOCK_SYNC_EVERY_S = 30.0


class LonghaulRedisBroker(RedisBroker):
    """Dramatiq's Redis broker with dead-lettering consumers and heartbeats on Redis's clock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._redis_offset_ms = 0
        self._offset_measured_at = float("-inf")  # time.monotonic()
        self._offset_lock = threading.Lock()

    def redis_millis(self) -> int:
        """Redis's clock in ms since the epoch, as this host sees it (local clock plus the measured offset)."""
        if time.monotonic() - self._offset_measured_at >= CLOCK_SYNC_EVERY_S:
            with self._offset_lock:
                if time.monotonic() - self._offset_measured_at >= CLOCK_SYNC_EVERY_S:
                    sent = time.time()
                    seconds, micros = self.client.time()
                    received = time.time()
                    self._redis_offset_ms = int((seconds + micros / 1e6 - (sent + received) / 2) * 1000)
                    self._offset_measured_at = time.monotonic()
        return current_millis() + self._redis_offset_ms

    def _dispatch(self, command: str) -> Callable[..., Any]:
        """Dramatiq's dispatch call, its timestamp (heartbeats, dead-consumer sweep) on Redis's clock."""
        dispatch = self.scripts["dispatch"]
        keys = [self.namespace]

        def do_dispatch(queue_name: str, *args: Any) -> Any:
            return dispatch(args=[command, self.redis_millis(), queue_name, self.broker_id, self.heartbeat_timeout,
                                  self.dead_message_ttl, self._should_do_maintenance(command),
                                  self._max_unpack_size(), *args], keys=keys)

        return do_dispatch

    def enqueue_many(self, messages: list[Message]) -> list[Message]:
        """`enqueue` for many messages in one Redis round trip (a pipeline of Dramatiq's dispatch script).

        Each message gets its own ``redis_message_id`` and passes the
        middleware's enqueue hooks as with `enqueue`; no delay. A broker
        error raises (some messages may have been queued: the caller marks
        the tasks unsent and recovery re-sends them, and a duplicate message
        is harmless, the lease decides who runs a task).
        """
        sent = [message.copy(options={"redis_message_id": str(uuid4())}) for message in messages]
        dispatch = self.scripts["dispatch"]
        with self.client.pipeline(transaction=False) as pipe:
            for message in sent:
                self.emit_before("enqueue", message, None)
                dispatch(args=["enqueue", self.redis_millis(), message.queue_name, self.broker_id,
                               self.heartbeat_timeout, self.dead_message_ttl, self._should_do_maintenance("enqueue"),
                               self._max_unpack_size(), message.options["redis_message_id"], message.encode()],
                         keys=[self.namespace], client=pipe)
            pipe.execute()
        for message in sent:
            self.emit_after("enqueue", message, None)
        return sent

    @property
    def consumer_class(self) -> type[_RedisConsumer]:
        return _DeadLetteringConsumer

    def requeue_stale_acks(self, *, stale_after_s: float) -> int:
        """Requeue what consumers silent for `stale_after_s` had fetched; returns how many messages."""
        queues = sorted(self.get_declared_queues() | {f"{q}.DQ" for q in self.get_declared_queues()})
        if not queues:
            return 0
        script = self.client.register_script(_REQUEUE_STALE_ACKS)
        moved = int(script(keys=[f"{self.namespace}:__heartbeats__"],
                           args=[self.namespace, int(stale_after_s * 1000), self.broker_id, *queues]))
        if moved:
            logger.info("requeued %d message(s) fetched by consumers silent for %.0f s", moved, stale_after_s)
        return moved


    def holds_messages(self, queue_name: str, message_ids: list[str]) -> list[bool]:
        """Whether `queue_name` or its delay queue still holds each of these Redis message ids.

        A message's body stays in the queue's ``.msgs`` hash from enqueue
        until its ack, prefetched and unacked ones included, so an id
        missing there was lost with Redis's data (or consumed since).
        """
        pipe = self.client.pipeline(transaction=False)
        for message_id in message_ids:
            for queue in (queue_name, f"{queue_name}.DQ"):
                pipe.hexists(f"{self.namespace}:{queue}.msgs", message_id)
        found = pipe.execute()
        return [bool(found[2 * i] or found[2 * i + 1]) for i in range(len(message_ids))]


class _DeadLetteringConsumer(_RedisConsumer):
    def __next__(self) -> Any:
        while True:
            try:
                proxy = super().__next__()
            except DecodeError as exc:
                # The bad body was already taken off the prefetch cache; go on with the next.
                data = exc.data
                self._dead_letter(self._find_fetched(lambda body, data=data: body == data), str(exc.error), data)
                continue
            if proxy is None:
                return None
            message = proxy._message
            problem = _malformed(message, self.queue_name)
            if problem is None:
                return proxy
            self.queued_message_ids.discard(message.message_id)
            options = message.options if isinstance(message.options, dict) else {}
            message_id = options.get("redis_message_id")
            if not isinstance(message_id, str):
                wanted = message.message_id
                message_id = self._find_fetched(lambda body, wanted=wanted: _message_id_of(body) == wanted)
            self._dead_letter(message_id, problem, repr(message)[:PREVIEW_BYTES])

    def _dead_letter(self, message_id: Optional[str], problem: str, data: Any) -> None:
        broker = self.broker
        preview = bytes(data[:PREVIEW_BYTES]) if isinstance(data, (bytes, bytearray)) else str(data)[:PREVIEW_BYTES]
        if message_id is None:
            logger.error("queue %r: dropped a malformed message (%s); it starts %r",
                         self.queue_name, problem[:PREVIEW_BYTES], preview)
            return
        broker.do_nack(self.queue_name, message_id)
        logger.error("queue %r: message %r is not a valid Dramatiq message (%s); moved it to the dead-letter "
                     "queue %s.XQ", self.queue_name, message_id[:PREVIEW_BYTES], problem[:PREVIEW_BYTES],
                     self.queue_name)

    def _find_fetched(self, matches: Callable[[bytes], bool]) -> Optional[str]:
        """The Redis id of a fetched body, looked up among this consumer's unacked messages."""
        broker = self.broker
        acks_key = f"{broker.namespace}:__acks__.{broker.broker_id}.{self.queue_name}"
        bodies_key = f"{broker.namespace}:{self.queue_name}.msgs"
        for raw_id in broker.client.smembers(acks_key):
            body = broker.client.hget(bodies_key, raw_id)
            if body is not None and matches(body):
                return raw_id.decode()
        return None


def _message_id_of(body: bytes) -> Optional[str]:
    try:
        fields = json.loads(body)
    except ValueError:
        return None
    return fields.get("message_id") if isinstance(fields, dict) else None


def _malformed(message: Any, queue_name: str) -> Optional[str]:
    """Why a decoded message cannot be handled safely, or None if it can."""
    if not isinstance(message.options, dict):
        return "options is not an object"
    if not isinstance(message.options.get("redis_message_id"), str):
        return "options.redis_message_id is missing"
    if message.queue_name != queue_name.removesuffix(".DQ") and message.queue_name != queue_name:
        return f"queue_name {str(message.queue_name)[:40]!r} is not this queue"
    if not isinstance(message.args, (list, tuple)) or not isinstance(message.kwargs, dict):
        return "args must be a list and kwargs an object"
    return None
