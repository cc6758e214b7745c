"""How the ``longhaul`` command prints: JSON for scripts, aligned text for people.

Every printer takes what one API function returned; none reads the store.
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any, Optional, Sequence

import click
import orjson
from pydantic import BaseModel

from longhaul.models import TaskRecord, TaskStatus, TaskSummary
from longhaul.models.event_stream import EventFile
from longhaul.models.traces import TraceEventRecord

if TYPE_CHECKING:  # the CLI loads these modules only when a command needs them (`lazy_modules`)
    from longhaul.models.space import StoreSpace

    from .admin import AgentRef, ListedTask, MigrationReport, VacuumReport
    from .api import Progress
    from .health import HealthCheck

#: Exit code of a command whose task did not complete, or whose object is missing.
EXIT_FAILED = 1
#: The characters of a trace event's data a text line shows.
TRACE_SUMMARY_CHARS = 160


def dump_json(value: Any) -> None:
    """Print `value` (a model, a list of them, or plain data) as indented JSON."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    click.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def print_progress(progress: Progress) -> None:
    total = f"/{progress.planned_steps}" if progress.planned_steps else ""
    tool = f" · {progress.last_tool}" if progress.last_tool else ""
    click.echo(f"[{progress.task_id}] step {progress.step}{total}{tool} · {progress.elapsed_s:.1f}s", err=True)


def report_finished(records: Sequence[TaskSummary], as_json: bool) -> None:
    """Print finished records; exit 1 unless every one completed."""
    if as_json:
        dump_json(records[0] if len(records) == 1 else records)
    else:
        for record in records:
            line = f"{record.task_id}: {record.status.value} after {record.checkpoint_count} steps"
            if record.final_response:
                line += f"\n{record.final_response}"
            if record.last_error and record.status is not TaskStatus.COMPLETED:
                line += f"\nerror: {record.last_error}"
            click.echo(line)
    if any(r.status is not TaskStatus.COMPLETED for r in records):
        running = [r.task_id for r in records if not r.status.is_terminal]
        if running:
            click.echo(f"still running or interrupted: {', '.join(running)}", err=True)
        sys.exit(EXIT_FAILED)


def report_sent(records: Sequence[TaskSummary]) -> None:
    for record in records:
        click.echo(f"{record.task_id}: sent to the workers")


def print_migration(report: MigrationReport, as_json: bool) -> None:
    if as_json:
        dump_json({"database": report.database, "backend": report.backend, "from_version": report.from_version,
                   "to_version": report.to_version, "changed": report.changed})
    elif report.from_version == 0:
        click.echo(f"schema created at version {report.to_version} ({report.database})")
    elif report.changed:
        click.echo(f"schema upgraded from version {report.from_version} to {report.to_version} ({report.database})")
    else:
        click.echo(f"schema up to date at version {report.to_version} ({report.database})")


def print_health(checks: Sequence[HealthCheck], as_json: bool) -> None:
    if as_json:
        dump_json({"healthy": all(check.ok for check in checks), "checks": [vars(check) for check in checks]})
        return
    for check in checks:
        click.echo(f"{'ok' if check.ok else 'FAILED'}: {check.name}: {check.detail}", err=not check.ok)


def _agent_json(agent: Optional[AgentRef]) -> Optional[dict[str, str]]:
    return None if agent is None else {"name": agent.name, "version": agent.version}


def _agent_text(agent: Optional[AgentRef]) -> str:
    return f"{agent.name}@{agent.version}" if agent else "-"


def _when(moment: Optional[datetime]) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}" if moment else "-"


def _lease_text(row: TaskSummary) -> str:
    return f"{row.lease.host} pid {row.lease.pid}" if row.lease else "-"


def print_tasks(listed: Sequence[ListedTask], as_json: bool, *, next_cursor: Optional[str] = None) -> None:
    """The rows as a table (and, under a full page, on stderr, how to get the next), or as JSON with their cursors."""
    if as_json:
        dump_json([{**item.summary.model_dump(mode="json"), "agent": _agent_json(item.agent), "cursor": item.cursor}
                   for item in listed])
        return
    click.echo(f"{'TASK':<24} {'THREAD':<20} {'AGENT':<24} {'STATUS':<9} {'STEPS':>5} {'MSGS':>5} {'TURNS':>5} "
               f"{'TOOLS':>5} {'TOKENS':>8} {'COST':>8} {'STARTED':<19} {'UPDATED':<19} {'ENDED':<19} WORKER")
    for item in listed:
        row = item.summary
        click.echo(f"{row.task_id:<24} {row.thread_id:<20} {_agent_text(item.agent):<24} "
                   f"{row.status.value:<9} {row.checkpoint_count:>5} "
                   f"{row.message_count:>5} {row.turn_count:>5} {row.tool_call_count:>5} "
                   f"{row.usage.total_tokens:>8} {row.usage.cost_usd:>8.4f} {_when(row.started_at):<19} "
                   f"{_when(row.updated_at):<19} {_when(row.completed_at):<19} {_lease_text(row)}")
    if next_cursor is not None:
        click.echo(f"next page: --after {next_cursor}", err=True)


