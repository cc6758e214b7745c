"""The `anthropic` provider: Anthropic's messages API over httpx, not streamed.

Settings: `LONGHAUL_ANTHROPIC_BASE_URL`, the key (`ANTHROPIC_API_KEY` or
`LONGHAUL_ANTHROPIC_API_KEY`), `LONGHAUL_ANTHROPIC_TIMEOUT_S` and
`LONGHAUL_ANTHROPIC_MAX_TOKENS`. Errors map as in the `openai` provider
(429, 5xx, 529 overloaded, lost connections: transient; other 4xx: permanent).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Optional

import httpx
from pydantic import BaseModel, ConfigDict, Field

from longhaul.models import ChatMessage, Usage, parse_tool_call_tags, strip_tool_call_tags, with_orphans_answered

from ..errors import TransientProviderError
from .base import AssistantTurn, StepContext
from .common import (
    SettingsProvider,
    int_field,
    json_body,
    make_tool_call,
    price_usd,
    secret_values,
    status_error,
    transport_error,
)
from .http_clients import shared_client

if TYPE_CHECKING:
    pass

NAME = "anthropic"
API_VERSION = "2023-06-01"
HINTS = {
    400: "the endpoint rejected the request (check the model name and the task's options)",
    401: "the API key was rejected: check ANTHROPIC_API_KEY / LONGHAUL_ANTHROPIC_API_KEY",
    403: "the API key may not use this model",
    404: "check LONGHAUL_ANTHROPIC_BASE_URL and the model name",
}


class AnthropicOptions(BaseModel):
    """The task options the anthropic provider reads."""

    model_config = ConfigDict(extra="forbid")

    #: Output tokens per answer (default: LONGHAUL_ANTHROPIC_MAX_TOKENS).
    max_tokens: Optional[int] = Field(default=None, ge=1)


class AnthropicProvider(SettingsProvider):
    """Messages against `settings.anthropic_base_url` (settings default to the environment's)."""

    name = NAME
    Options = AnthropicOptions

    def next_turn(self, ctx: StepContext) -> AssistantTurn:
        settings = self.settings
        if self._client is None:
            self._client = shared_client(settings.anthropic_base_url, timeout_s=settings.anthropic_timeout_s)
        url = settings.anthropic_base_url.rstrip("/") + "/v1/messages"
        secrets = secret_values(settings.anthropic_api_key)
        headers = {"anthropic-version": API_VERSION, **({"x-api-key": secrets[0]} if secrets else {})}
        system, messages = anthropic_messages(ctx.history)
        body: dict[str, Any] = {"model": ctx.model, "messages": messages,
                                "max_tokens": int(ctx.options.get("max_tokens") or settings.anthropic_max_tokens)}
        if system:
            body["system"] = system
        if ctx.tools:
            body["tools"] = [{"name": t.name, "description": t.description, "input_schema": t.json_schema()}
                             for t in ctx.tools]
        content, content_type = json_body(body)
        try:
            response = self._client.post(url, content=content, headers={**headers, **content_type})
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise transport_error(NAME, url, exc, secrets=secrets) from None
        if response.status_code >= 300:
            raise status_error(NAME, response, response.content, secrets=secrets, hints=HINTS)
        try:
            data = response.json()
            blocks = [b for b in data["content"] if isinstance(b, dict)]
        except (ValueError, KeyError, TypeError):
            raise TransientProviderError(f"{NAME}: the response has no content blocks; retrying later") from None
        return _turn(ctx, blocks, data.get("usage") or {}, settings.model_prices_usd_per_mtok)


def _turn(ctx: StepContext, blocks: list[dict[str, Any]], usage: dict[str, Any],
          prices: dict[str, tuple[float, float]]) -> AssistantTurn:
    thinking = "".join(b.get("thinking", "") for b in blocks if b.get("type") == "thinking")
    if thinking:
        ctx.emit("reasoning", {"text": thinking})
    content = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
    if content:
        ctx.emit("content", {"text": content})
    calls = [make_tool_call(str(b.get("id") or f"call_{ctx.step_index}_{i}"), b.get("name"), b.get("input"))
             for i, b in enumerate(b for b in blocks if b.get("type") == "tool_use")]
    if not calls:
        calls = [c.model_copy(update={"id": f"call_{ctx.step_index}_{i}"})
                 for i, c in enumerate(parse_tool_call_tags(content))]
    input_tokens, output_tokens = int_field(usage, "input_tokens"), int_field(usage, "output_tokens")
    return AssistantTurn(content=content, tool_calls=calls, usage=Usage(
        input_tokens=input_tokens, output_tokens=output_tokens,
        cache_read_tokens=int_field(usage, "cache_read_input_tokens"),
        cache_creation_tokens=int_field(usage, "cache_creation_input_tokens"), request_count=1,
        cost_usd=price_usd(prices, ctx.model, input_tokens, output_tokens)))


def anthropic_messages(history: Iterable[ChatMessage]) -> tuple[str, list[dict[str, Any]]]:
    """``(system, messages)``: system text joined; tool calls as ``tool_use``, results as ``tool_result``.

    Consecutive messages of one role merge into one, as the API wants turns to alternate. A tool call
    without a result gets a synthetic one (`with_orphans_answered`): the API refuses a lone ``tool_use``.
    """
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for message in with_orphans_answered(history):
        if message.role == "system":
            system.append(message.content)
            continue
        blocks: list[dict[str, Any]] = []
        if message.role == "tool":
            role = "user"
            blocks.append({"type": "tool_result", "tool_use_id": message.tool_call_id, "content": message.content}
                          if message.tool_call_id else {"type": "text", "text": message.content or "(empty)"})
        else:
            role = message.role
            text = strip_tool_call_tags(message.content) if message.tool_calls else message.content
            if text:
                blocks.append({"type": "text", "text": text})
            blocks += [{"type": "tool_use", "id": c.id, "name": c.name, "input": dict(c.arguments)}
                       for c in message.tool_calls or []]
        if not blocks:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += blocks
        else:
            messages.append({"role": role, "content": blocks})
    return "\n\n".join(system), messages
