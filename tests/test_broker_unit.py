"""The Redis broker and longhaul's actor, without a server: fakeredis, in milliseconds.

The runtime is built exactly as a worker builds it (`build_broker`, its broker
class and middleware), except that its Redis connections go to fakeredis.
Enqueueing runs Dramatiq's Lua dispatch script, which fakeredis runs
through `lupa` (``fakeredis[lua]``).
"""

from __future__ import annotations

import gc
import os
from typing import Any, Callable, Iterator

import pytest
import redis
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Retries, TimeLimit

from longhaul import worker
from longhaul.models import Claimant, TaskStatus
from longhaul.worker import Runtime, SettingsError, load_settings, set_runtime
from longhaul.worker.broker import RUN_TASK, declare_run_task
from longhaul.worker.loop import StoreUnavailable
from longhaul.worker.middleware import LonghaulMiddleware
from longhaul.worker.providers import PermanentProviderError, TransientProviderError
from longhaul.worker.recovery import find_interrupted
from longhaul.worker.testing import IN_CI, FakeClock, wait_until

fakeredis = pytest.importorskip("fakeredis")

DAY_MS = 24 * 3600 * 1000


@pytest.fixture
def fake_redis() -> Any:
    try:
        import lupa  # noqa: F401  (fakeredis runs Dramatiq's Lua scripts with it)
    except ImportError:
        if IN_CI:
            pytest.fail("lupa is not installed; install the dev extras (fakeredis[lua])")
        pytest.skip("lupa not installed: fakeredis cannot run Dramatiq's Lua scripts")
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())  # a server of its own: nothing leaks between tests


@pytest.fixture
def redis_runtime(db_url: str, fake_redis: Any, monkeypatch: pytest.MonkeyPatch,
                  clock: FakeClock) -> Iterator[Runtime]:
    """A Redis-mode runtime (as `dramatiq longhaul.worker.actors` builds it) whose connections go to fakeredis.

    Its store (and so every lease and time budget) follows the test's `clock`.

    The fake is plugged in under the broker, at the connection pool its URL
    opens, so the broker class and middleware are exactly the worker's.
    """
    for variable in [name for name in os.environ if name.startswith("LONGHAUL_") or name == "REDIS_URL"]:
        monkeypatch.delenv(variable)  # the defaults, whatever the calling shell sets
    server = fake_redis.connection_pool.connection_kwargs["server"]

    def pool_from_url(cls: type, url: str, **options: Any) -> redis.ConnectionPool:
        assert url == "redis://fake:6379/0"
        return redis.ConnectionPool(connection_class=fakeredis.FakeRedisConnection, server=server)

    monkeypatch.setattr(redis.ConnectionPool, "from_url", classmethod(pool_from_url))
    runtime = Runtime(load_settings(database_url=db_url, redis_url="redis://fake:6379/0"), clock=clock)
    set_runtime(runtime)
    yield runtime
    set_runtime(None)
    runtime.broker.close()


def queued_messages(broker: Any, queue_name: str = "longhaul") -> list[Message[Any]]:
    """The messages waiting on a Redis queue, oldest first, decoded as a worker would."""
    client = broker.client
    ids = client.lrange(f"dramatiq:{queue_name}", 0, -1)
    return [Message.decode(client.hget(f"dramatiq:{queue_name}.msgs", message_id)) for message_id in ids]


# -- messages -------------------------------------------------------------------------


def test_enqueue_puts_one_message_with_only_the_task_id_on_the_longhaul_queue(redis_runtime):
    task_id = worker.enqueue("hello", task_id="via-redis", steps=2)

    [message] = queued_messages(redis_runtime.broker)
    assert task_id == "via-redis"
    assert message.queue_name == "longhaul"
    assert message.actor_name == RUN_TASK == "longhaul.run_task"
    assert list(message.args) == [task_id]
    assert message.kwargs == {}
    assert redis_runtime.store.summary(task_id).status is TaskStatus.QUEUED


@pytest.mark.parametrize("time_limit_s, expected_ms", [(60, 60_000), (None, DAY_MS)])
def test_a_message_s_time_limit_is_the_task_s_budget_or_the_24_hour_default(redis_runtime, time_limit_s,
                                                                           expected_ms):
    worker.enqueue("budgeted", time_limit_s=time_limit_s)

    [message] = queued_messages(redis_runtime.broker)
    assert message.options["time_limit"] == expected_ms


