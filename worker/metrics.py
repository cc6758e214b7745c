"""Prometheus metrics of a `longhaul worker` pool: one endpoint for every worker process.

`prometheus_client`'s multiprocess mode, as Dramatiq's own Prometheus
middleware uses it: each worker process writes its samples to memory-mapped
files in one folder (``PROMETHEUS_MULTIPROC_DIR``), and the supervisor,
which outlives them, serves the sum at ``--metrics-port``. A worker process
that is killed keeps its counts (its files stay), so restarts lose nothing;
its live gauges are dropped when the supervisor reaps it
(`MetricsEndpoint.process_exited`). The folder is made fresh by each
supervisor and removed when it stops: counters start from zero with the
pool, which Prometheus' `rate()` expects of a restarted target.

Counters of what a worker's run stores (steps, tool calls, tokens, cost) are
counted when the write committed (`observe.ObservedStore`), so they agree
with the store; model calls count every call made, including one whose step
a crash lost. ``longhaul_tasks_total`` and ``longhaul_tasks_waiting`` are
read from the store at each scrape: a task can end in a process that is no
worker (a CLI or dashboard cancel), so the store counts each end in the
transaction that wrote it (`models.task_ends`). Both are the store's, the
same on every pool's endpoint: aggregate them with ``max``, not ``sum``,
across pools sharing a store.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Optional

from longhaul.models import TaskStatus, Usage

from .errors import SettingsError
from .observe import Committed, ModelCall, RunInfo, RunObserver, ToolCallRun, TraceParentStore

logger = logging.getLogger(__name__)

#: Where worker processes write their samples (set by the supervisor, read by prometheus_client).
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Dramatiq's Prometheus middleware reads its folder from this variable (at import).
DRAMATIQ_DB_ENV = "dramatiq_prom_db"
#: Step and model-call duration buckets, in seconds: agent steps take from milliseconds to many minutes.
DURATION_BUCKETS_S = (0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, float("inf"))
#: The token kinds of `longhaul_tokens_total{type}`, as `Usage` fields.
TOKEN_TYPES = {"input": "input_tokens", "output": "output_tokens", "cache_read": "cache_read_tokens",
               "cache_creation": "cache_creation_tokens", "reasoning": "reasoning_tokens"}


def metrics_enabled() -> bool:
    """Whether this process writes metrics: its supervisor serves them (``PROMETHEUS_MULTIPROC_DIR`` is set)."""
    return bool(os.environ.get(MULTIPROC_DIR_ENV))


class _Metrics:
    """The metric objects of a worker process (made once, on first use, after the folder is set)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        # Samples go to the multiprocess folder whatever the registry; a registry of their own keeps the
        # process-wide default free of them (and of duplicates, should they ever be made twice).
        registry = CollectorRegistry()

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return Counter(name, doc, labels, registry=registry)

        def histogram(name: str, doc: str, labels: tuple[str, ...]) -> Any:
            return Histogram(name, doc, labels, buckets=DURATION_BUCKETS_S, registry=registry)

        self.in_flight = Gauge("longhaul_tasks_in_flight", "Tasks a worker thread runs right now.",
                               multiprocess_mode="livesum", registry=registry)
        self.steps = counter("longhaul_steps", "Model turns stored (the store's turn_count).", ("agent",))
        self.step_duration = histogram("longhaul_step_duration_seconds",
                                       "Time from a run's start, or its previous stored step, to a stored step.",
                                       ("agent",))
        self.model_calls = counter("longhaul_model_calls", "Provider calls made, answered or failed.",
                                   ("provider", "model"))
        self.model_duration = histogram("longhaul_model_call_duration_seconds", "Duration of one provider call.",
                                        ("provider", "model"))
        self.tokens = counter("longhaul_tokens", "Tokens of stored model answers.", ("type", "model"))
        self.cost = counter("longhaul_cost_usd", "Cost of stored model answers, in US dollars.", ("model",))
        self.tool_calls = counter("longhaul_tool_calls", "Tool calls stored with a step.", ("tool", "outcome"))
        self.recoveries = counter("longhaul_recoveries", "Interrupted tasks re-sent by recovery.", ("reason",))
        self.takeovers = counter("longhaul_lease_takeovers", "Leases taken over from a dead or expired holder.")


_made: Optional[_Metrics] = None
_made_lock = threading.Lock()


def _metrics() -> _Metrics:
    """The process's metric objects, made once (worker threads start runs concurrently)."""
    global _made
    with _made_lock:
        if _made is None:
            _made = _Metrics()
        return _made


class _PrometheusRun:
    def __init__(self, metrics: _Metrics, run: RunInfo, clock: Callable[[], float]) -> None:
        self.m = metrics
        self.run = run
        self.clock = clock
        self.step_started_s = clock()
        metrics.in_flight.inc()

    def model_call(self, call: ModelCall) -> None:
        labels = (self.run.provider, self.run.model)
        self.m.model_calls.labels(*labels).inc()
        self.m.model_duration.labels(*labels).observe(max(0.0, call.ended_s - call.started_s))

    def tool_call(self, call: ToolCallRun) -> None:
        pass  # counted when stored (`committed`), so the count agrees with the store's

    def committed(self, commit: Committed) -> None:
        agent, model = self.run.agent, self.run.model
        if commit.assistant_turns:
            self.m.steps.labels(agent).inc(commit.assistant_turns)
            now_s = self.clock()
            self.m.step_duration.labels(agent).observe(max(0.0, now_s - self.step_started_s))
            self.step_started_s = now_s
        for item in commit.items:
            self.m.tool_calls.labels(item.tool_name, "ok" if item.success else "error").inc()
        if commit.usage is not None:
            _count_usage(self.m, commit.usage, model)

    def ended(self, status: TaskStatus, error_type: Optional[str]) -> None:
        self.m.in_flight.dec()


