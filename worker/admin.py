"""Operating a deployment: the store's schema, task listings, exports, retention, the worker pool.

Each function here is what one ``longhaul`` command does (the CLI parses,
calls one, prints), so scripts get the same behaviour from Python. Those
that read tasks use the process's default runtime (`runtime.get_runtime`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

from longhaul.models import TaskRecord, TaskSpec, TaskStore, TaskSummary
from longhaul.models.db import is_postgres_url, redact_url
from longhaul.models.event_stream import EventFile, export_events

from . import workspaces
from .errors import BrokerRequired
from .runtime import get_runtime
from .settings import load_settings, threads_per_process
from .supervisor import supervise


@dataclass(frozen=True)
class AgentRef:
    """The agent a task was started from: its name and version hash."""

    name: str
    version: str


@dataclass(frozen=True)
class ListedTask:
    """One row of `list_tasks`: the task's summary and the agent it runs (None: no agent)."""

    summary: TaskSummary
    agent: Optional[AgentRef]


@dataclass(frozen=True)
class MigrationReport:
    """What `migrate` did: the database (password hidden), its backend and the schema versions."""

    database: str
    backend: str
    from_version: int
    to_version: int
    changed: bool


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
               order_by: str = "updated") -> list[ListedTask]:
    """Tasks matching the filters (see `TaskStore.list_tasks`), each with its agent read from its stored spec."""
    store = get_runtime().store
    rows = store.list_tasks(status=status, thread_id=thread_id, limit=limit, offset=offset, order_by=order_by,
                            provider=provider, since=since, until=until)
    # One read for every row's spec: a corrupt spec, or a task deleted meanwhile, shows no agent.
    specs = store.task_specs([row.task_id for row in rows])
    return [ListedTask(summary=row, agent=_agent_of(specs.get(row.task_id))) for row in rows]


def _agent_of(spec: Optional[TaskSpec]) -> Optional[AgentRef]:
    agent = spec.agent if spec is not None else None
    return None if agent is None else AgentRef(name=agent.name, version=agent.version)


def show_task(task_id: str) -> TaskRecord:
    """The task's full record (checkpoints and lease included); `TaskNotFound` if there is none."""
    return get_runtime().store.get(task_id)


def export_chat_events(out_dir: Path, *, task_id: Optional[str] = None, max_events_per_file: int,
                       max_bytes_per_file: int) -> list[EventFile]:
    """Write one task's chat events (every task's when `task_id` is None) as rotated JSONL files in `out_dir`."""
    return export_events(get_runtime().store, out_dir, task_ids=None if task_id is None else [task_id],
                         max_events_per_file=max_events_per_file, max_bytes_per_file=max_bytes_per_file)


def prune(*, max_tasks: Optional[int] = None, older_than_s: Optional[float] = None,
          dry_run: bool = False) -> list[str]:
    """Delete old finished tasks with their data and files (see `workspaces.prune`); the ids deleted."""
    rt = get_runtime()
    return workspaces.prune(rt.store, rt.settings.workspace_root, max_tasks=max_tasks, older_than_s=older_than_s,
                            dry_run=dry_run)


def delete_thread(thread_id: str) -> int:
    """Delete every task of the thread with its data, workspace and write journal; how many were deleted."""
    rt = get_runtime()
    return workspaces.delete_thread(rt.store, rt.settings.workspace_root, thread_id)


def serve(*, processes: int, threads: Optional[int] = None, concurrency: Optional[int] = None) -> int:
    """Run a supervised pool of worker processes until it is told to stop; its exit code.

    Each process runs `threads` tasks at once, else its share of
    `concurrency` (default: `Settings.concurrency`, LONGHAUL_CONCURRENCY),
    else 4. The settings and the store are checked once, here, before any
    child starts (`BrokerRequired` without Redis). The supervisor itself
    runs no task, so it lets go of its database connections.
    """
    runtime = get_runtime()
    if runtime.settings.redis_url is None:
        raise BrokerRequired("`longhaul worker`")
    runtime.store.close_all()
    threads = threads_per_process(processes=processes, threads=threads,
                                  concurrency=concurrency if concurrency is not None else runtime.settings.concurrency)
    # Prefetch no more messages than the threads can run: a killed worker then
    # strands no queued message in its Redis ack set for the broker's 60 s+.
    os.environ.setdefault("dramatiq_queue_prefetch", str(threads))
    return supervise(processes=processes, threads=threads)


def runs_in_process() -> bool:
    """Whether this process runs the tasks it resumes (no Redis): `resume` and `rerun` then return them finished."""
    return get_runtime().embedded


__all__ = ["AgentRef", "ListedTask", "MigrationReport", "delete_thread", "export_chat_events", "list_tasks",
           "migrate", "prune", "runs_in_process", "serve", "show_task"]