def test_a_resumed_task_s_message_gets_what_is_left_of_its_budget_not_a_fresh_one(redis_runtime, clock):
    rt = redis_runtime
    task_id = worker.submit(rt, "half done", time_limit_s=60)
    assert rt.leases.claim(task_id, Claimant(owner="first", host="elsewhere", pid=1), lease_s=5)
    clock.advance(45)  # it ran for 45 s, then its worker died

    rt.send(task_id)

    [message] = queued_messages(rt.broker)
    assert message.options["time_limit"] == 15_000


def test_a_task_over_its_budget_still_gets_a_one_second_message_to_record_that_it_timed_out(redis_runtime, clock):
    rt = redis_runtime
    task_id = worker.submit(rt, "over budget", time_limit_s=10)
    assert rt.leases.claim(task_id, Claimant(owner="first", host="elsewhere", pid=1), lease_s=5)
    clock.advance(30)

    assert rt.remaining_time_limit_ms(task_id) == 1000


def test_enqueue_without_redis_raises_broker_required_and_stores_nothing(make_runtime):
    rt = make_runtime()

    with pytest.raises(worker.BrokerRequired, match="LONGHAUL_REDIS_URL"):
        worker.enqueue("nowhere to go")

    assert rt.store.count_tasks() == 0


# -- the actor's options --------------------------------------------------------------------


def test_every_retry_time_limit_age_and_shutdown_option_of_the_actor_is_set_explicitly(redis_runtime):
    settings = redis_runtime.settings
    actor = redis_runtime.actor

    assert actor.actor_name == "longhaul.run_task" and actor.queue_name == "longhaul"
    options = actor.options
    assert options["max_retries"] == settings.max_retries == 8
    assert options["min_backoff"] == settings.min_backoff_ms
    assert options["max_backoff"] == settings.max_backoff_ms
    assert callable(options["retry_when"])
    assert options["time_limit"] == DAY_MS  # not Dramatiq's 10 minutes
    assert options["notify_shutdown"] is False
    assert "max_age" in options and options["max_age"] is None


def test_the_broker_uses_dramatiq_s_retries_and_time_limit_middleware(redis_runtime):
    kinds = {type(middleware) for middleware in redis_runtime.broker.middleware}

    assert {Retries, TimeLimit} <= kinds


def test_settings_change_the_actor_s_options(db_url, fake_redis):
    rt = Runtime(load_settings(database_url=db_url, redis_url=None, max_retries=3, min_backoff_ms=50,
                               max_backoff_ms=500, default_time_limit_s=7200, queue_name="agents"),
                 embedded=True)
    broker = RedisBroker(client=fake_redis)

    actor = declare_run_task(broker, rt)

    assert actor.queue_name == "agents"
    assert (actor.options["max_retries"], actor.options["min_backoff"], actor.options["max_backoff"]) == (3, 50, 500)
    assert actor.options["time_limit"] == 7200 * 1000
    actor.send("task-x")
    [message] = queued_messages(broker, "agents")
    assert list(message.args) == ["task-x"]


@pytest.mark.parametrize("exception, retried", [
    (TransientProviderError("429 slow down"), True),
    (StoreUnavailable("t", "database is locked"), True),
    (PermanentProviderError("401"), False),
    (ValueError("a bug"), False),
    (KeyError("a bug"), False),
])
def test_retry_when_retries_only_transient_errors(redis_runtime, exception, retried):
    retry_when: Callable[[int, BaseException], bool] = redis_runtime.actor.options["retry_when"]

    assert retry_when(0, exception) is retried


def test_retry_when_stops_at_max_retries(make_runtime):
    rt = make_runtime(max_retries=3)
    retry_when: Callable[[int, BaseException], bool] = rt.actor.options["retry_when"]
    error = TransientProviderError("503")

    assert [retry_when(retries, error) for retries in range(5)] == [True, True, True, False, False]


def test_a_malformed_message_is_dropped_without_touching_the_store(redis_runtime, caplog):
    run_task = redis_runtime.actor.fn

    for args, kwargs in [((), {}), ((1,), {}), (("",), {}), (("a", "b"), {}), (("a",), {"x": 1})]:
        assert run_task(*args, **kwargs) is None

    assert redis_runtime.store.count_tasks() == 0
    assert "malformed message" in caplog.text


