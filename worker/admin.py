"""Operating a deployment: the store's schema, task listings, exports, retention, the worker pool.

Each function here is what one ``longhaul`` command does (the CLI parses,
calls one, prints), so scripts get the same behaviour from Python. Those
that read or delete tasks use the process's runtime if it has one, else
open the configured store for the call (`_store`): no runtime is built.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator, Optional

from longhaul.models import TaskRecord, TaskSpec, TaskStore, TaskSummary
from longhaul.models.db import is_postgres_url, redact_url
from longhaul.models.event_stream import EventFile, export_events
from longhaul.models.space import StoreSpace

from . import workspaces
from .errors import BrokerRequired
from .settings import Settings, load_settings, processes_for, threads_per_process


@dataclass(frozen=True)
class AgentRef:
    """The agent a task was started from: its name and version hash."""

    name: str
    version: str


@dataclass(frozen=True)
class ListedTask:
    """One row of `list_tasks`: the task's summary, the agent it runs (None: no agent), and its cursor.

    ``list_tasks(after=row.cursor)`` lists the tasks after this one.
    """

    summary: TaskSummary
    agent: Optional[AgentRef]
    cursor: str = ""


@dataclass(frozen=True)
class MigrationReport:
    """What `migrate` did: the database (password hidden), its backend and the schema versions."""

    database: str
    backend: str
    from_version: int
    to_version: int
    changed: bool


@contextmanager
def _store() -> Iterator[tuple[TaskStore, Settings]]:
    """The store (and settings) a command works on: the process's runtime's, else one opened for the call.

    Commands that only read or delete (`tasks`, `show`, `export`, `prune`,
    `vacuum`) then never build a runtime: no broker, provider or Dramatiq
    import, about 0.15 s and 16 MB less per ``longhaul`` invocation.
    """
    runtime_module = sys.modules.get("longhaul.worker.runtime")
    runtime = runtime_module.current_runtime() if runtime_module is not None else None
    if runtime is not None:
        yield runtime.store, runtime.settings
        return
    settings = load_settings()
    with TaskStore(settings.database_url, busy_timeout_ms=settings.sqlite_busy_timeout_ms,
                   pool_size=settings.db_pool_size, sqlite_synchronous=settings.sqlite_synchronous) as store:
        yield store, settings


def migrate() -> MigrationReport:
    """Create or upgrade the configured store's schema (idempotent; `SchemaTooNew` if it is newer than this code)."""
    settings = load_settings()
    with TaskStore(settings.database_url, busy_timeout_ms=settings.sqlite_busy_timeout_ms,
                   pool_size=settings.db_pool_size) as store:
        migration = store.schema_migration
    database = redact_url(settings.database_url)
    return MigrationReport(database=database, backend="postgresql" if is_postgres_url(database) else "sqlite",
                           from_version=migration.from_version, to_version=migration.to_version,
                           changed=migration.changed)


def list_tasks(*, status: Optional[str] = None, thread_id: Optional[str] = None, provider: Optional[str] = None,
               since: Optional[datetime] = None, until: Optional[datetime] = None, limit: int = 50, offset: int = 0,
               after: Optional[str] = None, order_by: str = "updated") -> list[ListedTask]:
    """Tasks matching the filters (see `TaskStore.page_tasks`), each with its agent read from its stored spec."""
    with _store() as (store, _settings):
        page = store.page_tasks(status=status, thread_id=thread_id, limit=limit, offset=offset, after=after,
                                order_by=order_by, provider=provider, since=since, until=until)
        # One read for every row's spec: a corrupt spec, or a task deleted meanwhile, shows no agent.
        specs = store.task_specs([row.task_id for row in page.tasks])
    return [ListedTask(summary=row, agent=_agent_of(specs.get(row.task_id)), cursor=cursor)
            for row, cursor in zip(page.tasks, page.cursors, strict=True)]


def _agent_of(spec: Optional[TaskSpec]) -> Optional[AgentRef]:
    agent = spec.agent if spec is not None else None
    return None if agent is None else AgentRef(name=agent.name, version=agent.version)


#: How many of a task's newest checkpoints `show` prints unless told otherwise.
DEFAULT_SHOWN_CHECKPOINTS = 10


def show_task(task_id: str, *, checkpoints: Optional[int] = DEFAULT_SHOWN_CHECKPOINTS,
              histories: bool = True) -> TaskRecord:
    """The task's record with its lease and its `checkpoints` newest checkpoints (None: all); `TaskNotFound`.

    ``histories=False`` leaves both histories out. With a bounded count and
    no histories, the read costs the same at step 25,000 as at step 25.
    """
    with _store() as (store, _settings):
        return store.get(task_id, latest_checkpoints=checkpoints, histories=histories)


