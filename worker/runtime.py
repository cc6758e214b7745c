"""`Runtime`: what one process needs to run tasks, built once from settings.

This is the one place a process is wired: the settings, the store, the
broker with the actor declared on it (`broker`), the maintenance thread
(`recovery`) and, for a worker process, the app modules. The parts below it
are handed the runtime (they see it as a `context.WorkerContext`) and
never look one up. The broker is Redis, or the embedded in-process one;
the maintenance thread renews leases and resumes interrupted tasks.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Mapping, Optional

import dramatiq
from dramatiq import Actor, Broker, Worker

from longhaul.models import Claim, Claimant, CorruptRecord, LeaseBook, TaskStore
from longhaul.models.context import Clock
from longhaul.models.redact import redact_log_handlers

from .apps import import_apps
from .broker import build_broker
from .broker_errors import BROKER_ERRORS
from .errors import BrokerUnavailable
from .identity import current_claimant
from .live import LiveOutput
from .metrics import PrometheusObserver, metrics_enabled
from .observe import NULL_OBSERVER, Observer, Observers
from .otel import tracing_observer
from .providers import ProviderFactory
from .recovery import Maintenance
from .settings import Settings, load_settings

logger = logging.getLogger(__name__)


class Runtime:
    """Settings, store, broker and leases of one process.

    `embedded` runtimes use Dramatiq's in-process StubBroker (run by a worker
    thread in the same process) and do not resume other tasks on boot: a
    `longhaul run` runs its own task, not whatever else is interrupted.
    `clock` (seconds since the epoch) is the store's, so every lease and
    time budget follows it: a test hands in a `testing.FakeClock`. None (the
    default) is the database server's clock as this host sees it, which
    keeps hosts whose own clocks disagree judging leases alike.
    `providers` (name -> factory) are the ones its tasks may name and its
    workers build; None means the process's registry (`register_provider`),
    read at each use so a provider registered later is found.
    `observer` hears its runs (metrics, spans); None means the one the
    environment configures (`observe.observer_from_environment`), built on
    first use, so a process that runs no task never builds one.
    """

    def __init__(self, settings: Settings, *, embedded: Optional[bool] = None, clock: Optional[Clock] = None,
                 providers: Optional[Mapping[str, ProviderFactory]] = None,
                 observer: Optional[Observer] = None) -> None:
        self.settings = settings
        self.providers = providers
        self._observer = observer
        # Log lines pass through the same redaction as stored text (the configured API keys included).
        redact_log_handlers()
        self.embedded = settings.redis_url is None if embedded is None else embedded
        self.store = TaskStore(settings.database_url, busy_timeout_ms=settings.sqlite_busy_timeout_ms,
                               pool_size=settings.db_pool_size, sqlite_synchronous=settings.sqlite_synchronous,
                               clock=clock)
        self.leases = LeaseBook(self.store)
        #: Set when the worker is shutting down: running loops stop after their current step.
        self.stopping = threading.Event()
        self._claimant: Optional[Claimant] = None
        self._active: dict[str, Claim] = {}
        self._active_lock = threading.Lock()
        self._maintenance: Optional[Maintenance] = None
        self._embedded_worker: Optional[Worker] = None
        self.broker: Broker
        self.actor: Actor
        self.broker, self.actor = build_broker(self)
        #: Live output (`longhaul follow`) rides on the broker's Redis; none for the embedded broker.
        self.live: Optional[LiveOutput] = None if self.embedded or settings.redis_url is None else LiveOutput(
            settings.redis_url, retention_s=settings.follow_retention_s, max_events=settings.follow_max_events)

    @property
    def observer(self) -> Observer:
        with self._active_lock:  # worker threads start runs concurrently: one observer per process
            if self._observer is None:
                self._observer = observer_from_environment()
            return self._observer

    # -- identity and held leases ---------------------------------------------

    @property
    def claimant(self) -> Claimant:
        """This process as a lease holder (recomputed after a fork)."""
        if self._claimant is None or self._claimant.pid != os.getpid():
            self._claimant = current_claimant(self.settings.worker_host)
        return self._claimant

    def track(self, claim: Claim) -> None:
        with self._active_lock:
            self._active[claim.token] = claim

    def untrack(self, claim: Claim) -> None:
        with self._active_lock:
            self._active.pop(claim.token, None)

    def running_here(self, task_id: str) -> bool:
        """Whether a worker thread of this process runs the task right now."""
        with self._active_lock:
            return any(claim.task_id == task_id for claim in self._active.values())

    def held_tokens(self) -> list[str]:
        with self._active_lock:
            return list(self._active)

    # -- sending ----------------------------------------------------------------

    def send(self, task_id: str) -> None:
        """Put a message for the task on the broker.

        The message carries only the task id; its time limit is what is left
        of the task's budget, so a resumed task does not get a fresh one.
        The broker's id of the message is stored with the task, so recovery
        can tell a message lost with the broker's data (Redis restarted
        empty) from one waiting in a long queue. `BrokerUnavailable` if the
        broker cannot be reached: the task is then marked unsent, and the
        next recovery pass of any worker sends it.
        """
        time_limit_ms = self.remaining_time_limit_ms(task_id)
        try:
            message = self.actor.send_with_options(args=(task_id,), time_limit=time_limit_ms)
        except BROKER_ERRORS as exc:
            self.leases.note_unsent(task_id)
            raise BrokerUnavailable(task_id, f"{type(exc).__name__}: {exc}") from None
        message_id = message.options.get("redis_message_id")
        self.leases.note_sent(task_id, message_id=message_id if isinstance(message_id, str) else None)

    def send_many(self, task_ids: list[str]) -> None:
        """`send` for many tasks: one broker round trip on Redis (a pipeline), one store transaction.

        `BrokerUnavailable` if the broker cannot be reached: every one of
        the tasks is then marked unsent, and recovery sends them.
        """
        if not task_ids:
            return
        budgets = self.store.time_budgets(task_ids)
        messages = [self.actor.message_with_options(
            args=(task_id,), time_limit=self._remaining_ms(*budgets.get(task_id, (None, None))))
            for task_id in task_ids]
        enqueue_many = getattr(self.broker, "enqueue_many", None)
        try:
            sent = enqueue_many(messages) if enqueue_many is not None else [self.broker.enqueue(m) for m in messages]
        except BROKER_ERRORS as exc:
            for task_id in task_ids:
                self.leases.note_unsent(task_id)
            raise BrokerUnavailable(task_ids[0], f"{type(exc).__name__}: {exc} (and {len(task_ids) - 1} more "
                                                 "task(s) of the batch)") from None
        ids = [message.options.get("redis_message_id") for message in sent]
        self.leases.note_sent_many([(task_id, message_id if isinstance(message_id, str) else None)
                                    for task_id, message_id in zip(task_ids, ids, strict=True)])

    def remaining_time_limit_ms(self, task_id: str) -> int:
        """The task's time budget left (at least 1 s), or the default per-delivery limit."""
        try:
            limit_s, started_at = self.store.time_budget(task_id)
        except CorruptRecord:
            # Send it anyway: the worker fails the task with a message naming the field.
            return int(self.settings.default_time_limit_s * 1000)
        return self._remaining_ms(limit_s, started_at)

    def _remaining_ms(self, limit_s: Optional[float], started_at: Optional[float]) -> int:
        if limit_s is None:
            return int(self.settings.default_time_limit_s * 1000)
        used_s = 0.0 if started_at is None else max(0.0, self.store.clock() - started_at)
        return max(1000, int((limit_s - used_s) * 1000))

    # -- the embedded worker -----------------------------------------------------

    def start_embedded_worker(self, *, worker_threads: int = 8, worker_timeout_ms: int = 100) -> None:
        """Run Dramatiq's in-process worker on this runtime's StubBroker (once per runtime).

        It runs until `stop_embedded_worker` or process exit; stopping lets
        each running loop finish its current step and release its lease.
        `worker_timeout_ms` is how often its consumers look for retries that
        have come due (and for a stop request).
        """
        if self._embedded_worker is not None:
            return
        if not self.embedded:
            raise RuntimeError("only an embedded runtime runs an in-process worker")
        self.broker.emit_after("process_boot")
        self._embedded_worker = Worker(self.broker, worker_threads=worker_threads,
                                       worker_timeout=worker_timeout_ms)
        self._embedded_worker.start()
        atexit.register(self.stop_embedded_worker)

    def stop_embedded_worker(self) -> None:
        worker, self._embedded_worker = self._embedded_worker, None
        if worker is not None:
            worker.stop(timeout=600_000)
            self.broker.close()

    # -- maintenance thread ------------------------------------------------------

    def start_maintenance(self, *, recover: bool) -> None:
        if self._maintenance is None or not self._maintenance.is_alive():
            self._maintenance = Maintenance(self, recover=recover)
            self._maintenance.start()

    def stop_maintenance(self) -> None:
        if self._maintenance is not None:
            self._maintenance.stop()
            self._maintenance = None


