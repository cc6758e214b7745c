"""Agents: named definitions (instructions, provider, model, tools, limits) that tasks run.

An `Agent` built at module level of an app module registers itself under
its name when the module is imported, as Dramatiq's actors do. A task
created for an agent stores the whole definition and a short version hash
(`AgentSpec`), and the worker runs it with what was stored: a deploy that
changes an agent changes the tasks created after it, never the tasks in
flight. Workers therefore need an agent's tools and provider, not the
agent itself.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from typing import Any, Optional, Sequence, Union

import orjson
from pydantic import ValidationError

from longhaul.models import AgentSpec, Budget

from .errors import DuplicateAgent, UnknownAgent
from .tools import Tool
from .validation import invalid_input

#: Characters of the definition's sha256 kept as its version: short to read, long enough not to collide.
VERSION_CHARS = 12


class Agent:
    """A named agent; constructing one registers it in this process.

    ``longhaul.enqueue(prompt, agent="name")`` (and ``run_inline``, ``longhaul
    run --agent``) run it; arguments given to those calls override its
    fields. `instructions` become the first (system) message the provider
    sees. `tools` are tool names or `Tool` objects (``@longhaul.tool()``);
    `options` are provider options, checked like a task's.
    """

    def __init__(
        self,
        *,
        name: str,
        instructions: Optional[str] = None,
        provider: Optional[str] = None,
        model: Optional[str] = None,
        tools: Optional[Sequence[Union[str, Tool]]] = None,
        max_steps: Optional[int] = None,
        time_limit_s: Optional[float] = None,
        budget: Optional[Budget] = None,
        options: Optional[dict[str, Any]] = None,
    ) -> None:
        fields: dict[str, Any] = dict(
            name=name, instructions=instructions, provider=provider, model=model,
            tools=None if tools is None else [t.name if isinstance(t, Tool) else t for t in tools],
            max_steps=max_steps, time_limit_s=time_limit_s, budget=budget, options=options or {},
        )
        try:
            unversioned = AgentSpec.model_validate({**fields, "version": "-"})
        except ValidationError as exc:
            raise invalid_input(exc, prefix=f"Agent({name!r})") from None
        self.spec = unversioned.model_copy(update={"version": definition_version(unversioned)})
        self.defined_at = _caller_location()
        register_agent(self)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    def __repr__(self) -> str:
        return f"Agent(name={self.name!r}, version={self.version!r}, defined at {self.defined_at})"


def definition_version(spec: AgentSpec) -> str:
    """A short hash of everything in the definition but its version."""
    canonical = orjson.dumps(spec.model_dump(mode="json", exclude={"version"}), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:VERSION_CHARS]


AGENTS: dict[str, Agent] = {}


def register_agent(agent: Agent) -> None:
    """Register `agent` under its name.

    The same definition site registering again (a module imported twice,
    or reloaded) replaces the old one; a second site is `DuplicateAgent`.
    """
    existing = AGENTS.get(agent.name)
    if existing is not None and existing.defined_at != agent.defined_at:
        raise DuplicateAgent(agent.name, existing.defined_at, agent.defined_at)
    AGENTS[agent.name] = agent


def get_agent(name: str) -> Agent:
    """The registered agent of this name; `UnknownAgent` if this process has none."""
    agent = AGENTS.get(name)
    if agent is None:
        raise UnknownAgent(name, list(AGENTS))
    return agent


def _caller_location() -> str:
    """``file:line`` of the code that built the agent (the first frame outside this module)."""
    frame = inspect.currentframe()
    here = os.path.abspath(__file__)
    while frame is not None and os.path.abspath(frame.f_code.co_filename) == here:
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"
