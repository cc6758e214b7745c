"""Pydantic models: everything that enters or leaves the task store.

Inputs (`TaskSnapshot`, `CheckpointUpdate`, `TaskSpec`, ...) forbid unknown
fields and validate types, so a bad value fails with a `ValidationError` that
names the field *before* anything is written.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal, Optional, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    StringConstraints,
    model_serializer,
    model_validator,
)

from .redact import scrub_configured

_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1


def _encodable(text: str) -> str:
    """Refuse text the database cannot store (an unpaired surrogate is not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid UTF-8 (it holds an unpaired surrogate)") from None
    return text


def _storable(value: JsonValue) -> JsonValue:
    """Refuse JSON the store cannot write: integers beyond 64 bits, text that is not UTF-8."""
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _UINT64_MAX:
            raise ValueError("integers must fit in 64 bits")
    elif isinstance(value, str):
        _encodable(value)
    elif isinstance(value, list):
        for item in value:
            _storable(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _encodable(key)
            _storable(item)
    return value


#: Text that can be stored; the configured secrets (API keys) never are, whoever echoes them.
Text = Annotated[str, AfterValidator(_encodable), AfterValidator(scrub_configured)]
#: A JSON value that can be stored.
Json = Annotated[JsonValue, AfterValidator(_storable)]
#: An identifier: non-empty, no whitespace, short enough to index.
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^\S+$"),
                      AfterValidator(_encodable)]
#: A short label (channel, provider, model name).
Label = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(_encodable)]