def observer_from_environment() -> Observer:
    """The process's observer: Prometheus metrics if its supervisor serves them, OTel spans if ``OTEL_*`` asks.

    Neither library is imported otherwise: without ``PROMETHEUS_MULTIPROC_DIR``
    and ``OTEL_TRACES_EXPORTER`` a process observes nothing, at no cost.
    `SettingsError` if spans are asked for without the `otel` extra.
    """
    observers: list[Observer] = []
    if metrics_enabled():
        observers.append(PrometheusObserver())
    tracing = tracing_observer()
    if tracing is not None:
        observers.append(tracing)
    if not observers:
        return NULL_OBSERVER
    return observers[0] if len(observers) == 1 else Observers(observers)


_default: Optional[Runtime] = None
_default_lock = threading.Lock()


def get_runtime() -> Runtime:
    """The process-wide runtime, built from the environment on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Runtime(load_settings())
        return _default


def current_runtime() -> Optional[Runtime]:
    """The process-wide runtime if one was built or set, else None (never builds one)."""
    with _default_lock:
        return _default


def set_runtime(runtime: Optional[Runtime]) -> None:
    """Replace the process-wide runtime (tests, embedders)."""
    global _default
    with _default_lock:
        _default = runtime


def wire_worker_process() -> Runtime:
    """The worker process's runtime: built from the environment, app modules imported, broker made Dramatiq's.

    Raises `LonghaulError` (a bad setting, an unreachable or too new store,
    an app module that cannot be imported) before the process takes a message.
    """
    runtime = get_runtime()
    import_apps(runtime.settings.app_modules)
    _ = runtime.observer  # metrics and OTel set up now: a bad OTEL_* setting stops the process at boot
    dramatiq.set_broker(runtime.broker)
    return runtime
