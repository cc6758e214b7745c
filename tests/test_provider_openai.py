"""The `openai` provider against a fake OpenAI-compatible server on loopback (no internet).

Whole tasks run on an embedded runtime (`worker.run_inline(provider="openai")`)
whose settings point at the fake server; single turns are asked of an
`OpenAIProvider` directly with a `StepContext` whose `emit` collects events.
The fake "model" answers by step index (the assistant turns in the request),
so a retried or resumed step gets the same answer, as the scripted provider does.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

from longhaul import worker
from longhaul.models import TOOL_CALL_TAGS, ChatMessage, TaskStatus, TaskStore, ToolCall, Usage
from longhaul.worker import Runtime, load_settings
from longhaul.worker.providers import PermanentProviderError, StepContext, TransientProviderError, create_provider
from longhaul.worker.providers.openai import OpenAIProvider
from longhaul.worker.testing import free_port, ledger_counts, wait_until
from longhaul.worker.tools import LEDGER, OPT_IN_TOOLS, TOOLS
from tests.fixtures.cli import LONGHAUL

from .fake_openai import FakeOpenAI, Recorded, Reply, Responder, answer, error_reply, native_call

#: Matches none of the store's redaction patterns, so these tests catch a leak by the provider itself.
API_KEY = "lh-test-key-7f3a9c2e5b1d4a8f6e0c"


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture
def openai_runtime(make_runtime: Callable[..., Runtime], fake_openai: FakeOpenAI, tmp_path: Path) -> Runtime:
    """An embedded runtime whose `openai` provider talks to the fake server."""
    return make_runtime(openai_base_url=fake_openai.base_url, openai_api_key=API_KEY,
                        workspace_root=str(tmp_path / "workspaces"))


@pytest.fixture
def make_provider(fake_openai: FakeOpenAI) -> Iterator[Callable[..., OpenAIProvider]]:
    """An `OpenAIProvider` for the fake server; keywords override settings."""
    made: list[OpenAIProvider] = []

    def make(**overrides: Any) -> OpenAIProvider:
        settings = load_settings(**{"openai_base_url": fake_openai.base_url, "openai_api_key": API_KEY,
                                    **overrides})
        made.append(OpenAIProvider(settings=settings))
        return made[-1]

    yield make
    for provider in made:
        provider.close()


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "ledger.txt"


class Events(list):
    """A `StepContext.emit` that keeps ``(event_type, text)`` pairs."""

    def __call__(self, event_type: str, data: dict[str, Any]) -> None:
        self.append((event_type, data["text"]))

    def texts(self, event_type: str) -> list[str]:
        return [text for kind, text in self if kind == event_type]


def step_context(events: Optional[Events] = None, **fields: Any) -> StepContext:
    defaults: dict[str, Any] = dict(task_id="t", step_index=1, history=[ChatMessage.user("hi")], model="gpt-test",
                                    tools=(LEDGER,), emit=events if events is not None else Events())
    return StepContext(**{**defaults, **fields})


def ledger_agent(steps: int) -> Responder:
    """A model that appends ``step <i>`` to the ledger in steps 1..`steps`, then answers."""

    def respond(request: Recorded) -> Reply:
        step = request.step
        if step <= steps:
            return answer(request, f"Step {step}: writing to the ledger.",
                          tool_calls=[native_call("ledger", {"line": f"step {step}"}, f"call_{step}")])
        return answer(request, f"Done after {steps} steps.")

    return respond


def stored_bytes(db_url: str) -> bytes:
    """Every byte of the SQLite database, its WAL and shared-memory files."""
    path = Path(db_url.removeprefix("sqlite:///"))
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


def chat_env(db_url: str, fake: FakeOpenAI, tmp_path: Path) -> dict[str, str]:
    """A fresh machine's environment for `longhaul` commands using the fake server."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LONGHAUL_", "OPENAI_")) and k != "REDIS_URL"}
    env.update(LONGHAUL_DATABASE_URL=db_url, LONGHAUL_OPENAI_BASE_URL=fake.base_url, OPENAI_API_KEY=API_KEY,
               LONGHAUL_WORKSPACE_ROOT=str(tmp_path / "workspaces"), LONGHAUL_HTTP_GET_ALLOW_PRIVATE="true",
               LONGHAUL_LOG_LEVEL="DEBUG")
    return env