def test_a_message_for_an_unknown_task_is_dropped(redis_runtime, caplog):
    assert redis_runtime.actor.fn("no-such-task") is None

    assert redis_runtime.store.count_tasks() == 0
    assert "no-such-task" in caplog.text


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variable, value", [
    ("LONGHAUL_LEASE_S", "abc"),
    ("LONGHAUL_LEASE_S", "0"),
    ("LONGHAUL_MAX_RETRIES", "-1"),
    ("LONGHAUL_MAX_RECOVERIES", "many"),
    ("LONGHAUL_DEFAULT_TIME_LIMIT_S", "-5"),
    ("LONGHAUL_QUEUE_NAME", ""),
])
def test_a_bad_environment_variable_raises_settings_error_naming_it(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)

    with pytest.raises(SettingsError) as raised:
        load_settings()

    assert variable in str(raised.value)
    assert repr(value) in str(raised.value)


def test_a_bad_override_names_its_environment_variable():
    with pytest.raises(SettingsError, match="LONGHAUL_LEASE_S"):
        load_settings(lease_s=-1)


def test_settings_come_from_longhaul_variables_and_redis_url(monkeypatch):
    for key in [k for k in os.environ if k.startswith("LONGHAUL_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere:6379/1")
    monkeypatch.setenv("LONGHAUL_LEASE_S", "12.5")
    monkeypatch.setenv("LONGHAUL_MAX_RECOVERIES", "4")

    settings = load_settings()

    assert settings.redis_url == "redis://elsewhere:6379/1"
    assert settings.lease_s == 12.5
    assert settings.heartbeat_every_s == pytest.approx(12.5 / 3)
    assert settings.max_recoveries == 4
    assert settings.max_retries == 8 and settings.default_time_limit_s == 24 * 3600


def test_longhaul_redis_url_wins_over_redis_url(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://generic:6379/0")
    monkeypatch.setenv("LONGHAUL_REDIS_URL", "redis://ours:6379/0")

    assert load_settings().redis_url == "redis://ours:6379/0"


# -- corrupt messages -------------------------------------------------------------------------


def test_a_corrupt_message_body_is_dead_lettered_and_the_consumer_goes_on_to_the_next(redis_runtime, clock, caplog):
    rt = redis_runtime
    client = rt.broker.client  # type: ignore[attr-defined]
    worker.enqueue("will be mangled", task_id="mangled")
    [mangled_id] = [raw.decode() for raw in client.lrange("dramatiq:longhaul", 0, -1)]
    client.hset("dramatiq:longhaul.msgs", mangled_id, b"\x00not a dramatiq message")
    worker.enqueue("fine", task_id="fine")

    consumer = rt.broker.consume("longhaul", prefetch=2, timeout=100)
    try:
        delivered = wait_until(lambda: next(consumer), timeout_s=5, what="the next valid message")
    finally:
        consumer.close()

    assert list(delivered.args) == ["fine"]
    dead = [raw.decode() for raw in client.zrange("dramatiq:longhaul.XQ", 0, -1)]
    assert dead == [mangled_id]
    assert mangled_id in caplog.text and "dead-letter" in caplog.text
    assert rt.store.summary("mangled").status is TaskStatus.QUEUED  # the task itself is not lost...
    clock.advance(rt.settings.redelivery_grace_s + 1)
    assert "mangled" in {row.task_id for row, _ in find_interrupted(rt)}  # ...and recovery re-sends it


# -- worker boot ---------------------------------------------------------------------------


@pytest.fixture
def freezes(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records `gc.freeze` calls instead of freezing this test process's heap for good."""
    calls: list[bool] = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append(True))
    return calls


@pytest.mark.parametrize("mode", ["redis", "embedded"])
def test_only_a_worker_process_freezes_its_boot_heap(mode, request, freezes, monkeypatch):
    rt: Runtime = request.getfixturevalue("redis_runtime" if mode == "redis" else "embedded_runtime")
    monkeypatch.setattr(rt, "start_maintenance", lambda recover: None)
    [middleware] = [m for m in rt.broker.middleware if isinstance(m, LonghaulMiddleware)]

    middleware.after_worker_boot(rt.broker, worker=None)

    assert freezes == ([True] if mode == "redis" else [])
