"""`BROKER_ERRORS`: what a broker raises when it cannot be reached.

A module of its own so that `errors.py`, which every part of longhaul
imports (the CLI included), does not import redis-py and Dramatiq for it.
"""

from __future__ import annotations

from dramatiq.errors import BrokerError
from redis.exceptions import RedisError

#: What a broker raises when it cannot be reached (redis-py's errors, Dramatiq's own).
BROKER_ERRORS: tuple[type[Exception], ...] = (RedisError, BrokerError)

__all__ = ["BROKER_ERRORS"]
