"""What the ``longhaul`` command parses: the task options `run` and `enqueue` share, counts, durations, points
in time, and the check that every text argument is UTF-8."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import click
import orjson

from longhaul.models import Budget, InvalidInput
from longhaul.models.thread_admission import IF_BUSY_CHOICES

#: The largest count any option takes: what the store's 64-bit integer columns hold.
MAX_COUNT = 2**63 - 1
#: The longest duration an option takes (100 years): anything longer is a typo, and overflows dates.
MAX_DURATION_S = 100 * 365.25 * 86400


def count(minimum: int) -> click.IntRange:
    """A whole-number option from `minimum` up to `MAX_COUNT`, refused naming the option beyond that."""
    return click.IntRange(min=minimum, max=MAX_COUNT)


class LonghaulCommand(click.Command):
    """A command whose text arguments must be UTF-8.

    Python hands an argument holding bytes that are not UTF-8 (``show $'\\xff'``)
    over with lone surrogates in it, which no store, log or terminal can
    take: it is refused as a usage error naming the argument.
    """

    def invoke(self, ctx: click.Context) -> Any:
        for param in self.params:
            values = ctx.params.get(param.name or "")
            for value in values if isinstance(values, (tuple, list)) else (values,):
                if isinstance(value, str):
                    try:
                        value.encode("utf-8")
                    except UnicodeEncodeError:
                        shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                        raise click.BadParameter(f"'{shown}' is not UTF-8 text", ctx=ctx, param=param) from None
        return super().invoke(ctx)


def task_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options `run` and `enqueue` share."""
    options = [
        click.option("--agent", help="Run this agent (defined in an app module); other options override it."),
        click.option("--thread", "thread_id", help="Thread id: continue this conversation's history."),
        click.option("--task-id", help="Use this task id instead of a generated one."),
        click.option("--if-busy", type=click.Choice(IF_BUSY_CHOICES),
                     help="The thread has an unfinished task: run after it (enqueue, the default), refuse "
                          "(reject, exit 1), stop it at its next step and run after it (interrupt), or add this "
                          "message to its history before its next model call (steer). A thread whose task waits for a "
                          "reply takes the message as that reply."),
        click.option("--channel", default="cli", show_default=True, help="Where the task came from."),
        click.option("--provider", help="Model provider (default: LONGHAUL_DEFAULT_PROVIDER, 'scripted')."),
        click.option("--model", help="Model name for the provider."),
        click.option("--steps", type=count(1), help="Scripted provider: how many steps to plan."),
        click.option("--step-delay", type=click.FloatRange(min=0), help="Ledger tool: seconds to wait per step."),
        click.option("--ledger", type=click.Path(dir_okay=False, path_type=Path),
                     help="Ledger tool: file that records every executed step."),
        click.option("--max-steps", type=count(1), help="Fail the task past this many steps."),
        click.option("--time-limit", "time_limit_s", type=click.FloatRange(min=0, min_open=True),
                     help="Seconds the task may run in all, across resumes."),
        click.option("--reply-timeout", "reply_timeout_s", type=click.FloatRange(min=0, min_open=True),
                     help="Seconds the task may wait for a reply or an approval, then it ends timed_out."),
        click.option("--tool", "tools", multiple=True,
                     help="A tool the task may call (repeat for more; default: the agent's, else every tool)."),
        click.option("--max-model-calls", type=count(0), help="Budget: model calls in all."),
        click.option("--max-tool-calls", type=count(0), help="Budget: tool calls in all."),
        click.option("--max-tokens", type=count(0), help="Budget: input + output tokens in all."),
        click.option("--max-cost-usd", type=click.FloatRange(min=0), help="Budget: USD of model answers in all."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def submit_kwargs(steps: Optional[int], step_delay: Optional[float], ledger: Optional[Path],
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


def read_task_lines(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The JSON objects of a JSON Lines file (``-``: stdin), blank lines skipped, and each one's line number.

    `InvalidInput` naming the file and line for a line that is not a JSON object.
    """
    try:
        text = click.get_text_stream("stdin").read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"--file {str(path)!r}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    items, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"--file {str(path)!r} line {number}: not JSON ({exc})") from None
        if not isinstance(item, dict):
            raise InvalidInput(f"--file {str(path)!r} line {number}: expected a JSON object of enqueue's arguments "
                               f"(\"prompt\", \"task_id\", ...), got {type(item).__name__}")
        items.append(item)
        lines.append(number)
    return items, lines


class CountOrAll(click.ParamType):
    """A whole number from 0 up to `MAX_COUNT`, or ``all`` (None: no limit)."""

    name = "count|all"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Optional[int]:
        if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
            return None
        return int(count(0).convert(value, param, ctx))


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
        if not math.isfinite(seconds) or seconds > MAX_DURATION_S:
            self.fail(f"{value!r} is not a duration of at most 100 years", param, ctx)
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
