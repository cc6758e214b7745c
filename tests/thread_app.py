"""An app module for the thread tests (``LONGHAUL_APP=tests.thread_app`` in worker processes).

`thread-echo` answers each prompt with the prompts it saw answered before it
in its history, so a test can tell exactly which earlier answers a task
started from; it streams its answer in chunks (optionally slowly) and can
first take `tool_steps` steps of the ``ledger`` tool.
"""

from __future__ import annotations

import json
import re
import time

from pydantic import BaseModel, ConfigDict, Field

import longhaul

#: ``answer to 'PROMPT'; seen=[P1|P2|...]``
ANSWER = re.compile(r"^answer to '(?P<prompt>[^']*)'; seen=\[(?P<seen>.*)\]$")


class ThreadEchoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tool_steps: int = Field(default=0, ge=0)
    chunks: int = Field(default=4, ge=1)
    chunk_delay_s: float = Field(default=0.0, ge=0)
    #: Step 1 asks the user this (`ask_user`), or calls `deploy` (needs approval) with ``deploy=True``.
    ask: str = ""
    deploy: bool = False
    #: Seconds each model call takes before answering (to land a steer during a running task).
    think_s: float = Field(default=0.0, ge=0)


class DeployArgs(BaseModel):
    target: str


@longhaul.tool(needs_approval=True)
def deploy(args: DeployArgs, ctx: longhaul.ToolContext) -> str:
    """Deploy to a target (needs the user's approval)."""
    return f"deployed to {args.target}"


def seen_prompts(answer: str) -> list[str]:
    """The prompts an answer says it saw answered before it."""
    match = ANSWER.match(answer)
    assert match is not None, answer
    return [p for p in match["seen"].split("|") if p]


class ThreadEcho:
    name = "thread-echo"
    Options = ThreadEchoOptions

    def next_turn(self, ctx: longhaul.StepContext) -> longhaul.AssistantTurn:
        options = ThreadEchoOptions(**{k: v for k, v in ctx.options.items() if k in ThreadEchoOptions.model_fields})
        time.sleep(options.think_s)
        if (options.ask or options.deploy) and ctx.step_index == 1:
            call = (longhaul.ToolCall(id="ask1", name="ask_user", arguments={"question": options.ask}) if options.ask
                    else longhaul.ToolCall(id="dep1", name="deploy", arguments={"target": "prod"}))
            return longhaul.AssistantTurn("", [call])
        if (options.ask or options.deploy) and ctx.history and ctx.history[-1].role == "tool":
            return longhaul.AssistantTurn(f"got: {ctx.history[-1].content}")
        if ctx.step_index <= options.tool_steps:
            call = longhaul.ToolCall(id=f"c{ctx.step_index}", name="ledger",
                                     arguments={"line": f"{ctx.task_id} step {ctx.step_index}"})
            return longhaul.AssistantTurn(f"step {ctx.step_index}: {json.dumps(call.arguments)}", [call])
        users = [m.content for m in ctx.history if m.role == "user"]
        earlier = [m.group("prompt") for m in (ANSWER.match(a.content) for a in ctx.history
                                               if a.role == "assistant") if m]
        answer = f"answer to {users[-1]!r}; seen=[{'|'.join(earlier)}]".replace('"', "'")
        size = max(1, -(-len(answer) // options.chunks))
        for start in range(0, len(answer), size):
            ctx.emit("content", {"text": answer[start:start + size]})
            time.sleep(options.chunk_delay_s)
        return longhaul.AssistantTurn(answer)


longhaul.register_provider("thread-echo", ThreadEcho)
