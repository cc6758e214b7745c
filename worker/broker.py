"""The Dramatiq broker and longhaul's actor, with every option set on purpose.

Dramatiq's defaults suit short jobs: a 10-minute time limit and 20 retries
spread over days. An agent task runs for hours and is retried only for
errors that a later attempt can fix.
"""

from __future__ import annotations

import logging
from typing import Any

from dramatiq import Actor, Broker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from longhaul.models import StoreUnavailable

from .context import WorkerContext
from .execute import execute_task
from .loop import TRANSIENT_ERRORS
from .metrics import dramatiq_middleware
from .middleware import LonghaulMiddleware

logger = logging.getLogger(__name__)

#: The one actor: run (or resume) a task by id.
RUN_TASK = "longhaul.run_task"


def build_broker(rt: WorkerContext) -> tuple[Broker, Actor]:
    """A Redis broker (or the embedded StubBroker) with longhaul's actor declared."""
    settings = rt.settings
    middleware = [
        AgeLimit(),
        TimeLimit(time_limit=settings.default_time_limit_s * 1000, interval=1000),
        ShutdownNotifications(notify_shutdown=False),
        Callbacks(),
        Pipelines(),
        # Dramatiq runs after_* hooks in reverse order: listed before Retries,
        # LonghaulMiddleware.after_process_message sees message.failed once Retries gives up.
        LonghaulMiddleware(rt),
        Retries(max_retries=settings.max_retries, min_backoff=settings.min_backoff_ms,
                max_backoff=settings.max_backoff_ms),
        CurrentMessage(),
        *dramatiq_middleware(),  # Dramatiq's own message metrics, when the supervisor serves metrics
    ]
    broker: Broker
    if rt.embedded:
        broker = StubBroker(middleware=middleware)
    else:
        from .redis_broker import LonghaulRedisBroker, connection_pool

        broker = LonghaulRedisBroker(connection_pool=connection_pool(settings.redis_url), middleware=middleware)
    return broker, declare_run_task(broker, rt)


def declare_run_task(broker: Broker, rt: WorkerContext) -> Actor:
    settings = rt.settings

    def run_task(*args: Any, **kwargs: Any) -> None:
        """Run or resume one task. The message body is only its id: the rest is in the store."""
        if kwargs or len(args) != 1 or not isinstance(args[0], str) or not 0 < len(args[0].strip()) <= 200:
            logger.error("%s: malformed message (expected one task id of 1-200 characters, got args=%.120r "
                         "kwargs=%.120r); dropping it", RUN_TASK, args[:3], sorted(kwargs)[:3])
            return
        execute_task(rt, args[0])

    def retry_when(retries: int, exception: BaseException) -> bool:
        # A store outage is retried for as long as it lasts: the task cannot be failed without the
        # store anyway, and a restart or failover must never cost a task (backoff caps at max_backoff).
        if isinstance(exception, StoreUnavailable):
            return True
        return isinstance(exception, TRANSIENT_ERRORS) and retries < settings.max_retries

    return Actor(
        run_task,
        broker=broker,
        actor_name=RUN_TASK,
        queue_name=settings.queue_name,
        priority=0,
        options=dict(
            max_retries=settings.max_retries,
            min_backoff=settings.min_backoff_ms,
            max_backoff=settings.max_backoff_ms,
            retry_when=retry_when,
            time_limit=settings.default_time_limit_s * 1000,
            notify_shutdown=False,
            max_age=None,
        ),
    )
