"""The `openai` provider: any OpenAI-compatible chat-completions endpoint, over httpx.

Covers OpenAI itself and the servers that speak its protocol (Azure-style
gateways, vLLM, Ollama, LiteLLM, OpenRouter): set `LONGHAUL_OPENAI_BASE_URL`
and the key (`OPENAI_API_KEY` or `LONGHAUL_OPENAI_API_KEY`; none is sent when
unset, as local servers want).

- Tools go out as native ``tools`` (each `Tool.json_schema()`), and native
  ``tool_calls`` come back; a model that writes tool calls as text tags
  (``<tool_call>{...}</tool_call>`` and the other forms of
  `models.TOOL_CALL_TAGS`) gets them parsed when it sent no native ones.
- Arguments that are not a JSON object become a tool call that fails
  visibly (the model sees why), never a crashed task.
- Streaming (the default) reads server-sent events; each content and
  reasoning chunk is reported through ``ctx.emit`` as it arrives, and
  ``stream_options.include_usage`` asks for the usage at the end.
- 429, 5xx, lost connections and timeouts raise `TransientProviderError`
  (the task retries from its latest checkpoint after a backoff); other
  4xx raise `PermanentProviderError`. Neither message ever holds the key.
"""

from __future__ import annotations

import itertools
import json
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal, Optional, Sequence, Union

import httpx
from pydantic import BaseModel, ConfigDict, Field

from longhaul.models import (
    ChatMessage,
    ToolCall,
    Usage,
    parse_tool_call_tags,
    strip_tool_call_tags,
    with_orphans_answered,
)

from ..errors import PermanentProviderError, TransientProviderError
from .base import AssistantTurn, StepContext
from .common import (
    TRANSIENT_STATUSES,
    SettingsProvider,
    int_field,
    json_body,
    make_tool_call,
    price_usd,
    raw_arguments_of,
    redact,
    secret_values,
    status_error,
    transport_error,
)
from .http_clients import shared_client

if TYPE_CHECKING:
    from ..tools.base import Tool


