"""The ``longhaul`` command: a thin shell over the Python API.

Each command parses its options, calls one function of `worker.api` or
`worker.admin` (`health` calls `health.check_health`) and prints the result
(`cli_output`). Exit codes: 0 success, 1 a failed task or a missing object,
2 bad usage, 130 interrupted (the task stays resumable). Errors are one
clear line on stderr, never a traceback (``LONGHAUL_DEBUG=1`` shows one).
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

import click
from pydantic import ValidationError

from longhaul.models import InvalidInput, LonghaulError, TaskStatus, TaskSummary

from .cli_output import (
    EXIT_FAILED,
    print_cancelled,
    print_exported,
    print_followed,
    print_health,
    print_migration,
    print_progress,
    print_pruned,
    print_task,
    print_tasks,
    print_trace_event,
    print_vacuumed,
    report_finished,
    report_sent,
)
from .cli_params import (
    CountOrAll,
    Duration,
    LonghaulCommand,
    PointInTime,
    count,
    read_task_lines,
    submit_kwargs,
    task_options,
)
from .lazy_modules import admin, api, apps, bulk, health_checks, settings, worker_errors
from .limits import MAX_CONCURRENCY

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class LonghaulGroup(click.Group):
    """Turns longhaul's errors into one line and an exit code."""

    command_class = LonghaulCommand

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