# -- whole tasks -------------------------------------------------------------------------------


def test_a_task_calls_tools_natively_and_the_model_sees_each_result_under_its_call_id(
    openai_runtime, fake_openai, tmp_path
):
    def respond(request: Recorded) -> Reply:
        if request.step == 1:
            return answer(request, "Saving a note.",
                          tool_calls=[native_call("write_file", {"path": "notes.txt", "content": "hello"}, "call_w")])
        if request.step == 2:
            return answer(request, "", tool_calls=[native_call("read_file", {"path": "notes.txt"}, "call_r")])
        return answer(request, "The note says hello.")

    fake_openai.script = respond

    record = worker.run_inline("keep a note", task_id="notes", provider="openai", model="gpt-test")

    assert record.status is TaskStatus.COMPLETED, record.last_error
    assert record.final_response == "The note says hello."
    assert [(c.items[0].tool_name, c.items[0].success) for c in record.checkpoints] == [
        ("write_file", True), ("read_file", True)]
    assert (tmp_path / "workspaces" / "notes" / "notes.txt").read_text() == "hello"

    first, second, third = fake_openai.chats
    assert first.json["model"] == "gpt-test"
    assert first.headers["authorization"] == f"Bearer {API_KEY}"
    assert {t["function"]["name"]: t["function"]["parameters"] for t in first.json["tools"]} == {
        name: tool.json_schema() for name, tool in TOOLS.items() if name not in OPT_IN_TOOLS}  # ask_user: opt-in
    assert first.json["messages"] == [{"role": "user", "content": "keep a note"}]
    assistant, result = second.json["messages"][1:]
    assert assistant == {"role": "assistant", "content": "Saving a note.", "tool_calls": [
        {"id": "call_w", "type": "function",
         "function": {"name": "write_file", "arguments": json.dumps({"path": "notes.txt", "content": "hello"})}}]}
    assert result["role"] == "tool" and result["tool_call_id"] == "call_w"
    assert result["content"].startswith("wrote 5 bytes to notes.txt")
    assert third.json["messages"][-1] == {"role": "tool", "tool_call_id": "call_r", "content": "hello"}
    assert record.usage.input_tokens == 3 * 11 and record.usage.request_count == 3


def test_a_rate_limited_step_is_retried_and_the_steps_before_it_are_not_repeated(
    openai_runtime, fake_openai, ledger
):
    limited: list[int] = []
    agent = ledger_agent(3)

    def respond(request: Recorded) -> Reply:
        if request.step == 2 and not limited:
            limited.append(request.step)
            return error_reply(429, "Rate limit reached for gpt-test", "rate_limit_exceeded")
        return agent(request)

    fake_openai.script = respond

    record = worker.run_inline("count", task_id="limited", provider="openai", model="gpt-test",
                               ledger_path=str(ledger))

    assert record.status is TaskStatus.COMPLETED, record.last_error
    assert fake_openai.steps_asked() == [1, 2, 2, 3, 4]
    assert ledger_counts(ledger) == {"step 1": 1, "step 2": 1, "step 3": 1}
    assert [c.step_index for c in record.checkpoints] == [1, 2, 3]


def test_a_rejected_api_key_fails_the_task_at_once_naming_the_status_but_never_the_key(
    openai_runtime, fake_openai, db_url, caplog
):
    caplog.set_level(logging.DEBUG)
    # Some gateways echo the key they rejected; the message must not carry it on.
    fake_openai.script = lambda request: error_reply(401, f"Incorrect API key provided: {API_KEY}",
                                                     "invalid_api_key")

    record = worker.run_inline("anything", task_id="denied", provider="openai", model="gpt-test")

    assert record.status is TaskStatus.FAILED
    assert record.last_error is not None
    assert "HTTP 401" in record.last_error and "Incorrect API key provided" in record.last_error
    assert "OPENAI_API_KEY" in record.last_error
    assert API_KEY not in record.last_error
    assert len(fake_openai.chats) == 1  # permanent: not retried
    assert API_KEY.encode() not in stored_bytes(db_url)
    assert API_KEY not in caplog.text


