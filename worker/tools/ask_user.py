"""`ask_user`: the built-in tool with which a model asks the user a question and waits for the answer."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..errors import WaitForReply
from .base import ToolContext, define_tool


class AskUserArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=4000, description="What to ask the user, as they will read it.")


@define_tool("ask_user")
def _ask_user(args: AskUserArgs, ctx: ToolContext) -> str:
    """Ask the user a question and wait for their reply, which is this call's result. Use it when you need
    information or a decision only the user can give; the task pauses (for minutes or days) until they answer."""
    raise WaitForReply(args.question)


ASK_USER = _ask_user