class TaskStatus(str, Enum):
    """Lifecycle of a task, stored as text."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    #: Waiting for a reply or an approval (`ask_user`, `WaitForReply`, ``needs_approval``): no lease, no worker.
    WAITING = "waiting"

    @property
    def is_terminal(self) -> bool:
        """True once the task will not run again unless it is rerun."""
        return self in _TERMINAL

    def __str__(self) -> str:
        return self.value


_TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.TIMED_OUT})


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", revalidate_instances="subclass-instances", allow_inf_nan=False)


class InvalidArguments(_Input):
    """Tool-call arguments a provider could not decode into a JSON object.

    The call is not run: the model gets a failed result naming `problem`,
    and the history replays `raw` (the text it sent, cut to a quote).
    """

    problem: Text
    raw: Text = ""


#: Where rows stored before `ToolCall.invalid_arguments` existed carry that field: a key inside `arguments`.
_STORED_INVALID_ARGUMENTS_KEY = "__longhaul_invalid_arguments__"


class ToolCall(_Input):
    """One tool invocation requested by the assistant.

    `invalid_arguments` is set (and `arguments` empty) when the model's
    arguments were not a JSON object. It is left out of the dumped form
    when unset, so a well-formed call serialises as it always has.
    """

    id: Text = Field(default="", max_length=200)
    name: Label
    arguments: dict[str, Json] = Field(default_factory=dict)
    invalid_arguments: Optional[InvalidArguments] = None

    @model_validator(mode="before")
    @classmethod
    def _read_stored_marker(cls, data: Any) -> Any:
        """Read a stored call whose bad arguments sit under the marker key as `invalid_arguments`."""
        if isinstance(data, dict) and isinstance(data.get("arguments"), dict):
            marker = data["arguments"].get(_STORED_INVALID_ARGUMENTS_KEY)
            if isinstance(marker, dict) and "invalid_arguments" not in data:
                return {**data, "arguments": {},
                        "invalid_arguments": {"problem": str(marker.get("problem", "")),
                                              "raw": str(marker.get("raw", ""))}}
        return data

    @model_serializer(mode="wrap")
    def _dump_without_unset_invalid_arguments(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped = handler(self)
        if dumped.get("invalid_arguments", ...) is None:
            del dumped["invalid_arguments"]
        return dumped


Role = Literal["system", "user", "assistant", "tool"]
ROLES = frozenset(get_args(Role))


class ChatMessage(_Input):
    """One message of a conversation, in the chat-completions shape."""

    role: Role
    content: Text
    tool_call_id: Optional[Text] = None
    name: Optional[Text] = None
    tool_calls: Optional[list[ToolCall]] = None

    @classmethod
    def user(cls, content: str) -> ChatMessage:
        return cls(role="user", content=content)

    @classmethod
    def assistant(cls, content: str, tool_calls: Optional[list[ToolCall]] = None) -> ChatMessage:
        return cls(role="assistant", content=content, tool_calls=tool_calls or None)

    @classmethod
    def system(cls, content: str) -> ChatMessage:
        return cls(role="system", content=content)


#: Shared by every stored message: it names every field already, and pydantic only ever adds
#: field names to it (on assignment; copies get their own), so it never changes. One set fewer
#: per message.
_ALL_MESSAGE_FIELDS = set(ChatMessage.model_fields)
_set_attribute = object.__setattr__


def stored_message(role: Any, content: Any, tool_call_id: Any, name: Any,
                   tool_calls: Optional[list[ToolCall]]) -> ChatMessage:
    """A `ChatMessage` from columns the store wrote, without validating it again.

    Every stored message was validated on its way in, and resuming a long
    task rebuilds thousands of them: full validation would cost more than
    fetching the rows. Only what a damaged cell could break is checked (a
    role outside `Role`, a non-text column); that raises ValueError.
    """
    if (role not in ROLES or content.__class__ is not str
            or (tool_call_id is not None and tool_call_id.__class__ is not str)
            or (name is not None and name.__class__ is not str)):
        raise ValueError(_damage(role, content, tool_call_id, name))
    message = ChatMessage.__new__(ChatMessage)
    # What pydantic's own constructor leaves on an instance with every field given.
    _set_attribute(message, "__dict__", {"role": role, "content": content, "tool_call_id": tool_call_id,
                                         "name": name, "tool_calls": tool_calls})
    _set_attribute(message, "__pydantic_fields_set__", _ALL_MESSAGE_FIELDS)
    _set_attribute(message, "__pydantic_extra__", None)
    _set_attribute(message, "__pydantic_private__", None)
    return message


def _damage(role: Any, content: Any, tool_call_id: Any, name: Any) -> str:
    """What is wrong with the columns `stored_message` refused."""
    if role not in ROLES:
        return f"role: {role!r} is not one of {sorted(ROLES)}"
    for field, value in (("content", content), ("tool_call_id", tool_call_id), ("name", name)):
        if not isinstance(value, str) and (value is not None or field == "content"):
            return f"{field}: expected text, got {type(value).__name__}"
    return "unreadable message"


class CheckpointItem(_Input):
    """The outcome of one tool call within a step."""

    tool_name: Label
    arguments: dict[str, Json] = Field(default_factory=dict)
    success: bool
    output: Text


class Budget(_Input):
    """Limits on what one task may spend, summed over all its runs (resumes, retries, restarts).

    Unset limits do not apply. A count limit stops the task before the call
    that would pass it; a token or cost limit before the next model call
    once reached (a model call's spend is known only after it).
    """

    model_config = ConfigDict(frozen=True)

    #: Model calls (assistant turns) the task may make.
    max_model_calls: Optional[int] = Field(default=None, ge=0)
    #: Tool calls the task may run.
    max_tool_calls: Optional[int] = Field(default=None, ge=0)
    #: Input plus output tokens the provider may report.
    max_tokens: Optional[int] = Field(default=None, ge=0)
    #: USD the provider's answers may cost (see LONGHAUL_MODEL_PRICES_USD_PER_MTOK).
    max_cost_usd: Optional[float] = Field(default=None, ge=0)

    def merged_over(self, base: Optional[Budget]) -> Budget:
        """This budget's limits, with `base`'s where this one sets none."""
        if base is None:
            return self
        return Budget(**{**base.model_dump(exclude_none=True), **self.model_dump(exclude_none=True)})

    @property
    def is_empty(self) -> bool:
        return all(value is None for value in self.model_dump().values())


class AgentSpec(_Input):
    """An agent's definition as a task stored it when it was created (see `longhaul.Agent`)."""

    name: Identifier
    #: A short hash of every other field: it changes whenever the definition does.
    version: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    instructions: Optional[Text] = None
    provider: Optional[Label] = None
    model: Optional[Label] = None
    tools: Optional[list[Label]] = None
    max_steps: Optional[int] = Field(default=None, ge=1, le=1_000_000)
    time_limit_s: Optional[float] = Field(default=None, gt=0)
    budget: Optional[Budget] = None
    options: dict[str, Json] = Field(default_factory=dict)


class TaskSpec(_Input):
    """What to run: everything a worker needs, stored with the task.

    The spec lives in the store, not in the broker message, so a lost
    message never means a lost task.
    """

    prompt: Annotated[str, StringConstraints(min_length=1, strip_whitespace=True), AfterValidator(_encodable)]
    #: Safety stop: the task fails if it would take more tool steps than this.
    max_steps: Optional[int] = Field(default=None, ge=1, le=1_000_000)
    #: Wall-clock budget from the first step, across resumes, in seconds.
    time_limit_s: Optional[float] = Field(default=None, gt=0)
    #: Provider and tool options (e.g. the scripted provider's ``steps``).
    options: dict[str, Json] = Field(default_factory=dict)
    #: How long the task may wait for a reply or an approval before it ends `timed_out` (None: forever).
    reply_timeout_s: Optional[float] = Field(default=None, gt=0)
    #: The agent the task runs, as defined when the task was created: its instructions are
    #: the first (system) message the provider sees, however the agent changes later.
    agent: Optional[AgentSpec] = None
    #: What the task may spend in all (the agent's limits, overridden by the task's own).
    budget: Optional[Budget] = None


class _TaskIdentity(_Input):
    task_id: Identifier
    thread_id: Identifier
    channel: Label
    provider: Label
    model: Label


class TaskSnapshot(_TaskIdentity):
    """The whole visible state of a task, upserted by `TaskStore.save_snapshot`."""

    status: TaskStatus
    execution_history: list[ChatMessage] = Field(default_factory=list)
    resumable_history: list[ChatMessage] = Field(default_factory=list)
    latest_checkpoint_note: Optional[Text] = None
    final_response: Optional[Text] = None
    last_error: Optional[Text] = None


class CheckpointUpdate(_TaskIdentity):
    """One completed step: the messages it appended and what its tools did."""

    step_index: int = Field(ge=0)
    new_messages: list[ChatMessage] = Field(default_factory=list)
    checkpoint_note: Optional[Text] = None
    items: list[CheckpointItem] = Field(default_factory=list)


class Usage(BaseModel):
    """Tokens, requests and cost, per model answer or summed over a task."""

    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    cache_read_tokens: int = Field(default=0, ge=0)
    cache_creation_tokens: int = Field(default=0, ge=0)
    reasoning_tokens: int = Field(default=0, ge=0)
    request_count: int = Field(default=0, ge=0)
    cost_usd: float = Field(default=0.0, ge=0, allow_inf_nan=False)

    def __add__(self, other: Usage) -> Usage:
        return Usage(**{name: getattr(self, name) + getattr(other, name) for name in Usage.model_fields})

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class TaskCheckpointRecord(BaseModel):
    """A stored checkpoint, as loaded."""

    step_index: int
    checkpoint_note: Optional[str]
    items: list[CheckpointItem]
    created_at: datetime


class LeaseInfo(BaseModel):
    """Who holds a running task, and until when."""

    owner: str
    host: str
    pid: int
    expires_at: datetime


class TaskSummary(BaseModel):
    """A task without its histories: what listings show."""

    task_id: str
    thread_id: str
    channel: str
    provider: str
    model: str
    status: TaskStatus
    checkpoint_count: int
    message_count: int
    recovery_count: int
    final_response: Optional[str]
    last_error: Optional[str]
    created_at: datetime
    updated_at: datetime
    started_at: Optional[datetime]
    completed_at: Optional[datetime]
    lease: Optional[LeaseInfo] = None
    turn_count: int = 0
    tool_call_count: int = 0
    usage: Usage = Field(default_factory=Usage)


class TaskRecord(TaskSummary):
    """Everything stored about a task, histories rebuilt in order."""

    spec: Optional[TaskSpec]
    execution_history: list[ChatMessage]
    resumable_history: list[ChatMessage]
    latest_checkpoint_note: Optional[str]
    cancel_requested: bool
    #: The highest checkpointed step, 0 before the first.
    last_step_index: int = 0
    #: Empty when loaded with ``checkpoints=False`` (what a resume needs is `last_step_index`).
    checkpoints: list[TaskCheckpointRecord] = Field(default_factory=list)