def test_malformed_json_arguments_become_a_failed_tool_result_the_model_sees_and_the_task_goes_on(
    openai_runtime, fake_openai, ledger
):
    broken = '{"line": "unterminated'

    def respond(request: Recorded) -> Reply:
        if request.step == 1:
            return answer(request, "Logging.", tool_calls=[native_call("ledger", broken, "call_bad")])
        return answer(request, "I could not log it.")

    fake_openai.script = respond

    record = worker.run_inline("log", task_id="malformed", provider="openai", model="gpt-test",
                               ledger_path=str(ledger))

    assert record.status is TaskStatus.COMPLETED, record.last_error
    (item,) = record.checkpoints[0].items
    assert not item.success
    assert item.output.startswith("invalid arguments for ledger: the arguments are not valid JSON")
    assert not ledger.exists()
    assistant, result = fake_openai.chats[1].json["messages"][1:]
    assert assistant["tool_calls"][0]["function"]["arguments"] == broken  # replayed as the model wrote it
    assert result == {"role": "tool", "tool_call_id": "call_bad", "content": item.output}


def test_a_task_whose_model_writes_tool_calls_as_tags_runs_them_and_replays_them_as_native_calls(
    openai_runtime, fake_openai, ledger
):
    tagged = 'Logging.\n<tool_call>{"name": "ledger", "arguments": {"line": "tagged"}}</tool_call>'

    def respond(request: Recorded) -> Reply:
        return answer(request, tagged) if request.step == 1 else answer(request, "Logged.")

    fake_openai.script = respond

    record = worker.run_inline("log", task_id="tags", provider="openai", model="gpt-test", ledger_path=str(ledger))

    assert record.status is TaskStatus.COMPLETED, record.last_error
    assert ledger_counts(ledger) == {"tagged": 1}
    assistant = fake_openai.chats[1].json["messages"][1]
    assert assistant["content"] == "Logging."  # the tag is not sent twice
    assert assistant["tool_calls"][0]["function"] == {"name": "ledger", "arguments": '{"line": "tagged"}'}


def test_streamed_chunks_of_a_task_are_consolidated_into_one_content_trace(openai_runtime, fake_openai):
    fake_openai.script = lambda request: answer(request, "All done here, nothing to call.")

    worker.run_inline("finish", task_id="traced", provider="openai", model="gpt-test")

    texts = [event.data["text"] for event in openai_runtime.store.traces("traced") if event.event_type == "content"]
    assert texts == ["All done here, nothing to call."]


# -- one turn, asked directly -----------------------------------------------------------------------


def test_streamed_content_and_reasoning_reach_emit_chunk_by_chunk_and_tool_call_fragments_are_joined(
    make_provider, fake_openai
):
    fake_openai.script = lambda request: answer(request, "The answer is 42", reasoning="Think it over",
                                                tool_calls=[native_call("ledger", {"line": "x y z"}, "c1")])
    events = Events()

    turn = make_provider().next_turn(step_context(events))

    assert events.texts("content") == ["The ", "answer ", "is ", "42"]
    assert events.texts("reasoning") == ["Think ", "it ", "over"]
    assert [kind for kind, _ in events] == ["reasoning"] * 3 + ["content"] * 4
    assert turn.content == "The answer is 42"
    assert turn.tool_calls == [ToolCall(id="c1", name="ledger", arguments={"line": "x y z"})]
    assert turn.usage == Usage(input_tokens=11, output_tokens=7, cache_read_tokens=3, reasoning_tokens=2,
                               request_count=1)
    body = fake_openai.chats[0].json
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_turn_after_turn_reuses_one_kept_alive_connection(stream):
    # A stream read only up to [DONE] leaves the end of its chunked body unread, and the client then closes
    # the connection: every turn would open a new one (a TLS handshake on a real endpoint).
    server = FakeOpenAI(keep_alive=True).start()
    try:
        server.script = lambda request: answer(request, "Nothing to call.")
        provider = OpenAIProvider(settings=load_settings(openai_base_url=server.base_url, openai_api_key=API_KEY,
                                                         openai_stream=stream))
        turns = [provider.next_turn(step_context()) for _ in range(3)]
    finally:
        server.stop()

    assert [turn.content for turn in turns] == ["Nothing to call."] * 3
    assert len(server.chats) == 3
    assert server.connections == 1


