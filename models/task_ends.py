"""How many tasks reached each terminal status, per agent: counted in the store, where the status is written.

`longhaul_tasks_total{status,agent}` must agree with the store whichever
process ended the task: a worker finishing it, Dramatiq giving up on its
retries, a wait for a reply timing out, or a CLI, API or dashboard cancel
of a task no worker ever ran (that process has no metrics folder). So each
of those writes adds one to a row of `task_end_count` in its own
transaction (`count_end`), and the metrics endpoint reads the table at
each scrape (`TaskStore.task_end_counts`). The counts only grow: pruning
or deleting tasks leaves them alone, as a Prometheus counter needs. One
small upsert per ended task; on PostgreSQL tasks ending at once on the
same (status, agent) queue on that row's lock only until their commits.
"""

from __future__ import annotations

from typing import Any, Optional

import orjson

from .context import StoreContext


def agent_label(spec_json: Optional[str], provider: str) -> str:
    """The `agent` label of a task: its agent's name, else its provider's (as the worker's `RunInfo` has it)."""
    try:
        spec = orjson.loads(spec_json) if spec_json else None
    except orjson.JSONDecodeError:
        spec = None
    agent = spec.get("agent") if isinstance(spec, dict) else None
    name = agent.get("name") if isinstance(agent, dict) else None
    return str(name) if name else provider


def count_end(ctx: StoreContext, row: Any, status: str, *, write: Optional[Any] = None) -> None:
    """Add one to (status, agent) for the task `row` (inside the transaction that wrote `status`).

    `write`: the locked write (`Dialect.locked_write`) it goes with; else a statement of the caller's transaction.
    """
    params = (status, agent_label(row.spec, row.provider))
    if write is None:
        ctx.db.execute_sql(ctx.sql.count_end, params)
    else:
        write.execute(ctx.sql.count_end, params)


def end_counts(ctx: StoreContext) -> dict[tuple[str, str], int]:
    """{(status, agent): tasks that reached that status} since the table was made."""
    TaskEndCount = ctx.tables.TaskEndCount
    return {(status, agent): count for status, agent, count in
            TaskEndCount.select(TaskEndCount.status, TaskEndCount.agent, TaskEndCount.count).tuples()}
