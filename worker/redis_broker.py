"""Dramatiq's Redis broker, with consumers that dead-letter undecodable messages.

Stock Dramatiq raises `DecodeError` out of the consumer on a corrupt body: the
consumer restarts, and every message it had prefetched stays stranded in its
Redis ack set until the worker dies and the broker's heartbeat timeout
passes. Here the corrupt message is moved to the dead-letter queue (where an
operator can inspect it), with an error naming it, and consumption goes on.
"""

from __future__ import annotations

import logging
from typing import Any

from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.errors import DecodeError

logger = logging.getLogger(__name__)


class LonghaulRedisBroker(RedisBroker):
    @property
    def consumer_class(self) -> type[_RedisConsumer]:
        return _DeadLetteringConsumer


class _DeadLetteringConsumer(_RedisConsumer):
    def __next__(self) -> Any:
        while True:
            try:
                return super().__next__()
            except DecodeError as exc:
                # The bad body was already taken off the prefetch cache; go on with the next.
                self._dead_letter(exc.data, exc.error)

    def _dead_letter(self, data: Any, error: BaseException) -> None:
        broker = self.broker
        acks_key = f"{broker.namespace}:__acks__.{broker.broker_id}.{self.queue_name}"
        bodies_key = f"{broker.namespace}:{self.queue_name}.msgs"
        preview = bytes(data[:80]) if isinstance(data, (bytes, bytearray)) else str(data)[:80]
        for raw_id in broker.client.smembers(acks_key):
            if broker.client.hget(bodies_key, raw_id) == data:
                message_id = raw_id.decode()
                broker.do_nack(self.queue_name, message_id)
                logger.error("queue %r: message %r is not a valid Dramatiq message (%s); moved it to the "
                             "dead-letter queue. Body starts %r", self.queue_name, message_id, error, preview)
                return
        logger.error("queue %r: dropped an undecodable message (%s); body starts %r",
                     self.queue_name, error, preview)