def test_a_non_streamed_answer_gives_content_tool_calls_and_usage_priced_from_the_table(make_provider, fake_openai):
    fake_openai.script = lambda request: answer(request, "Calling.",
                                                tool_calls=[native_call("ledger", {"line": "a"}, "c9")])
    provider = make_provider(openai_stream=False, model_prices_usd_per_mtok={"gpt-test": (2.0, 8.0)})

    turn = provider.next_turn(step_context(options={"temperature": 0.2, "steps": 4}))

    assert turn.content == "Calling."
    assert turn.tool_calls == [ToolCall(id="c9", name="ledger", arguments={"line": "a"})]
    assert turn.usage is not None and turn.usage.input_tokens == 11 and turn.usage.output_tokens == 7
    assert turn.usage.cost_usd == pytest.approx((11 * 2.0 + 7 * 8.0) / 1_000_000)
    body = fake_openai.chats[0].json
    assert body["stream"] is False and "stream_options" not in body
    assert body["temperature"] == 0.2 and "steps" not in body  # only request options pass through


@pytest.mark.parametrize("open_tag", list(TOOL_CALL_TAGS))
def test_tool_calls_written_as_text_tags_are_parsed_in_every_seed_form(make_provider, fake_openai, open_tag):
    payload = '{"name": "ledger", "arguments": {"line": "tagged"}}'
    fake_openai.script = lambda request: answer(request, f"Logging.\n{open_tag}{payload}{TOOL_CALL_TAGS[open_tag]}")

    turn = make_provider().next_turn(step_context(step_index=3))

    assert turn.tool_calls == [ToolCall(id="call_3_0", name="ledger", arguments={"line": "tagged"})]


@pytest.mark.parametrize("status, error", [
    (429, TransientProviderError), (500, TransientProviderError), (502, TransientProviderError),
    (503, TransientProviderError), (400, PermanentProviderError), (401, PermanentProviderError),
    (403, PermanentProviderError), (404, PermanentProviderError), (301, PermanentProviderError),
])
def test_error_statuses_map_to_transient_or_permanent_errors_quoting_the_provider(
    make_provider, fake_openai, status, error
):
    fake_openai.script = lambda request: error_reply(status, f"upstream said no ({API_KEY})")

    with pytest.raises(error) as raised:
        make_provider().next_turn(step_context())

    message = str(raised.value)
    assert f"HTTP {status}" in message and "upstream said no" in message
    assert API_KEY not in message
    assert raised.value.status_code == status


def test_create_provider_hands_settings_to_the_providers_that_take_them():
    settings = load_settings(openai_base_url="http://gateway.test/v1/")

    assert create_provider("openai", settings=settings).url == "http://gateway.test/v1/chat/completions"
    assert create_provider("scripted", settings=settings).name == "scripted"


def test_a_base_url_httpx_cannot_use_is_a_permanent_error(make_provider):
    with pytest.raises(PermanentProviderError, match="base URL"):
        make_provider(openai_base_url="ftp://models.test/v1").next_turn(step_context())


def test_an_unreachable_endpoint_is_a_transient_error(make_provider):
    provider = make_provider(openai_base_url=f"http://127.0.0.1:{free_port()}/v1")

    with pytest.raises(TransientProviderError, match="could not be reached"):
        provider.next_turn(step_context())


def test_an_endpoint_silent_past_the_timeout_is_a_transient_error(make_provider, fake_openai):
    fake_openai.script = lambda request: Reply(hold=fake_openai.hold())

    with pytest.raises(TransientProviderError, match="timed out"):
        make_provider(openai_timeout_s=0.3).next_turn(step_context())


def test_a_stream_cut_off_before_the_answer_ends_is_a_transient_error(make_provider, fake_openai):
    def respond(request: Recorded) -> Reply:
        whole = answer(request, "half an answer")
        return Reply(headers=whole.headers, chunks=(whole.chunks or [])[:2])  # no finish_reason, no [DONE]

    fake_openai.script = respond

    with pytest.raises(TransientProviderError, match="stream ended"):
        make_provider().next_turn(step_context())


def test_a_body_that_breaks_off_after_done_keeps_the_whole_answer(make_provider, fake_openai):
    # The rest of the body is read only to keep the connection: a cut there must not throw away (and pay
    # again for) an answer that arrived whole.
    def respond(request: Recorded) -> Reply:
        whole = answer(request, "all of it")
        return Reply(headers={**whole.headers, "Content-Length": "100000"}, chunks=whole.chunks)  # then it closes

    fake_openai.script = respond

    turn = make_provider().next_turn(step_context())

    assert turn.content == "all of it" and len(fake_openai.chats) == 1