class OpenAIOptions(BaseModel):
    """The task options sent through to the chat-completions request body as they are."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, ge=0, le=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    reasoning_effort: Optional[str] = Field(default=None, min_length=1)
    parallel_tool_calls: Optional[bool] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], dict[str, Any]]] = None
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)


#: Lines read after ``[DONE]`` at most, to end the body and keep the connection (see `drain`).
MAX_LINES_AFTER_DONE = 64

#: Task options passed through to the request body as they are.
REQUEST_OPTIONS = tuple(OpenAIOptions.model_fields)

#: What to do about each permanent status, said in the error message.
HINTS = {
    400: "the endpoint rejected the request (check the model name and the task's options)",
    401: "the API key was rejected: check OPENAI_API_KEY / LONGHAUL_OPENAI_API_KEY",
    403: "the API key may not use this model or endpoint",
    404: "check LONGHAUL_OPENAI_BASE_URL (it should end in /v1 for most servers) and the model name",
}

NAME = "openai"


class OpenAIProvider(SettingsProvider):
    """Chat completions against `settings.openai_base_url`.

    `settings` defaults to the environment's, read on first use; the
    process's one client for the base URL (`http_clients.shared_client`)
    serves every step of every task.
    """

    name = NAME
    Options = OpenAIOptions

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = shared_client(self.settings.openai_base_url, timeout_s=self.settings.openai_timeout_s)
        return self._client

    def close(self) -> None:
        """Let go of the client (the process's shared one stays open for the other tasks)."""
        self._client = None

    @property
    def url(self) -> str:
        return self.settings.openai_base_url.rstrip("/") + "/chat/completions"

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        """Ask the endpoint for the next turn; see the module docstring for errors."""
        stream = self.settings.openai_stream
        content, headers = json_body(request_body(ctx, stream=stream))
        secrets = secret_values(self.settings.openai_api_key)
        if secrets:
            headers["Authorization"] = f"Bearer {secrets[0]}"
        try:
            if stream:
                with self.client.stream("POST", self.url, content=content, headers=headers) as response:
                    if response.status_code >= 300:
                        raise status_error(NAME, response, response.read(), secrets=secrets, hints=HINTS)
                    lines = response.iter_lines()
                    answer = read_stream(lines, ctx, secrets=secrets)
                    drain(lines)
            else:
                response = self.client.post(self.url, content=content, headers=headers)
                if response.status_code >= 300:
                    raise status_error(NAME, response, response.content, secrets=secrets, hints=HINTS)
                answer = read_completion(response.content, ctx, secrets=secrets)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise transport_error(NAME, self.url, exc, secrets=secrets) from None
        return answer.turn(ctx, prices=self.settings.model_prices_usd_per_mtok)


# -- the request ------------------------------------------------------------------------------


def request_body(ctx: StepContext, *, stream: bool) -> dict[str, Any]:
    """The chat-completions request for this step."""
    body: dict[str, Any] = {"model": ctx.model, "messages": chat_messages(ctx.history)}
    if ctx.tools:
        body["tools"] = tool_specs(ctx.tools)
    for key in REQUEST_OPTIONS:
        if key in ctx.options:
            body[key] = ctx.options[key]
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def tool_specs(tools: Sequence[Tool]) -> list[dict[str, Any]]:
    return [{"type": "function",
             "function": {"name": tool.name, "description": tool.description, "parameters": tool.json_schema()}}
            for tool in tools]


def chat_messages(history: Iterable[ChatMessage]) -> list[dict[str, Any]]:
    """The history in the chat-completions shape.

    Assistant tool calls go out as native ``tool_calls`` (with their tags
    stripped from the text, so the model does not see each call twice),
    followed by one ``tool`` message per call carrying its ``tool_call_id`` (a synthetic one for a call
    whose result was never recorded, `with_orphans_answered`: endpoints refuse a call without one).
    """
    messages: list[dict[str, Any]] = []
    for message in with_orphans_answered(history):
        if message.role == "assistant" and message.tool_calls:
            text = strip_tool_call_tags(message.content)
            messages.append({"role": "assistant", "content": text or None,
                             "tool_calls": [_native_call(call) for call in message.tool_calls]})
        elif message.role == "tool" and message.tool_call_id:
            messages.append({"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content})
        elif message.role == "tool":  # a result without a call id cannot be a tool message
            messages.append({"role": "user", "content": f"[result of tool {message.name or '?'}]\n{message.content}"})
        else:
            messages.append({"role": message.role, "content": message.content})
    return messages


def _native_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": raw_arguments_of(call)}}


# -- the answer -----------------------------------------------------------------------------------


class Answer:
    """An answer being assembled, from one JSON body or from stream deltas."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}  # by the index the endpoint gave each call
        self.usage: Optional[dict[str, Any]] = None
        self.finish_reason: Optional[str] = None

    def add_text(self, ctx: StepContext, delta: dict[str, Any]) -> None:
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            self.reasoning.append(reasoning)
            ctx.emit("reasoning", {"text": reasoning})
        content = delta.get("content")
        if isinstance(content, list):  # content parts, as some servers answer
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if isinstance(content, str) and content:
            self.content.append(content)
            ctx.emit("content", {"text": content})

    def add_calls(self, calls: Any) -> None:
        """Merge native tool calls (whole, or streamed in fragments keyed by ``index``)."""
        for position, fragment in enumerate(calls if isinstance(calls, list) else []):
            if not isinstance(fragment, dict):
                continue
            index = fragment.get("index")
            index = index if isinstance(index, int) else len(self.calls) + position
            call = self.calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            function = fragment.get("function") or {}
            if fragment.get("id"):
                call["id"] = str(fragment["id"])
            if isinstance(function.get("name"), str):
                call["name"] += function["name"]
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                call["arguments"] += arguments
            elif arguments is not None:  # some servers send an object, not a JSON string
                call["arguments"] = arguments

    def turn(self, ctx: StepContext, *, prices: dict[str, tuple[float, float]]) -> AssistantTurn:
        content = "".join(self.content)
        step = ctx.step_index
        if self.calls:
            calls = [make_tool_call(call["id"] or f"call_{step}_{i}", call["name"], call["arguments"])
                     for i, (_, call) in enumerate(sorted(self.calls.items()))]
        else:  # models that write their calls into the text
            calls = [call.model_copy(update={"id": f"call_{step}_{i}"}) if call.id == f"call_{i}" else call
                     for i, call in enumerate(parse_tool_call_tags(content))]
        return AssistantTurn(content=content, tool_calls=calls, usage=self._usage(ctx.model, prices))

    def _usage(self, model: str, prices: dict[str, tuple[float, float]]) -> Usage:
        data = self.usage or {}
        input_tokens, output_tokens = int_field(data, "prompt_tokens"), int_field(data, "completion_tokens")
        cost = price_usd(prices, model, input_tokens, output_tokens)
        reported = data.get("cost")  # OpenRouter and LiteLLM report what the request cost
        if model not in prices and isinstance(reported, (int, float)) and 0 <= reported < float("inf"):
            cost = float(reported)
        return Usage(input_tokens=input_tokens, output_tokens=output_tokens,
                     cache_read_tokens=int_field(data, "prompt_tokens_details", "cached_tokens"),
                     reasoning_tokens=int_field(data, "completion_tokens_details", "reasoning_tokens"),
                     request_count=1, cost_usd=cost)


def read_completion(body: bytes, ctx: StepContext, *, secrets: list[str]) -> Answer:
    """Parse a whole (non-streamed) chat-completions response."""
    try:
        data = json.loads(body)
    except ValueError:
        raise TransientProviderError(f"{NAME}: the endpoint answered 200 with a body that is not JSON: "
                                     f"{redact(body.decode('utf-8', 'replace'), secrets)[:200]!r}") from None
    if not isinstance(data, dict):
        raise TransientProviderError(f"{NAME}: the endpoint answered 200 with JSON that is not an object")
    _raise_embedded_error(data, secrets)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise TransientProviderError(f"{NAME}: the response has no choices; retrying later")
    message = choices[0].get("message") or {}
    answer = Answer()
    answer.add_text(ctx, message)
    answer.add_calls(message.get("tool_calls"))
    answer.usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
    answer.finish_reason = choices[0].get("finish_reason")
    return answer


def read_stream(lines: Iterable[str], ctx: StepContext, *, secrets: list[str]) -> Answer:
    """Assemble a streamed answer from server-sent event lines, emitting text as it arrives."""
    answer = Answer()
    done = False
    for chunk in sse_json(lines):
        if chunk is None:  # data: [DONE]
            done = True
            break
        _raise_embedded_error(chunk, secrets)
        if isinstance(chunk.get("usage"), dict):
            answer.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or choice.get("message") or {}
            answer.add_text(ctx, delta)
            answer.add_calls(delta.get("tool_calls"))
            answer.finish_reason = choice.get("finish_reason") or answer.finish_reason
    if not done and answer.finish_reason is None:
        raise TransientProviderError(f"{NAME}: the stream ended before the answer was complete; retrying later")
    return answer


def drain(lines: Iterator[str], *, limit: int = MAX_LINES_AFTER_DONE) -> None:
    """Read what the body holds after ``[DONE]`` (the end of a chunked body), so the connection is kept.

    A response left unread to its end is closed, not returned to the
    client's pool: the next turn would open a new connection (a TLS
    handshake on a real endpoint). A server that keeps sending past
    `limit` lines has its connection closed instead, and one that breaks
    off after ``[DONE]`` costs nothing but the connection: the answer is
    complete (and paid for), so it is never asked for again.
    """
    try:
        for _ in itertools.islice(lines, limit):
            pass
    except httpx.HTTPError:  # the answer is whole already: a body cut short after it only costs the connection
        pass


def sse_json(lines: Iterable[str]) -> Iterator[Optional[dict[str, Any]]]:
    """The JSON objects of a server-sent event stream; None for ``[DONE]``.

    Events are ``data:`` lines ended by a blank line (several data lines
    join with newlines); comments and other fields are skipped.
    """
    data: list[str] = []

    def flush() -> Iterator[Optional[dict[str, Any]]]:
        payload = "\n".join(data)
        data.clear()
        if payload.strip() == "[DONE]":
            yield None
            return
        try:
            values = [json.loads(payload)]
        except ValueError:  # lenient: servers that skip the blank line between events
            try:
                values = [json.loads(part) for part in payload.split("\n") if part.strip() and part != "[DONE]"]
            except ValueError:
                raise TransientProviderError(f"{NAME}: the stream sent an event that is not JSON; "
                                             "retrying later") from None
        yield from (v for v in values if isinstance(v, dict))

    for line in lines:
        if not line:
            if data:
                yield from flush()
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield from flush()


def _raise_embedded_error(data: dict[str, Any], secrets: list[str]) -> None:
    """Some gateways answer 200 and put the error in the body (or mid-stream)."""
    error = data.get("error")
    if not error:
        return
    message = error.get("message", error) if isinstance(error, dict) else error
    code = error.get("code") if isinstance(error, dict) else None
    status = code if isinstance(code, int) else None
    text = redact(f"{NAME}: the endpoint reported an error{f' {status}' if status else ''}: {message}", secrets)
    if status is not None and status < 500 and status not in TRANSIENT_STATUSES:
        raise PermanentProviderError(text, status_code=status)
    raise TransientProviderError(text + "; retrying later", status_code=status)
