"""The small `anthropic` provider against a fake messages endpoint on loopback."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from longhaul.models import ChatMessage, ToolCall, Usage
from longhaul.worker import load_settings
from longhaul.worker.providers import PermanentProviderError, StepContext, TransientProviderError
from longhaul.worker.providers.anthropic import AnthropicProvider
from longhaul.worker.tools import LEDGER

from .fake_openai import LoopbackServer, Recorded, Reply

API_KEY = "lh-anthropic-key-0c4e2a9d7b"
MESSAGES_PATH = "/v1/messages"


@pytest.fixture
def fake_anthropic() -> Iterator[LoopbackServer]:
    server = LoopbackServer().start()
    yield server
    server.stop()


@pytest.fixture
def provider(fake_anthropic: LoopbackServer) -> AnthropicProvider:
    return AnthropicProvider(settings=load_settings(anthropic_base_url=fake_anthropic.url,
                                                    anthropic_api_key=API_KEY, anthropic_max_tokens=512))


def respond_with(server: LoopbackServer, reply: Callable[[Recorded], Reply]) -> None:
    server.routes[MESSAGES_PATH] = reply


def context(**fields: Any) -> StepContext:
    history = [
        ChatMessage.system("Be brief."),
        ChatMessage.user("log two lines"),
        ChatMessage.assistant("Logging.", tool_calls=[ToolCall(id="tu_1", name="ledger", arguments={"line": "a"}),
                                                      ToolCall(id="tu_2", name="ledger", arguments={"line": "b"})]),
        ChatMessage(role="tool", content="appended 'a'", tool_call_id="tu_1", name="ledger"),
        ChatMessage(role="tool", content="appended 'b'", tool_call_id="tu_2", name="ledger"),
    ]
    return StepContext(**{"task_id": "t", "step_index": 2, "history": history, "model": "claude-test",
                          "tools": (LEDGER,), **fields})


def test_a_tool_use_answer_becomes_tool_calls_and_the_history_goes_out_as_alternating_blocks(
    provider, fake_anthropic
):
    respond_with(fake_anthropic, lambda request: Reply(body={
        "content": [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "One more."},
                    {"type": "tool_use", "id": "tu_3", "name": "ledger", "input": {"line": "c"}}],
        "usage": {"input_tokens": 20, "output_tokens": 5, "cache_read_input_tokens": 4,
                  "cache_creation_input_tokens": 1},
    }))
    events: list[tuple[str, str]] = []

    turn = provider.next_turn(context(emit=lambda kind, data: events.append((kind, data["text"]))))

    assert turn.content == "One more."
    assert turn.tool_calls == [ToolCall(id="tu_3", name="ledger", arguments={"line": "c"})]
    assert turn.usage == Usage(input_tokens=20, output_tokens=5, cache_read_tokens=4, cache_creation_tokens=1,
                               request_count=1)
    assert events == [("reasoning", "hmm"), ("content", "One more.")]
    (request,) = fake_anthropic.requests
    assert request.headers["x-api-key"] == API_KEY and request.headers["anthropic-version"] == "2023-06-01"
    body = request.json
    assert body["system"] == "Be brief." and body["max_tokens"] == 512 and body["model"] == "claude-test"
    assert body["tools"] == [{"name": "ledger", "description": LEDGER.description,
                              "input_schema": LEDGER.json_schema()}]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "tu_1", "content": "appended 'a'"},
        {"type": "tool_result", "tool_use_id": "tu_2", "content": "appended 'b'"}]


@pytest.mark.parametrize("status, error", [(529, TransientProviderError), (429, TransientProviderError),
                                           (401, PermanentProviderError)])
def test_anthropic_errors_map_like_openai_s_and_never_carry_the_key(provider, fake_anthropic, status, error):
    respond_with(fake_anthropic, lambda request: Reply(status, {
        "type": "error", "error": {"type": "some_error", "message": f"no luck with {API_KEY}"}}))

    with pytest.raises(error) as raised:
        provider.next_turn(context())

    assert f"HTTP {status}" in str(raised.value) and "no luck" in str(raised.value)
    assert API_KEY not in str(raised.value)