@click.group(cls=LonghaulGroup)
@click.version_option(package_name="longhaul")
def cli() -> None:
    """longhaul: durable long-horizon agent tasks on Dramatiq."""
    logging.basicConfig(level=settings.log_level_from_env("WARNING"),
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
    record = api.run_inline(prompt, on_progress=None if as_json else print_progress, **submit_kwargs(**options))
    report_finished([record], as_json)


@cli.command()
@click.argument("prompt", required=False)
@click.option("--file", "task_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Enqueue one task per line of this JSON Lines file (- for stdin), in one batch: each line an "
                   "object of enqueue's arguments ({\"prompt\": ..., \"task_id\": ...}); the options below are "
                   "defaults under each line's.")
@task_options
def enqueue(prompt: Optional[str], task_file: Optional[Path], **options: Any) -> None:
    """Send a task (or a --file of them) to the Redis workers and print the id(s)."""
    if (prompt is None) == (task_file is None):
        raise click.UsageError("give a PROMPT or --file (one of them)")
    defaults = submit_kwargs(**options)
    if task_file is None:
        click.echo(api.enqueue(prompt or "", **defaults))
        return
    items, lines = read_task_lines(task_file)
    try:
        task_ids = bulk.enqueue_many([{**defaults, **item} for item in items])
    except worker_errors.InvalidBatchItem as exc:
        raise InvalidInput(f"--file {str(task_file)!r} line {lines[exc.index]}: {exc.problem} "
                           "(nothing of the file was stored)") from None
    click.echo("\n".join(task_ids))


@cli.command()
@click.option("--concurrency", type=click.IntRange(1, MAX_CONCURRENCY), default=None,
              help="tasks this host runs at once, spread over --processes [default: LONGHAUL_CONCURRENCY, "
                   "else 4 per process]")
@click.option("--processes", type=count(1), default=None,
              help="worker processes [default: one per 500 tasks of --concurrency, at most one per core; else 1]")
@click.option("--threads", type=click.IntRange(1, MAX_CONCURRENCY), default=None,
              help="tasks each process runs at once (instead of --concurrency) [default: 4]")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve the pool's Prometheus metrics on this port (default: LONGHAUL_METRICS_PORT; none).")
def worker(concurrency: Optional[int], processes: Optional[int], threads: Optional[int],
           metrics_port: Optional[int]) -> None:
    """Run a supervised pool of worker processes for longhaul (needs Redis).

    `--concurrency N` is the one knob for many tasks in flight: N tasks
    waiting on their models at once on this host (1,000 fit two cores).
    Each process runs its tasks as greenlets (LONGHAUL_WORKER_POOL=greenlets,
    the default; `threads` for one OS thread per task). A worker process
    that dies is replaced while the others keep serving; SIGTERM or SIGINT
    (to this process or its whole process group) stops every process after
    its current steps; SIGHUP restarts them gracefully.
    """
    if concurrency is not None and threads is not None:
        raise click.UsageError("--concurrency and --threads: give one (--concurrency is per host, "
                               "--threads per process)")
    sys.exit(admin.serve(processes=processes, threads=threads, concurrency=concurrency, metrics_port=metrics_port))


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; beyond loopback only with LONGHAUL_DASHBOARD_TOKEN set.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
def dashboard(host: str, port: int) -> None:
    """Serve the web dashboard: tasks, a task's steps and live trace, threads, and actions.

    Every request needs the token (LONGHAUL_DASHBOARD_TOKEN, as a Bearer
    header or once as ?token=); on loopback without one, a token is made
    for this run and the URL to open is printed.
    """
    from .dashboard import serve

    serve(host=host, port=port, announce=lambda line: click.echo(line, err=True))


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def migrate(as_json: bool) -> None:
    """Create or upgrade the store's schema (SQLite or PostgreSQL) and print its version.

    Safe to run while workers run, and from several hosts at once: a fresh
    database is created once, an older schema upgraded once, a current one
    left alone. A schema newer than this longhaul is refused (exit 1).
    """
    print_migration(admin.migrate(), as_json)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def health(ctx: click.Context, as_json: bool) -> None:
    """Check that the store and the broker answer: exit 0 if so, else 1 naming what failed (a HEALTHCHECK)."""
    checks = health_checks.check_health(settings.load_settings())
    print_health(checks, as_json)
    if not all(check.ok for check in checks):
        ctx.exit(EXIT_FAILED)


@cli.command()
@click.option("--status", type=click.Choice([s.value for s in TaskStatus]))
@click.option("--thread", "thread_id")
@click.option("--provider", help="Only tasks run by this provider (agent).")
@click.option("--since", type=PointInTime(), help="Created at or after: ISO time or a duration ago (12h).")
@click.option("--until", type=PointInTime(), help="Created before: ISO time or a duration ago.")
@click.option("--limit", type=count(1), default=50, show_default=True)
@click.option("--after", "after", metavar="CURSOR",
              help="The next page: tasks after this cursor (the `cursor` of a --json row, or the one printed "
                   "under a full page).")
@click.option("--offset", type=count(0), default=0, help="Skip this many tasks (slower than --after far in).")
@click.option("--order-by", type=click.Choice(["updated", "created"]), default="updated", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def tasks(status: Optional[str], thread_id: Optional[str], provider: Optional[str], since: Optional[datetime],
          until: Optional[datetime], limit: int, after: Optional[str], offset: int, order_by: str,
          as_json: bool) -> None:
    """List tasks with their counts, tokens and cost, newest first, a page at a time."""
    listed = admin.list_tasks(status=status, thread_id=thread_id, provider=provider, since=since, until=until,
                              limit=limit, offset=offset, after=after, order_by=order_by)
    print_tasks(listed, as_json, next_cursor=listed[-1].cursor if len(listed) >= limit else None)


@cli.command()
@click.argument("task_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events until the task finishes.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def traces(task_id: str, follow: bool, as_json: bool) -> None:
    """Print a task's trace events in order."""
    for event in api.follow_traces(task_id, follow=follow):
        print_trace_event(event, as_json)


@cli.command()
@click.argument("task_id", required=False)
@click.option("--thread", "thread_id", help="Follow every task of this thread instead of one task.")
@click.option("--after", help="Continue after this cursor (the first column printed, or `cursor` in --json).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: {cursor, event}.")
def follow(task_id: Optional[str], thread_id: Optional[str], after: Optional[str], as_json: bool) -> None:
    """Print a task's (or a thread's) live output as it happens: chunks, tool calls and results, the answer.

    A task's follow ends with its end; a thread's runs until interrupted.
    Pass the last cursor printed as --after to continue with nothing repeated or missed.
    """
    if bool(task_id) == bool(thread_id):
        raise click.UsageError("give TASK_ID or --thread ID (one of them)")
    for cursor, event in api.follow(task_id, thread_id=thread_id, after=after):
        print_followed(cursor, event, as_json)


@cli.command()
@click.argument("task_id")
@click.option("--at-step", type=count(1), required=True, help="Keep the history through this step.")
@click.option("--thread", "thread_id", help="The fork's thread (default: a thread of its own).")
@click.option("--prompt", help="A message added after that step.")
@click.option("--task-id", "new_task_id", help="The fork's task id (default: generated).")
def fork(task_id: str, at_step: int, thread_id: Optional[str], prompt: Optional[str],
         new_task_id: Optional[str]) -> None:
    """Run a new task from step N+1 of TASK_ID's history (TASK_ID is untouched); prints its id."""
    click.echo(api.fork(task_id, at_step=at_step, thread_id=thread_id, prompt=prompt, new_task_id=new_task_id))


@cli.command()
@click.argument("thread_id")
@click.argument("text")
def reply(thread_id: str, text: str) -> None:
    """Answer the question THREAD_ID's waiting task asked; it resumes with TEXT as the answer. Prints its id."""
    click.echo(api.reply(thread_id, text))


@cli.command()
@click.argument("task_id")
def approve(task_id: str) -> None:
    """Approve the tool call TASK_ID waits on: the tool runs and the task goes on."""
    click.echo(api.approve(task_id))


@cli.command()
@click.argument("task_id")
@click.option("--reason", help="Told to the model as the call's result.")
def deny(task_id: str, reason: Optional[str]) -> None:
    """Deny the tool call TASK_ID waits on: its result says so (with --reason) and the task goes on."""
    click.echo(api.deny(task_id, reason=reason))


@cli.command()
@click.argument("task_id", required=False)
@click.option("--all", "all_tasks", is_flag=True, help="Export every task.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the JSONL files (created if missing).")
@click.option("--max-events", type=count(1), default=10_000, show_default=True,
              help="Rotate to a new file after this many events.")
@click.option("--max-bytes", type=count(1), default=10 * 1024 * 1024, show_default=True,
              help="Rotate before a file would grow past this many bytes.")
@click.option("--json", "as_json", is_flag=True)
def export(task_id: Optional[str], all_tasks: bool, out_dir: Path, max_events: int, max_bytes: int,
           as_json: bool) -> None:
    """Export chat events as JSON Lines, rotated by count and size (a consistent snapshot)."""
    if bool(task_id) == all_tasks:
        raise click.UsageError("give a TASK_ID or --all (one of them)")
    print_exported(admin.export_chat_events(out_dir, task_id=None if all_tasks else task_id or "",
                                            max_events_per_file=max_events, max_bytes_per_file=max_bytes), as_json)


@cli.command()
@click.option("--max-tasks", type=count(0), help="Keep only this many most recently finished tasks.")
@click.option("--older-than", "older_than_s", type=Duration(), help="Delete tasks finished longer ago (7d, 12h).")
@click.option("--dry-run", is_flag=True, help="Only say what would be deleted.")
@click.option("--json", "as_json", is_flag=True)
def prune(max_tasks: Optional[int], older_than_s: Optional[float], dry_run: bool, as_json: bool) -> None:
    """Delete old finished tasks (never queued or running ones) with all their data."""
    if max_tasks is None and older_than_s is None:
        raise click.UsageError("give --max-tasks and/or --older-than")
    print_pruned(admin.prune(max_tasks=max_tasks, older_than_s=older_than_s, dry_run=dry_run), dry_run=dry_run,
                 as_json=as_json, space=admin.store_space())


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def vacuum(as_json: bool) -> None:
    """Rebuild the store compactly: once on a SQLite file made before longhaul shrank it on prune, then never.

    SQLite: rewrites the file under an exclusive lock (workers' writes wait)
    and needs free disk of about its size; afterwards every `prune` returns
    its space at once. PostgreSQL: VACUUM (ANALYZE) of longhaul's tables,
    which makes deleted rows' space reusable without locking them.
    """
    print_vacuumed(admin.vacuum(), as_json)


@cli.command()
@click.argument("task_id")
@click.option("--checkpoints", "checkpoint_count", type=CountOrAll(), default="10", show_default=True,
              help="Show this many of the newest checkpoints, or `all`.")
@click.option("--no-histories", is_flag=True, help="Leave the message histories out of --json (long tasks).")
@click.option("--json", "as_json", is_flag=True, help="The record as JSON, with both histories.")
def show(task_id: str, checkpoint_count: Optional[int], no_histories: bool, as_json: bool) -> None:
    """Show a task: record, lease and its newest checkpoints (the record's checkpoint_count says how many in all)."""
    print_task(admin.show_task(task_id, checkpoints=checkpoint_count, histories=as_json and not no_histories),
               as_json)


@cli.command()
@click.argument("task_id", required=False)
@click.option("--interrupted", is_flag=True, help="Resume every interrupted task.")
@click.option("--json", "as_json", is_flag=True)
def resume(task_id: Optional[str], interrupted: bool, as_json: bool) -> None:
    """Resume a task (or --interrupted: all of them) from the latest checkpoint."""
    if bool(task_id) == interrupted:
        raise click.UsageError("give a TASK_ID or --interrupted (one of them)")
    progress = None if as_json else print_progress
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
    _report_or_sent([api.rerun(task_id, on_progress=None if as_json else print_progress)], as_json)


def _report_or_sent(records: Sequence[TaskSummary], as_json: bool) -> None:
    if admin.runs_in_process():
        report_finished(records, as_json)
    else:
        report_sent(records)


@cli.command()
@click.argument("task_id")
def cancel(task_id: str) -> None:
    """Cancel a task: at once if idle, after its current step if running."""
    print_cancelled(task_id, api.cancel(task_id))


@cli.command()
@click.option("--thread", "thread_id", required=True, help="Delete every task of this thread.")
def delete(thread_id: str) -> None:
    """Delete a thread's tasks with their checkpoints, messages, traces, workspaces and write journals."""
    click.echo(f"deleted {admin.delete_thread(thread_id)} task(s) of thread {thread_id}")


def _import_apps(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> None:
    """Import the app modules of ``--app`` and `LONGHAUL_APP` before the command runs.

    ``--app`` modules are added to `LONGHAUL_APP`, so the worker processes
    `longhaul worker` starts import them too.
    """
    modules = apps.parse_app_modules([*settings.load_settings().app_modules, *value])
    apps.import_apps(modules)
    apps.add_to_environment(modules)


def _app_option() -> click.Option:
    return click.Option(["--app", "apps"], multiple=True, expose_value=False, is_eager=True, callback=_import_apps,
                        metavar="MODULE", help="Import this app module first (repeat for more; adds to "
                                               "LONGHAUL_APP): your agents, tools and providers.")


for _command in cli.commands.values():
    _command.params.insert(0, _app_option())


def main() -> None:
    cli(prog_name="longhaul")
