"""Budgets: what a task has spent so far, and the check made before every model and tool call.

Spend starts from the task row's stored totals (assistant turns, tool
calls, tokens, cost), which every checkpoint and finish add to in the same
transaction as the step, and grows with the current run's calls. So a
budget holds across resumes, retries and SIGKILL: a step lost in a crash
was not stored and is not counted, and it runs again in full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from longhaul.models import Budget, TaskSummary, Usage

from .errors import BudgetExceeded

CallKind = Literal["model call", "tool call"]


@dataclass
class Spend:
    """What a task has used: stored totals plus the current run's calls."""

    model_calls: int = 0
    tool_calls: int = 0
    tokens: int = 0
    cost_usd: float = 0.0

    @classmethod
    def stored(cls, summary: TaskSummary) -> Spend:
        return cls(model_calls=summary.turn_count, tool_calls=summary.tool_call_count,
                   tokens=summary.usage.total_tokens, cost_usd=summary.usage.cost_usd)

    def add_model_call(self, usage: Optional[Usage]) -> None:
        self.model_calls += 1
        if usage is not None:
            self.tokens += usage.total_tokens
            self.cost_usd += usage.cost_usd


def check_budget(task_id: str, budget: Optional[Budget], spend: Spend, before: CallKind) -> None:
    """Raise `BudgetExceeded` if the task may not make the next call of this kind.

    Before a model call: no model calls left, or the tokens or cost reached.
    Before a tool call: no tool calls left, or the tokens or cost passed
    (the model call that passed them was already paid for; its tools are not run).
    """
    if budget is None:
        return
    model_call = before == "model call"
    counted = (("max_model_calls", budget.max_model_calls, spend.model_calls, "model calls") if model_call
               else ("max_tool_calls", budget.max_tool_calls, spend.tool_calls, "tool calls"))
    amounts = (("max_tokens", budget.max_tokens, spend.tokens, "tokens"),
               ("max_cost_usd", budget.max_cost_usd, spend.cost_usd, "USD"))
    limit, limit_value, used, unit = counted
    if limit_value is not None and used >= limit_value:
        raise BudgetExceeded(task_id, limit, limit_value, used, unit)
    for limit, limit_value, used, unit in amounts:
        if limit_value is not None and (used >= limit_value if model_call else used > limit_value):
            raise BudgetExceeded(task_id, limit, limit_value, used, unit)
