"""The `ledger` tool: append a line to a file, durably, then wait.

It is the scripted provider's only tool. Because every line is fsync'd
before the step's checkpoint is written, the ledger shows exactly which
steps ran, and how often, through any number of kills.
"""

from __future__ import annotations

import os
import time
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from .base import Tool, ToolContext


class LedgerArguments(BaseModel):
    line: str = Field(min_length=1, max_length=10_000)


class LedgerOptions(BaseModel):
    """The task options the ledger tool reads."""

    model_config = ConfigDict(extra="forbid")

    #: The ledger file: one fsync'd line per executed step (none: lines are not written anywhere).
    ledger_path: Optional[str] = Field(default=None, min_length=1)
    #: Seconds to wait after each line (to make a task slow enough to interrupt).
    step_delay_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)


def append_to_ledger(args: LedgerArguments, ctx: ToolContext) -> str:
    path = ctx.options.get("ledger_path")
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(str(path))), exist_ok=True)
        fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (args.line.replace("\n", " ") + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    delay_s = float(ctx.options.get("step_delay_s", 0) or 0)
    if delay_s > 0:
        time.sleep(delay_s)
    return f"appended {args.line!r}" + (f" to {path}" if path else " (no ledger file configured)")


LEDGER = Tool(
    name="ledger",
    description="Append one line to the task's ledger file.",
    arguments=LedgerArguments,
    run=append_to_ledger,
    options=LedgerOptions,
)