def _count_usage(metrics: _Metrics, usage: Usage, model: str) -> None:
    for kind, field in TOKEN_TYPES.items():
        value = getattr(usage, field)
        if value:
            metrics.tokens.labels(kind, model).inc(value)
    if usage.cost_usd:
        metrics.cost.labels(model).inc(usage.cost_usd)


class PrometheusObserver:
    """Counts a worker process's runs into the supervisor's multiprocess folder."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = _metrics()
        self.clock = clock

    def run_started(self, run: RunInfo, *, remember: TraceParentStore) -> RunObserver:
        return _PrometheusRun(self.metrics, run, self.clock)

    def recovery(self, reason: str) -> None:
        self.metrics.recoveries.labels(reason).inc()

    def takeover(self) -> None:
        self.metrics.takeovers.inc()


def dramatiq_middleware() -> list[Any]:
    """Dramatiq's own Prometheus middleware (message counts and durations) when metrics are on, else none.

    Imported only then: importing it creates its folder. Its samples go to
    the same multiprocess folder (the supervisor sets ``dramatiq_prom_db``
    to it), so the one endpoint serves them too.
    """
    if not metrics_enabled():
        return []
    from dramatiq.middleware.prometheus import Prometheus

    return [Prometheus()]


# -- the supervisor's endpoint ---------------------------------------------------------------------


class _StoreCounts:
    """A collector that reads ``longhaul_tasks_total`` and ``longhaul_tasks_waiting`` from the store at each scrape."""

    def __init__(self, count_tasks: Callable[[str], int],
                 end_counts: Callable[[], dict[tuple[str, str], int]]) -> None:
        self.count_tasks = count_tasks
        self.end_counts = end_counts

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        ended = CounterMetricFamily("longhaul_tasks", "Tasks that reached each terminal status, whoever ended them "
                                    "(counted by the store).", labels=["status", "agent"])
        try:
            for (status, agent), count in sorted(self.end_counts().items()):
                ended.add_metric([status, agent], count)
        except Exception as exc:  # the store is down: the other metrics are still worth serving
            logger.warning("longhaul_tasks_total: could not read the store (%s: %s)", type(exc).__name__, exc)
            return
        yield ended

        family = GaugeMetricFamily("longhaul_tasks_waiting", "Tasks waiting: for a worker (queued), or for a reply "
                                   "(waiting, where the store has that status).", labels=["waiting_for"])
        try:
            family.add_metric(["worker"], self.count_tasks(TaskStatus.QUEUED.value))
            waiting = getattr(TaskStatus, "WAITING", None)
            if waiting is not None:
                family.add_metric(["reply"], self.count_tasks(waiting.value))
        except Exception as exc:  # the store is down: the other metrics are still worth serving
            logger.warning("longhaul_tasks_waiting: could not read the store (%s: %s)", type(exc).__name__, exc)
            return
        yield family


class MetricsEndpoint:
    """The supervisor's side: a fresh multiprocess folder for its children, and the HTTP endpoint.

    `start` makes the folder and exports it (the children inherit the
    environment) before any child starts; `process_exited` drops a dead
    child's live gauges; `stop` closes the endpoint and removes the folder.
    """

    def __init__(self, *, host: str, port: int, count_tasks: Callable[[str], int],
                 end_counts: Callable[[], dict[tuple[str, str], int]]) -> None:
        self.host = host
        self.port = port
        self.count_tasks = count_tasks
        self.end_counts = end_counts
        self.folder: Optional[str] = None
        self._server: Any = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> MetricsEndpoint:
        self.folder = tempfile.mkdtemp(prefix="longhaul-metrics-")
        os.environ[MULTIPROC_DIR_ENV] = self.folder
        os.environ[DRAMATIQ_DB_ENV] = self.folder
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.folder)
        registry.register(_StoreCounts(self.count_tasks, self.end_counts))  # type: ignore[arg-type]
        try:
            self._server, self._thread = start_http_server(self.port, addr=self.host, registry=registry)
        except OSError as exc:
            self.stop()
            raise SettingsError(f"LONGHAUL_METRICS_PORT (--metrics-port): cannot serve metrics on "
                                f"{self.host}:{self.port} ({exc.strerror or exc}); pick a free port") from None
        logger.info("metrics at http://%s:%d/metrics", self.host, self.port)
        return self

    def process_exited(self, pid: int) -> None:
        if self.folder is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.folder)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            os.environ.pop(MULTIPROC_DIR_ENV, None)
            os.environ.pop(DRAMATIQ_DB_ENV, None)
            self.folder = None
