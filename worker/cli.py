"""The ``longhaul`` command: a thin shell over `worker.api`.

Exit codes: 0 success, 1 a failed task or a missing object, 2 bad usage,
130 interrupted (the task stays resumable). Errors are one clear line on
stderr, never a traceback (``LONGHAUL_DEBUG=1`` shows one).
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import click
import orjson
from pydantic import BaseModel, ValidationError

from longhaul.models import (
    Budget,
    CorruptRecord,
    InvalidInput,
    LonghaulError,
    TaskNotFound,
    TaskStatus,
    TaskStore,
    TaskSummary,
)
from longhaul.models.db import is_postgres_url, redact_url
from longhaul.models.event_stream import export_events

from . import api, workspaces
from .apps import APP_ENV_VAR, add_to_environment, import_apps, parse_app_modules
from .errors import BrokerRequired
from .runtime import get_runtime
from .settings import load_settings

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class LonghaulGroup(click.Group):
    """Turns longhaul's errors into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ValidationError as exc:
            for err in exc.errors():
                where = ".".join(str(part) for part in err["loc"]) or "input"
                click.echo(f"error: {where}: {err['msg']}", err=True)
            ctx.exit(EXIT_USAGE)
        except InvalidInput as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_USAGE)
        except LonghaulError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_FAILED)
        except KeyboardInterrupt:
            click.echo("interrupted: running tasks stopped after their current step and stay resumable "
                       "(`longhaul resume --interrupted`)", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            # The reader went away (`longhaul tasks | head`): not an error.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(0)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as exc:
            if os.environ.get("LONGHAUL_DEBUG"):
                raise
            click.echo(f"internal error: {type(exc).__name__}: {exc} (set LONGHAUL_DEBUG=1 for a traceback)",
                       err=True)
            ctx.exit(EXIT_FAILED)


def _dump(value: Any) -> None:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    click.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def _print_progress(progress: api.Progress) -> None:
    total = f"/{progress.planned_steps}" if progress.planned_steps else ""
    tool = f" · {progress.last_tool}" if progress.last_tool else ""
    click.echo(f"[{progress.task_id}] step {progress.step}{total}{tool} · {progress.elapsed_s:.1f}s", err=True)


def _report(records: Sequence[TaskSummary], as_json: bool) -> None:
    """Print finished records; exit 1 unless every one completed."""
    if as_json:
        _dump(records[0] if len(records) == 1 else records)
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


def task_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options `run` and `enqueue` share."""
    options = [
        click.option("--agent", help="Run this agent (defined in an app module); other options override it."),
        click.option("--thread", "thread_id", help="Thread id: continue this conversation's history."),
        click.option("--task-id", help="Use this task id instead of a generated one."),
        click.option("--channel", default="cli", show_default=True, help="Where the task came from."),
        click.option("--provider", help="Model provider (default: LONGHAUL_DEFAULT_PROVIDER, 'scripted')."),
        click.option("--model", help="Model name for the provider."),
        click.option("--steps", type=click.IntRange(min=1), help="Scripted provider: how many steps to plan."),
        click.option("--step-delay", type=click.FloatRange(min=0), help="Ledger tool: seconds to wait per step."),
        click.option("--ledger", type=click.Path(dir_okay=False, path_type=Path),
                     help="Ledger tool: file that records every executed step."),
        click.option("--max-steps", type=click.IntRange(min=1), help="Fail the task past this many steps."),
        click.option("--time-limit", "time_limit_s", type=click.FloatRange(min=0, min_open=True),
                     help="Seconds the task may run in all, across resumes."),
        click.option("--tool", "tools", multiple=True,
                     help="A tool the task may call (repeat for more; default: the agent's, else every tool)."),
        click.option("--max-model-calls", type=click.IntRange(min=0), help="Budget: model calls in all."),
        click.option("--max-tool-calls", type=click.IntRange(min=0), help="Budget: tool calls in all."),
        click.option("--max-tokens", type=click.IntRange(min=0), help="Budget: input + output tokens in all."),
        click.option("--max-cost-usd", type=click.FloatRange(min=0), help="Budget: USD of model answers in all."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _submit_kwargs(steps: Optional[int], step_delay: Optional[float], ledger: Optional[Path],
                   tools: tuple[str, ...], max_model_calls: Optional[int], max_tool_calls: Optional[int],
                   max_tokens: Optional[int], max_cost_usd: Optional[float], **kwargs: Any) -> dict[str, Any]:
    """`submit`'s keywords from the CLI's options: only those given, so an agent's fields stay in force."""
    kwargs = {name: value for name, value in kwargs.items() if value is not None}
    budget = Budget(max_model_calls=max_model_calls, max_tool_calls=max_tool_calls, max_tokens=max_tokens,
                    max_cost_usd=max_cost_usd)
    if not budget.is_empty:
        kwargs["budget"] = budget
    if tools:
        kwargs["tools"] = list(tools)
    if steps is not None:
        kwargs["steps"] = steps
    if step_delay is not None:
        kwargs["step_delay_s"] = step_delay
    if ledger is not None:
        kwargs["ledger_path"] = str(ledger.resolve())
    return kwargs


@click.group(cls=LonghaulGroup)
@click.version_option(package_name="longhaul")
def cli() -> None:
    """longhaul: durable long-horizon agent tasks on Dramatiq."""
    logging.basicConfig(level=os.environ.get("LONGHAUL_LOG_LEVEL", "WARNING").upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    if not os.environ.get("LONGHAUL_DEBUG"):
        for handler in logging.getLogger().handlers:
            handler.addFilter(_without_traceback)


def _without_traceback(record: logging.LogRecord) -> bool:
    """Log lines, not tracebacks: a retried provider error is news, not a crash."""
    if record.exc_info and record.exc_info[1] is not None:
        record.msg = f"{record.getMessage()}: {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        record.args = ()
    record.exc_info = None
    record.exc_text = None
    return True


@cli.command()
@click.argument("prompt")
@task_options
@click.option("--json", "as_json", is_flag=True, help="Print the finished task as JSON.")
def run(prompt: str, as_json: bool, **options: Any) -> None:
    """Run one task to its end (in-process without Redis), showing progress."""
    record = api.run_inline(prompt, on_progress=None if as_json else _print_progress, **_submit_kwargs(**options))
    _report([record], as_json)


@cli.command()
@click.argument("prompt")
@task_options
def enqueue(prompt: str, **options: Any) -> None:
    """Send a task to the Redis workers and print its id."""
    click.echo(api.enqueue(prompt, **_submit_kwargs(**options)))


@cli.command()
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=4, show_default=True)
def worker(processes: int, threads: int) -> None:
    """Run a supervised pool of worker processes for longhaul (needs Redis).

    A worker process that dies is replaced while the others keep serving;
    SIGTERM or SIGINT (to this process or its whole process group) stops
    every process after its current steps; SIGHUP restarts them gracefully.
    """
    from .supervisor import supervise

    runtime = get_runtime()  # the settings and the store are checked once, here, before any child starts
    if runtime.settings.redis_url is None:
        raise BrokerRequired("`longhaul worker`")
    runtime.store.close_all()  # the supervisor runs no task: it holds no database connection
    # Prefetch no more messages than the threads can run: a killed worker then
    # strands no queued message in its Redis ack set for the broker's 60 s+.
    os.environ.setdefault("dramatiq_queue_prefetch", str(threads))
    sys.exit(supervise(processes=processes, threads=threads))


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def migrate(as_json: bool) -> None:
    """Create or upgrade the store's schema (SQLite or PostgreSQL) and print its version.

    Safe to run while workers run, and from several hosts at once: a fresh
    database is created once, an older schema upgraded once, a current one
    left alone. A schema newer than this longhaul is refused (exit 1).
    """
    settings = load_settings()
    with TaskStore(settings.database_url, busy_timeout_ms=settings.sqlite_busy_timeout_ms,
                   pool_size=settings.db_pool_size) as store:
        migration = store.schema_migration
    database = redact_url(settings.database_url)
    if as_json:
        _dump({"database": database, "backend": "postgresql" if is_postgres_url(database) else "sqlite",
               "from_version": migration.from_version, "to_version": migration.to_version,
               "changed": migration.changed})
    elif migration.from_version == 0:
        click.echo(f"schema created at version {migration.to_version} ({database})")
    elif migration.changed:
        click.echo(f"schema upgraded from version {migration.from_version} to {migration.to_version} ({database})")
    else:
        click.echo(f"schema up to date at version {migration.to_version} ({database})")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def health(ctx: click.Context, as_json: bool) -> None:
    """Check that the store and the broker answer: exit 0 if so, else 1 naming what failed (a HEALTHCHECK)."""
    from .health import check_health

    checks = check_health(load_settings())
    healthy = all(check.ok for check in checks)
    if as_json:
        _dump({"healthy": healthy, "checks": [vars(check) for check in checks]})
    else:
        for check in checks:
            click.echo(f"{'ok' if check.ok else 'FAILED'}: {check.name}: {check.detail}", err=not check.ok)
    if not healthy:
        ctx.exit(EXIT_FAILED)


class Duration(click.ParamType):
    """``90s``, ``15m``, ``12h``, ``7d``, ``2w`` (or plain seconds), as seconds."""

    name = "duration"
    _UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip().lower()
        unit = self._UNITS.get(text[-1:], None)
        number = text[:-1] if unit else text
        try:
            seconds = float(number) * (unit or 1)
        except ValueError:
            self.fail(f"{value!r} is not a duration like 90s, 15m, 12h, 7d or 2w", param, ctx)
        if seconds < 0:
            self.fail(f"{value!r} is negative", param, ctx)
        return seconds


class PointInTime(click.ParamType):
    """An ISO date/time (UTC unless it says otherwise), or a duration ago (``12h``)."""

    name = "time"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            parsed = datetime.fromisoformat(str(value))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
        except ValueError:
            pass
        try:
            seconds = Duration().convert(value, param, ctx)
        except click.BadParameter:
            self.fail(f"{value!r} is neither an ISO time (2026-11-22T08:00) nor a duration ago (12h)", param, ctx)
        return datetime.now(timezone.utc) - timedelta(seconds=seconds)


def _when(moment: Optional[datetime]) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}" if moment else "-"