# -- a real process, killed -------------------------------------------------------------------------


@pytest.mark.crash
def test_a_run_sigkilled_between_the_model_call_and_the_tool_call_resumes_without_repeating_steps(
    fake_openai, db_url, tmp_path, ledger
):
    """Steps 1-3 log to the ledger; step 4's tool fetches /block, which hangs until the process is killed."""
    agent = ledger_agent(3)

    def respond(request: Recorded) -> Reply:
        if request.step == 4:
            return answer(request, "Fetching.",
                          tool_calls=[native_call("http_get", {"url": fake_openai.url + "/block"}, "call_get")])
        if request.step == 5:
            return answer(request, "Fetched; done.")
        return agent(request)

    fake_openai.script = respond
    first_block = fake_openai.hold()
    fake_openai.routes["/block"] = lambda request: Reply(
        body="unblocked", hold=first_block if len(fake_openai.requests_to("/block")) == 1 else None)
    env = chat_env(db_url, fake_openai, tmp_path)
    with open(tmp_path / "run.err", "wb") as err:
        running = subprocess.Popen([*LONGHAUL, "run", "fetch", "--task-id", "k", "--provider", "openai",
                                    "--model", "gpt-test", "--ledger", str(ledger)],
                                   env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(lambda: fake_openai.requests_to("/block") or running.poll() is not None, timeout_s=30,
                   what="step 4's tool call to reach /block")
        assert running.poll() is None, (tmp_path / "run.err").read_text()
        running.send_signal(signal.SIGKILL)
    finally:
        running.kill()
        running.wait()
    with TaskStore(db_url) as store:
        at_kill = store.summary("k")
    assert at_kill.status is TaskStatus.RUNNING and at_kill.checkpoint_count == 3

    resumed = subprocess.run([*LONGHAUL, "resume", "--interrupted", "--json"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)

    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["status"] == "completed"
    assert fake_openai.steps_asked() == [1, 2, 3, 4, 5]  # step 4's answer was journaled: never asked again
    assert ledger_counts(ledger) == {"step 1": 1, "step 2": 1, "step 3": 1}
    assert len(fake_openai.requests_to("/block")) == 2
    with TaskStore(db_url) as store:
        record = store.get("k")
    assert [c.step_index for c in record.checkpoints] == [1, 2, 3, 4]
    assert record.checkpoints[-1].items[0].success and "unblocked" in record.checkpoints[-1].items[0].output
    # The key went to the server, and nowhere else: not the database, not the (DEBUG) logs.
    assert all(r.headers["authorization"] == f"Bearer {API_KEY}" for r in fake_openai.chats)
    assert API_KEY.encode() not in stored_bytes(db_url)
    logs = (tmp_path / "run.err").read_text() + resumed.stderr
    assert "HTTP Request: POST" in logs  # DEBUG logging was on, httpx included
    assert API_KEY not in logs


# -- answers that must not fail or fool a task -------------------------------------------------------

#: Tool-call arguments JSON allows but the store cannot hold, as a model writes them into a text tag.
UNSTORABLE_ARGUMENTS = {"nan": "NaN", "infinity": "-Infinity", "huge float": "1e400",
                        "wide integer": str(2**70), "lone surrogate": '"\\ud800"'}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("value", list(UNSTORABLE_ARGUMENTS.values()), ids=list(UNSTORABLE_ARGUMENTS))
def test_a_text_tag_with_unstorable_arguments_becomes_a_result_the_model_can_correct(
    make_runtime, fake_openai, ledger, stream, value
):
    make_runtime(openai_base_url=fake_openai.base_url, openai_api_key=API_KEY, openai_stream=stream)

    def respond(request: Recorded) -> Reply:
        if request.step == 1:
            return answer(request, f'Noting. <tool_call>{{"name": "ledger", "arguments": {{"line": {value}}}}}'
                                   "</tool_call>")
        return answer(request, "Corrected myself; done.")

    fake_openai.script = respond
    record = worker.run_inline("note it", task_id="tags", provider="openai", model="gpt-test",
                               ledger_path=str(ledger))

    assert record.status is TaskStatus.COMPLETED, record.last_error
    [item] = record.checkpoints[0].items
    assert not item.success and item.output.startswith("invalid arguments for ledger: the arguments are not plain")
    assert not ledger.exists()
    # The model saw the failure as the call's result, under the call's id.
    sent = fake_openai.chats[-1].json["messages"]
    assert sent[-1]["role"] == "tool" and sent[-1]["tool_call_id"] == "call_1_0"
    assert sent[-1]["content"] == item.output


def test_an_empty_answer_is_asked_again_and_not_taken_for_the_final_one(make_runtime, fake_openai):
    make_runtime(openai_base_url=fake_openai.base_url, openai_api_key=API_KEY, openai_stream=True)
    fake_openai.queue(lambda request: answer(request, ""))
    fake_openai.script = lambda request: answer(request, "The real answer.")

    record = worker.run_inline("say something", task_id="empty-once", provider="openai", model="gpt-test")

    assert record.status is TaskStatus.COMPLETED, record.last_error
    assert record.final_response == "The real answer."
    assert fake_openai.steps_asked() == [1, 1]


def test_answers_that_stay_empty_fail_the_task_saying_so_after_the_retries(make_runtime, fake_openai):
    make_runtime(openai_base_url=fake_openai.base_url, openai_api_key=API_KEY, max_retries=1)
    fake_openai.script = lambda request: answer(request, "")

    record = worker.run_inline("say something", task_id="empty", provider="openai", model="gpt-test")

    assert record.status is TaskStatus.FAILED
    assert record.last_error is not None and "gave up after 1 retries" in record.last_error
    assert "answered step 1 with neither text nor tool calls" in record.last_error
    assert record.final_response is None and fake_openai.steps_asked() == [1, 1]


def test_text_streamed_before_a_cut_is_not_traced_twice_and_the_trace_says_the_call_restarted(
    make_runtime, fake_openai
):
    rt = make_runtime(openai_base_url=fake_openai.base_url, openai_api_key=API_KEY, openai_stream=True)

    def cut(request: Recorded) -> Reply:
        whole = answer(request, "Alpha beta gamma delta.")
        return Reply(headers=whole.headers, chunks=(whole.chunks or [])[:3])  # two words, then the stream ends

    fake_openai.queue(cut)
    fake_openai.script = lambda request: answer(request, "Alpha beta gamma delta.")

    record = worker.run_inline("stream", task_id="cut", provider="openai", model="gpt-test")

    assert record.status is TaskStatus.COMPLETED, record.last_error
    events = rt.store.traces("cut")
    assert [e.data["text"] for e in events if e.event_type == "content"] == ["Alpha beta gamma delta."]
    [restarted] = [e for e in events if e.event_type == "model_call_restarted"]
    assert restarted.data["partial_text"] == "Alpha beta " and restarted.data["step"] == 1
    assert "stream ended" in restarted.data["reason"]


def test_a_request_body_is_encoded_compactly_and_one_orjson_cannot_encode_falls_back_to_the_standard_library():
    from longhaul.worker.providers.common import json_body

    body = {"model": "m", "messages": [{"role": "user", "content": "héllo ✓ \u2028"}], "seed": 2**70}
    encoded, headers = json_body(body)
    plain, _ = json_body({**body, "seed": 7})

    assert headers == {"Content-Type": "application/json"}
    assert json.loads(encoded) == body  # past 64 bits: the standard library's encoder
    assert json.loads(plain) == {**body, "seed": 7} and b": " not in plain and "héllo".encode() in plain


def test_threads_spread_over_a_few_shared_clients_each_thread_keeping_its_own():
    """A pool looks through every connection it holds per request: each client serves a few threads' only."""
    import threading

    from longhaul.worker.providers import http_clients

    base_url = "http://127.0.0.1:9/v1"  # never requested: building a client opens nothing
    clients: list[Any] = []

    def take() -> None:
        first = http_clients.shared_client(base_url, timeout_s=5)
        clients.append((first, http_clients.shared_client(base_url, timeout_s=5)))

    threads = [threading.Thread(target=take) for _ in range(2 * http_clients.MAX_SHARDS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert all(first is again for first, again in clients)  # a thread keeps its client
    per_client: dict[int, int] = {}
    for first, _again in clients:
        per_client[id(first)] = per_client.get(id(first), 0) + 1
    assert sorted(per_client.values()) == [2] * http_clients.MAX_SHARDS  # round-robin over every shard
    assert http_clients.shared_client(base_url, timeout_s=7) is not http_clients.shared_client(base_url, timeout_s=5)
