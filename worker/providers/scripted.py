"""The deterministic `scripted` provider, for demos and exactly-once tests.

With ``steps=N`` it plans N steps. In step i the assistant calls the
``ledger`` tool (as a ``<tool_call>`` tag in its text, the way many models
write tool calls) to append ``<task_id> step <i>``; after step N it answers.
Its answer depends only on the step index, so a resumed task asks for
exactly the step after its latest checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from longhaul.models import parse_tool_call_tags

from .base import AssistantTurn, StepContext, TransientProviderError

DEFAULT_STEPS = 3


class ScriptedOptions(BaseModel):
    """The task options the scripted provider reads (its ledger tool declares its own)."""

    model_config = ConfigDict(extra="forbid")

    #: How many ledger steps to plan before answering.
    steps: int = Field(default=DEFAULT_STEPS, ge=0, le=1_000_000)
    #: Fault injection: one transient failure at this step, remembered by the marker file.
    fail_once_at_step: Optional[int] = Field(default=None, ge=1)
    fail_once_marker: Optional[str] = Field(default=None, min_length=1)
    #: Fault injection: every step first answers one rate limit, remembered as a file in this folder.
    rate_limit_each_step_dir: Optional[str] = Field(default=None, min_length=1)


class ScriptedProvider:
    name = "scripted"
    Options = ScriptedOptions

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        steps = int(ctx.options.get("steps", DEFAULT_STEPS))
        self._maybe_fail(ctx)
        if ctx.step_index > steps:
            return AssistantTurn(content=f"Done: {steps} steps recorded in the ledger for {ctx.task_id}.")
        payload = {"name": "ledger", "arguments": {"line": f"{ctx.task_id} step {ctx.step_index}"}}
        text = (
            f"Step {ctx.step_index}/{steps}: appending to the ledger.\n"
            f"<tool_call>{json.dumps(payload)}</tool_call>"
        )
        return AssistantTurn(content=text, tool_calls=parse_tool_call_tags(text))

    @staticmethod
    def _maybe_fail(ctx: StepContext) -> None:
        """Fault injection: ``fail_once_at_step=i`` with ``fail_once_marker=PATH``.

        Raises one transient error at step i; the marker file records that
        it happened, so the retry (in any process) goes through. With
        ``rate_limit_each_step_dir=DIR``, every step first answers a rate
        limit once (a marker per step in DIR), as a busy API does.
        """
        rate_limits = ctx.options.get("rate_limit_each_step_dir")
        if rate_limits is not None:
            marker = Path(str(rate_limits)) / f"{ctx.task_id}.{ctx.step_index}"
            if not marker.exists():
                marker.touch()
                raise TransientProviderError(f"scripted provider: 429 rate limited at step {ctx.step_index}")
        fail_at = ctx.options.get("fail_once_at_step")
        marker = ctx.options.get("fail_once_marker")
        if fail_at is None or marker is None or ctx.step_index != int(fail_at):
            return
        path = Path(str(marker))
        if path.exists():
            return
        path.write_text(f"{ctx.task_id} failed at step {ctx.step_index}\n")
        raise TransientProviderError(f"scripted provider: injected transient failure at step {ctx.step_index}")
