"""Live output's sender: events of many tasks batched into few round trips, in order, `done` sent before it returns.

Against fakeredis (a fast unit test of the batching); the end-to-end
follow over a real Redis and a real SIGKILL is in tests/test_threads.py.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import orjson
import pytest

from longhaul.worker.live import LiveOutput, task_key, thread_key

fakeredis = pytest.importorskip("fakeredis")


class HeldSender(LiveOutput):
    """Live output on fakeredis whose sender waits at its first round trip until `release` is set.

    Everything published meanwhile queues up: what a thousand tasks
    emitting while one round trip is on the wire look like.
    """

    def __init__(self, *, fail: bool = False) -> None:
        super().__init__("redis://127.0.0.1:1/0", retention_s=60, max_events=1000)
        self.client = fakeredis.FakeRedis()
        self.release = threading.Event()
        self.round_trips: list[int] = []  # events per round trip
        self.fail = fail

    def _send(self, events: list[Any]) -> None:
        self.release.wait(10)
        self.round_trips.append(len(events))
        if self.fail:
            raise ConnectionError("Redis went away")
        super()._send(events)


def entries(live: LiveOutput, key: str) -> list[dict[str, Any]]:
    return [orjson.loads(fields[b"e"]) for _id, fields in live.client.xrange(key)]


def test_events_of_many_tasks_go_out_in_a_few_round_trips_each_stream_in_emission_order():
    live = HeldSender()
    publishers = [live.publisher(f"task-{n}", "thread-shared" if n % 2 else f"thread-{n}") for n in range(50)]
    try:
        publishers[0]("session_started", {})  # the sender takes this one and waits in its round trip
        for step in range(4):
            for publisher in publishers:
                publisher("checkpoint", {"step": step, "note": None})
        live.release.set()
        assert live.flush(timeout_s=10)

        assert sum(live.round_trips) == 1 + 50 * 4
        assert len(live.round_trips) <= 3, live.round_trips  # not a round trip per event (201)
        for n in range(50):
            steps = [event["step"] for event in entries(live, task_key(f"task-{n}")) if event["type"] == "step"]
            assert steps == [0, 1, 2, 3]
        shared = [(event["task_id"], event["step"]) for event in entries(live, thread_key("thread-shared"))
                  if event["type"] == "step"]
        assert shared == [(f"task-{n}", step) for step in range(4) for n in range(1, 50, 2)]  # emission order
        ttl = live.client.pttl(task_key("task-7"))
        assert 0 < ttl <= 60_000  # each stream's expiry renewed once per round trip
    finally:
        live.release.set()
        live.close()


def test_done_is_on_redis_when_publish_done_returns():
    live = HeldSender()
    publisher = live.publisher("ending", "thread-ending")
    try:
        publisher("content", {"text": "the answer"})
        publisher("done", {"status": "completed", "final_response": "the answer"})  # held until committed
        assert entries(live, task_key("ending")) == []
        threading.Timer(0.3, live.release.set).start()  # the round trip is slow

        publisher.publish_done()

        assert [event["type"] for event in entries(live, task_key("ending"))] == ["chunk", "done"]
    finally:
        live.release.set()
        live.close()


def test_a_batch_redis_refuses_pauses_live_output_and_wakes_its_waiters(caplog):
    live = HeldSender(fail=True)
    publisher = live.publisher("unlucky", "thread-unlucky")
    live.release.set()
    try:
        with caplog.at_level(logging.WARNING, logger="longhaul.worker.live"):
            publisher("content", {"text": "lost"})
            assert live.flush(timeout_s=5)  # the waiter is woken, not left hanging
            publisher("content", {"text": "paused"})  # dropped at once: live output is paused
            assert live.flush(timeout_s=5)
        assert live.round_trips == [1]
        assert "live output paused" in caplog.text and "Redis went away" in caplog.text
    finally:
        live.close()


def test_hundreds_of_tasks_publishing_at_once_share_one_connection_and_pause_nothing(caplog):
    """redis-py's pool holds 100 connections: a round trip per publishing thread ran out of them."""
    live = LiveOutput("redis://127.0.0.1:1/0", retention_s=60, max_events=1000)
    live.client = fakeredis.FakeRedis(connection_pool=fakeredis.FakeRedis().connection_pool)
    tasks = 300
    start = threading.Barrier(tasks)

    def publish(n: int) -> None:
        publisher = live.publisher(f"crowd-{n}", f"crowd-thread-{n}")
        start.wait()
        for step in range(3):
            publisher("checkpoint", {"step": step, "note": None})

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(tasks)]
    try:
        with caplog.at_level(logging.WARNING, logger="longhaul.worker.live"):
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            assert live.flush(timeout_s=10)
        assert "paused" not in caplog.text
        assert all(len(entries(live, task_key(f"crowd-{n}"))) == 3 for n in range(tasks))
    finally:
        live.close()