def _agents_of(rows: Sequence[TaskSummary]) -> dict[str, Optional[dict[str, str]]]:
    """``{"name", "version"}`` of each task's agent (None: no agent), read from the stored specs."""
    store = get_runtime().store
    agents: dict[str, Optional[dict[str, str]]] = {}
    for row in rows:
        try:
            agent = store.task_spec(row.task_id).agent
        except (CorruptRecord, TaskNotFound):  # a corrupt spec, or a task deleted meanwhile: no agent shown
            agent = None
        agents[row.task_id] = None if agent is None else {"name": agent.name, "version": agent.version}
    return agents


def _agent_text(agent: Optional[dict[str, str]]) -> str:
    return f"{agent['name']}@{agent['version']}" if agent else "-"


@cli.command()
@click.option("--status", type=click.Choice([s.value for s in TaskStatus]))
@click.option("--thread", "thread_id")
@click.option("--provider", help="Only tasks run by this provider (agent).")
@click.option("--since", type=PointInTime(), help="Created at or after: ISO time or a duration ago (12h).")
@click.option("--until", type=PointInTime(), help="Created before: ISO time or a duration ago.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0)
@click.option("--order-by", type=click.Choice(["updated", "created"]), default="updated", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def tasks(status: Optional[str], thread_id: Optional[str], provider: Optional[str], since: Optional[datetime],
          until: Optional[datetime], limit: int, offset: int, order_by: str, as_json: bool) -> None:
    """List tasks with their counts, tokens and cost, newest first."""
    rows = get_runtime().store.list_tasks(status=status, thread_id=thread_id, limit=limit, offset=offset,
                                          order_by=order_by, provider=provider, since=since, until=until)
    agents = _agents_of(rows)
    if as_json:
        _dump([{**row.model_dump(mode="json"), "agent": agents[row.task_id]} for row in rows])
        return
    click.echo(f"{'TASK':<24} {'THREAD':<20} {'AGENT':<24} {'STATUS':<9} {'STEPS':>5} {'MSGS':>5} {'TURNS':>5} "
               f"{'TOOLS':>5} {'TOKENS':>8} {'COST':>8} {'STARTED':<19} {'UPDATED':<19} {'ENDED':<19} WORKER")
    for row in rows:
        click.echo(f"{row.task_id:<24} {row.thread_id:<20} {_agent_text(agents[row.task_id]):<24} "
                   f"{row.status.value:<9} {row.checkpoint_count:>5} "
                   f"{row.message_count:>5} {row.turn_count:>5} {row.tool_call_count:>5} "
                   f"{row.usage.total_tokens:>8} {row.usage.cost_usd:>8.4f} {_when(row.started_at):<19} "
                   f"{_when(row.updated_at):<19} {_when(row.completed_at):<19} {_lease_text(row)}")


@cli.command()
@click.argument("task_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events until the task finishes.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def traces(task_id: str, follow: bool, as_json: bool) -> None:
    """Print a task's trace events in order."""
    for event in api.follow_traces(task_id, follow=follow):
        if as_json:
            click.echo(orjson.dumps(event.model_dump(mode="json")).decode())
        else:
            summary = orjson.dumps(event.data).decode()
            summary = summary if len(summary) <= 160 else summary[:157] + "..."
            click.echo(f"{event.sequence:>6} {event.elapsed_ms / 1000:>9.3f}s {event.event_type:<20} {summary}")


@cli.command()
@click.argument("task_id", required=False)
@click.option("--all", "all_tasks", is_flag=True, help="Export every task.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the JSONL files (created if missing).")
@click.option("--max-events", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Rotate to a new file after this many events.")
@click.option("--max-bytes", type=click.IntRange(min=1), default=10 * 1024 * 1024, show_default=True,
              help="Rotate before a file would grow past this many bytes.")
@click.option("--json", "as_json", is_flag=True)
def export(task_id: Optional[str], all_tasks: bool, out_dir: Path, max_events: int, max_bytes: int,
           as_json: bool) -> None:
    """Export chat events as JSON Lines, rotated by count and size (a consistent snapshot)."""
    if bool(task_id) == all_tasks:
        raise click.UsageError("give a TASK_ID or --all (one of them)")
    files = export_events(get_runtime().store, out_dir, task_ids=None if all_tasks else [task_id or ""],
                          max_events_per_file=max_events, max_bytes_per_file=max_bytes)
    if as_json:
        _dump([{"path": str(f.path), "task_id": f.task_id, "start_offset": f.start_offset,
                "end_offset": f.end_offset, "event_count": f.event_count} for f in files])
        return
    for f in files:
        click.echo(f"{f.path}  {f.event_count} events, bytes {f.start_offset}-{f.end_offset}")
    click.echo(f"{len(files)} file(s), {sum(f.event_count for f in files)} events", err=True)


@cli.command()
@click.option("--max-tasks", type=click.IntRange(min=0), help="Keep only this many most recently finished tasks.")
@click.option("--older-than", "older_than_s", type=Duration(), help="Delete tasks finished longer ago (7d, 12h).")
@click.option("--dry-run", is_flag=True, help="Only say what would be deleted.")
@click.option("--json", "as_json", is_flag=True)
def prune(max_tasks: Optional[int], older_than_s: Optional[float], dry_run: bool, as_json: bool) -> None:
    """Delete old finished tasks (never queued or running ones) with all their data."""
    if max_tasks is None and older_than_s is None:
        raise click.UsageError("give --max-tasks and/or --older-than")
    rt = get_runtime()
    deleted = workspaces.prune(rt.store, rt.settings.workspace_root, max_tasks=max_tasks, older_than_s=older_than_s,
                               dry_run=dry_run)
    if as_json:
        _dump({"dry_run": dry_run, "deleted": deleted})
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {len(deleted)} finished task(s)" + (": " + ", ".join(deleted) if deleted else ""))


def _lease_text(row: TaskSummary) -> str:
    return f"{row.lease.host} pid {row.lease.pid}" if row.lease else "-"


@cli.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True)
def show(task_id: str, as_json: bool) -> None:
    """Show a task: record, checkpoints and lease."""
    record = get_runtime().store.get(task_id)
    agent = record.spec.agent if record.spec else None
    agent_ref = None if agent is None else {"name": agent.name, "version": agent.version}
    if as_json:
        _dump({**record.model_dump(mode="json"), "agent": agent_ref})
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


@cli.command()
@click.argument("task_id", required=False)
@click.option("--interrupted", is_flag=True, help="Resume every interrupted task.")
@click.option("--json", "as_json", is_flag=True)
def resume(task_id: Optional[str], interrupted: bool, as_json: bool) -> None:
    """Resume a task (or --interrupted: all of them) from the latest checkpoint."""
    if bool(task_id) == interrupted:
        raise click.UsageError("give a TASK_ID or --interrupted (one of them)")
    progress = None if as_json else _print_progress
    if interrupted:
        records = api.resume_interrupted(on_progress=progress)
        if not records:
            click.echo("no interrupted tasks", err=True)
            return
    else:
        records = [api.resume(task_id or "", on_progress=progress)]
    _report_or_sent(records, as_json)


@cli.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True)
def rerun(task_id: str, as_json: bool) -> None:
    """Run a finished task again from step 1 (its old checkpoints are reset)."""
    _report_or_sent([api.rerun(task_id, on_progress=None if as_json else _print_progress)], as_json)


def _report_or_sent(records: Sequence[TaskSummary], as_json: bool) -> None:
    if get_runtime().embedded:
        _report(records, as_json)
    else:
        for record in records:
            click.echo(f"{record.task_id}: sent to the workers")


@cli.command()
@click.argument("task_id")
def cancel(task_id: str) -> None:
    """Cancel a task: at once if idle, after its current step if running."""
    status = api.cancel(task_id)
    click.echo(f"{task_id}: {'cancelled' if status is TaskStatus.CANCELLED else status.value}"
               + (" (stops after its current step)" if status is TaskStatus.RUNNING else ""))


@cli.command()
@click.option("--thread", "thread_id", required=True, help="Delete every task of this thread.")
def delete(thread_id: str) -> None:
    """Delete a thread's tasks with their checkpoints, messages, traces, workspaces and write journals."""
    rt = get_runtime()
    count = workspaces.delete_thread(rt.store, rt.settings.workspace_root, thread_id)
    click.echo(f"deleted {count} task(s) of thread {thread_id}")


def _import_apps(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> None:
    """Import the app modules of ``--app`` and `LONGHAUL_APP` before the command runs.

    ``--app`` modules are added to `LONGHAUL_APP`, so the worker processes
    `longhaul worker` starts import them too.
    """
    modules = parse_app_modules([*load_settings().app_modules, *value])
    import_apps(modules)
    add_to_environment(modules)


def _app_option() -> click.Option:
    return click.Option(["--app", "apps"], multiple=True, expose_value=False, is_eager=True, callback=_import_apps,
                        metavar="MODULE", help=f"Import this app module first (repeat for more; adds to "
                                               f"{APP_ENV_VAR}): your agents, tools and providers.")


for _command in cli.commands.values():
    _command.params.insert(0, _app_option())


def main() -> None:
    cli(prog_name="longhaul")
