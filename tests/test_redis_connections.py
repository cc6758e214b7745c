"""Hundreds of task threads using one process's Redis clients at once: they wait their turn, none is refused."""

from __future__ import annotations

import threading

import pytest
from dramatiq import Message

from longhaul.worker.broker import RUN_TASK
from longhaul.worker.redis_broker import MAX_BROKER_CONNECTIONS

pytestmark = pytest.mark.redis

#: More callers at once than redis-py's default pool (100 connections) would serve.
CALLERS = 300


def test_hundreds_of_threads_sending_at_once_all_send_on_a_bounded_pool(client_runtime, redis_client):
    broker = client_runtime.broker
    queue = client_runtime.settings.queue_name
    start = threading.Barrier(CALLERS)
    errors: list[BaseException] = []

    def send(n: int) -> None:
        start.wait()
        try:
            broker.enqueue(Message(queue_name=queue, actor_name=RUN_TASK, args=(f"crowd-{n}",), kwargs={},
                                   options={}))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert errors == []
    assert redis_client.hlen(f"dramatiq:{queue}.msgs") == CALLERS
    clients = [c for c in redis_client.client_list() if c.get("name", "") == ""]
    assert len(clients) <= MAX_BROKER_CONNECTIONS + 2  # the pool's, this test's reader and the listing one