def export_chat_events(out_dir: Path, *, task_id: Optional[str] = None, max_events_per_file: int,
                       max_bytes_per_file: int) -> list[EventFile]:
    """Write one task's chat events (every task's when `task_id` is None) as rotated JSONL files in `out_dir`."""
    with _store() as (store, _settings):
        return export_events(store, out_dir, task_ids=None if task_id is None else [task_id],
                             max_events_per_file=max_events_per_file, max_bytes_per_file=max_bytes_per_file)


def prune(*, max_tasks: Optional[int] = None, older_than_s: Optional[float] = None,
          dry_run: bool = False) -> list[str]:
    """Delete old finished tasks with their data and files (see `workspaces.prune`); the ids deleted."""
    with _store() as (store, settings):
        return workspaces.prune(store, settings.workspace_root, max_tasks=max_tasks, older_than_s=older_than_s,
                                dry_run=dry_run)


@dataclass(frozen=True)
class VacuumReport:
    """What `vacuum` did: the store's space before and after (see `models/space.py`)."""

    before: StoreSpace
    after: StoreSpace


def vacuum() -> VacuumReport:
    """Rebuild the configured store compactly; an older SQLite file also switches to shrinking on every prune."""
    with _store() as (store, _settings):
        before = store.space()
        return VacuumReport(before=before, after=store.vacuum())


def store_space() -> StoreSpace:
    """The configured store's size on disk and free space."""
    with _store() as (store, _settings):
        return store.space()


def delete_thread(thread_id: str) -> int:
    """Delete every task of the thread with its data, workspace and write journal; how many were deleted."""
    with _store() as (store, settings):
        return workspaces.delete_thread(store, settings.workspace_root, thread_id)


def serve(*, processes: Optional[int] = None, threads: Optional[int] = None, concurrency: Optional[int] = None,
          metrics_port: Optional[int] = None) -> int:
    """Run a supervised pool of worker processes until it is told to stop; its exit code.

    Each process runs `threads` tasks at once, else its share of
    `concurrency` (default: `Settings.concurrency`, LONGHAUL_CONCURRENCY),
    else 4; `processes` defaults to one per `settings.TASKS_PER_PROCESS`
    tasks of `concurrency`, at most one per core (`processes_for`). The
    processes run their tasks on `Settings.worker_pool`. The settings and
    the store are checked once, here, before any child starts (`BrokerRequired` without Redis). The supervisor itself
    runs no task, so it lets go of its database connections. With
    `metrics_port` (default `LONGHAUL_METRICS_PORT`) it serves the pool's
    Prometheus metrics there (`metrics.MetricsEndpoint`) for as long as it runs.
    """
    from .metrics import MetricsEndpoint
    from .runtime import get_runtime
    from .supervisor import supervise

    runtime = get_runtime()
    if runtime.settings.redis_url is None:
        raise BrokerRequired("`longhaul worker`")
    runtime.store.close_all()
    concurrency = concurrency if concurrency is not None else runtime.settings.concurrency
    if processes is None:
        processes = processes_for(concurrency if threads is None else None)
    threads = threads_per_process(processes=processes, threads=threads, concurrency=concurrency)
    pool = runtime.settings.worker_pool
    # Prefetch no more messages than the threads can run: a killed worker then
    # strands no queued message in its Redis ack set for the broker's 60 s+.
    os.environ.setdefault("dramatiq_queue_prefetch", str(threads))
    port = metrics_port or runtime.settings.metrics_port
    if port is None:
        return supervise(processes=processes, threads=threads, pool=pool)
    endpoint = MetricsEndpoint(host=runtime.settings.metrics_host, port=port,
                               count_tasks=lambda status: runtime.store.count_tasks(status),
                               end_counts=lambda: runtime.store.task_end_counts()).start()
    try:
        return supervise(processes=processes, threads=threads, pool=pool, on_child_exit=endpoint.process_exited)
    finally:
        endpoint.stop()


def runs_in_process() -> bool:
    """Whether this process runs the tasks it resumes (no Redis): `resume` and `rerun` then return them finished."""
    from .runtime import get_runtime

    return get_runtime().embedded


__all__ = ["DEFAULT_SHOWN_CHECKPOINTS", "AgentRef", "ListedTask",
           "MigrationReport", "delete_thread", "export_chat_events", "list_tasks",
           "migrate", "prune", "runs_in_process", "serve", "show_task", "store_space", "vacuum", "VacuumReport"]