def print_trace_event(event: TraceEventRecord, as_json: bool) -> None:
    if as_json:
        click.echo(orjson.dumps(event.model_dump(mode="json")).decode())
        return
    summary = orjson.dumps(event.data).decode()
    if len(summary) > TRACE_SUMMARY_CHARS:
        summary = summary[:TRACE_SUMMARY_CHARS - 3] + "..."
    click.echo(f"{event.sequence:>6} {event.elapsed_ms / 1000:>9.3f}s {event.event_type:<20} {summary}")


def print_exported(files: Sequence[EventFile], as_json: bool) -> None:
    if as_json:
        dump_json([{"path": str(f.path), "task_id": f.task_id, "start_offset": f.start_offset,
                    "end_offset": f.end_offset, "event_count": f.event_count} for f in files])
        return
    for f in files:
        click.echo(f"{f.path}  {f.event_count} events, bytes {f.start_offset}-{f.end_offset}")
    click.echo(f"{len(files)} file(s), {sum(f.event_count for f in files)} events", err=True)


def print_pruned(deleted: Sequence[str], *, dry_run: bool, as_json: bool, space: Optional[StoreSpace] = None) -> None:
    if as_json:
        dump_json({"dry_run": dry_run, "deleted": list(deleted)})
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {len(deleted)} finished task(s)" + (": " + ", ".join(deleted) if deleted else ""))
    if space is not None and space.backend == "sqlite":
        click.echo(f"store: {_mb(space.total_bytes)} on disk, {_mb(space.free_bytes)} free inside", err=True)
        if not space.prune_shrinks_file and space.free_bytes:
            click.echo("this SQLite file predates shrinking on prune: run `longhaul vacuum` once to return the "
                       "free space (and every later prune's) to the disk", err=True)


def print_vacuumed(report: VacuumReport, as_json: bool) -> None:
    if as_json:
        dump_json({"backend": report.after.backend, "before_bytes": report.before.total_bytes,
                   "after_bytes": report.after.total_bytes, "auto_vacuum": report.after.auto_vacuum})
        return
    click.echo(f"vacuumed the {report.after.backend} store: {_mb(report.before.total_bytes)} -> "
               f"{_mb(report.after.total_bytes)}" + ("; prunes now shrink the file"
                                                      if report.after.prune_shrinks_file else ""))


def _mb(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:.1f} MB"


def print_task(record: TaskRecord, as_json: bool) -> None:
    agent = record.spec.agent if record.spec else None
    from .admin import AgentRef

    agent_ref = None if agent is None else AgentRef(name=agent.name, version=agent.version)
    if as_json:
        dump_json({**record.model_dump(mode="json"), "agent": _agent_json(agent_ref)})
        return
    for label, value in [
        ("task", record.task_id), ("thread", record.thread_id), ("agent", _agent_text(agent_ref)),
        ("status", record.status.value),
        ("provider", f"{record.provider} / {record.model}"), ("steps", record.checkpoint_count),
        ("messages", record.message_count), ("recoveries", record.recovery_count),
        ("lease", _lease_text(record) + (f" until {record.lease.expires_at:%H:%M:%S} (worker {record.lease.owner})"
                                         if record.lease else "")),
        ("created", f"{record.created_at:%Y-%m-%d %H:%M:%S}"),
        ("finished", f"{record.completed_at:%Y-%m-%d %H:%M:%S}" if record.completed_at else "-"),
        ("note", record.latest_checkpoint_note or "-"), ("error", record.last_error or "-"),
        ("response", record.final_response or "-"),
    ]:
        click.echo(f"{label:<11}{value}")
    for checkpoint in record.checkpoints[-10:]:
        tools = ", ".join(f"{i.tool_name}{'' if i.success else ' (failed)'}" for i in checkpoint.items)
        click.echo(f"  step {checkpoint.step_index:>4} {checkpoint.created_at:%H:%M:%S} {tools}")


def print_cancelled(task_id: str, status: TaskStatus) -> None:
    click.echo(f"{task_id}: {'cancelled' if status is TaskStatus.CANCELLED else status.value}"
               + (" (stops after its current step)" if status is TaskStatus.RUNNING else ""))


def print_followed(cursor: str, event: dict[str, Any], as_json: bool) -> None:
    """One followed event: ``{cursor, event}`` JSON, or the cursor, the type and what it says."""
    if as_json:
        click.echo(orjson.dumps({"cursor": cursor, "event": event}).decode())
        return
    kind = event.get("type")
    if kind in ("chunk", "reasoning"):
        detail = repr(event.get("text", ""))
    elif kind == "tool_call":
        detail = f"{event.get('tool')} {orjson.dumps(event.get('arguments')).decode()}"
    elif kind == "tool_result":
        detail = f"{event.get('tool')} {'ok' if event.get('success') else 'failed'}: {event.get('output', '')[:200]!r}"
    elif kind == "done":
        detail = f"{event.get('status')}: {event.get('answer') or event.get('error') or ''}"
    else:
        detail = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("type", "task_id"))
    click.echo(f"{cursor}\t{event.get('task_id')}\t{kind}\t{detail}")
