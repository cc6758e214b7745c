"""Built-in tools and the tool registry, called the way the step loop calls them (`run_tool_call`).

Every call gets settings pointing at this test's workspace root, with small
caps so limits are reached with small files; `http_get` fetches from a
loopback server.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from pydantic import BaseModel

import longhaul.worker.tools as tools
from longhaul.models import InvalidInput, ToolCall
from longhaul.worker import Settings, load_settings
from longhaul.worker.providers.common import make_tool_call, raw_arguments_of
from longhaul.worker.tools import (
    ToolContext,
    ToolResult,
    allowed_tools,
    define_tool,
    register_tool,
    run_tool_call,
    tool,
    validate_tool_names,
)
from longhaul.worker.tools.files import WriteJournal
from longhaul.worker.workspaces import task_folder_name

from .fake_openai import LoopbackServer, Reply

TASK = "t1"
MAX_FILE_BYTES = 100
MAX_WORKSPACE_BYTES = 250
HTTP_MAX_BYTES = 50


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(workspace_root=str(tmp_path / "ws"), workspace_max_file_bytes=MAX_FILE_BYTES,
                         workspace_max_bytes=MAX_WORKSPACE_BYTES, http_get_timeout_s=0.3,
                         http_get_max_bytes=HTTP_MAX_BYTES, http_get_allow_private=True)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "ws" / TASK
    path.mkdir(parents=True)
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the workspace root, holding a secret no tool may reach."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.txt").write_text("the secret")
    return path


Call = Callable[..., ToolResult]


@pytest.fixture
def call(settings: Settings) -> Call:
    """Run one tool call: ``call("read_file", path="x")``; `step`, `index`, `options`, `settings` set its context."""

    def run(name: str, *, step: int = 1, index: int = 0, options: dict[str, Any] | None = None,
            settings: Settings = settings, task_id: str = TASK, **arguments: Any) -> ToolResult:
        context = ToolContext(task_id=task_id, step_index=step, call_index=index, options=options or {},
                              settings=settings)
        return run_tool_call(ToolCall(id="c", name=name, arguments=arguments), context)

    return run


@pytest.fixture
def web() -> Iterator[LoopbackServer]:
    server = LoopbackServer().start()
    server.routes.update({
        "/text": lambda request: Reply(body="hello web", headers={"Content-Type": "text/plain; charset=utf-8"}),
        "/big": lambda request: Reply(body="x" * (HTTP_MAX_BYTES * 4)),
        "/slow": lambda request: Reply(body="late", hold=server.hold()),
        "/moved": lambda request: Reply(302, headers={"Location": "/text"}),
    })
    yield server
    server.stop()


def failed(result: ToolResult, *fragments: str) -> bool:
    assert not result.success, result.output
    missing = [f for f in fragments if f not in result.output]
    assert not missing, f"{missing} not in {result.output!r}"
    return True


# -- files: confinement --------------------------------------------------------------------------


def test_files_written_read_and_listed_stay_inside_the_task_s_workspace(call, workspace):
    written = call("write_file", path="notes/plan.md", content="hello")
    assert written.success, written.output
    assert (workspace / "notes" / "plan.md").read_text() == "hello"

    assert call("read_file", path="notes/plan.md") == ToolResult(True, "hello")
    assert call("list_files").output == "notes/"
    assert call("list_files", recursive=True).output == "notes/\nnotes/plan.md  5"


@pytest.mark.parametrize("path, problem", [
    ("../escape.txt", "'..' is not allowed"),
    ("notes/../../escape.txt", "'..' is not allowed"),
    ("/etc/passwd", "absolute paths are not allowed"),
])
@pytest.mark.parametrize("name", ["read_file", "write_file", "list_files"])
def test_paths_that_climb_out_or_are_absolute_are_refused(call, workspace, tmp_path, name, path, problem):
    arguments = {"content": "x"} if name == "write_file" else {}

    assert failed(call(name, path=path, **arguments), problem, repr(path))
    assert not (tmp_path / "ws" / "escape.txt").exists() and not (tmp_path / "escape.txt").exists()


def test_symlinks_leading_out_of_the_workspace_are_refused_for_reading_writing_and_listing(
    call, workspace, outside
):
    (workspace / "secret").symlink_to(outside / "secret.txt")
    (workspace / "out").symlink_to(outside, target_is_directory=True)

    assert failed(call("read_file", path="secret"), "outside the workspace")
    assert failed(call("read_file", path="out/secret.txt"), "outside the workspace")
    assert failed(call("write_file", path="out/planted.txt", content="x"), "outside the workspace")
    assert failed(call("write_file", path="secret", content="overwritten"), "outside the workspace")
    assert failed(call("list_files", path="out"), "outside the workspace")
    assert call("list_files").output == "out (symlink)\nsecret (symlink)"
    assert not (outside / "planted.txt").exists()
    assert (outside / "secret.txt").read_text() == "the secret"


def test_a_symlink_that_stays_inside_the_workspace_is_followed(call, workspace):
    (workspace / "real.txt").write_text("inside")
    (workspace / "alias.txt").symlink_to(workspace / "real.txt")

    assert call("read_file", path="alias.txt") == ToolResult(True, "inside")


def test_a_task_id_shaped_like_a_path_still_gets_a_workspace_under_the_root(call, tmp_path):
    result = call("write_file", task_id="../../evil", path="x.txt", content="contained")

    assert result.success, result.output
    (written,) = [p for p in tmp_path.rglob("x.txt")]
    assert written.parent == tmp_path / "ws" / task_folder_name("../../evil")
    assert written.parent.name == "_2e_2e_2f_2e_2e_2fevil"


# -- files: caps ------------------------------------------------------------------------------------


def test_write_file_refuses_a_file_over_the_per_file_cap_and_writes_nothing(call, workspace):
    assert failed(call("write_file", path="big.txt", content="x" * (MAX_FILE_BYTES + 1)),
                  f"{MAX_FILE_BYTES}-byte limit per file")
    assert not (workspace / "big.txt").exists()

    assert call("write_file", path="grow.txt", content="x" * MAX_FILE_BYTES).success
    assert failed(call("write_file", step=2, path="grow.txt", content="y", append=True), "limit per file")
    assert (workspace / "grow.txt").read_text() == "x" * MAX_FILE_BYTES


def test_write_file_refuses_to_grow_the_workspace_past_its_cap(call, workspace):
    for step in (1, 2):
        assert call("write_file", step=step, path=f"{step}.txt", content="x" * MAX_FILE_BYTES).success

    assert failed(call("write_file", step=3, path="3.txt", content="x" * MAX_FILE_BYTES),
                  f"{MAX_WORKSPACE_BYTES}-byte limit")
    assert call("write_file", step=4, path="1.txt", content="smaller").success  # replacing frees space


def test_read_file_cuts_a_long_file_at_the_cap_and_says_so(call, workspace):
    (workspace / "long.txt").write_text("y" * (MAX_FILE_BYTES * 3))

    result = call("read_file", path="long.txt")

    assert result.success
    text, note = result.output.split("\n", 1)
    assert text == "y" * MAX_FILE_BYTES
    assert note == f"[truncated: the file is {MAX_FILE_BYTES * 3} bytes; read_file returns the first {MAX_FILE_BYTES}]"


# -- files: idempotency ---------------------------------------------------------------------------------


def test_write_file_repeated_with_the_same_idempotency_key_appends_once(call, workspace):
    first = call("write_file", step=4, index=1, path="log.txt", content="line\n", append=True)
    again = call("write_file", step=4, index=1, path="log.txt", content="line\n", append=True)

    assert first.success and again.success
    assert "already done by this call, idempotency key t1:4:1" in again.output
    assert (workspace / "log.txt").read_text() == "line\n"

    assert call("write_file", step=4, index=2, path="log.txt", content="line\n", append=True).success
    assert (workspace / "log.txt").read_text() == "line\nline\n"


def test_a_rerun_that_asks_for_a_different_write_under_the_same_key_carries_it_out(call, workspace):
    assert call("write_file", step=2, path="log.txt", content="first answer\n", append=True).success

    assert call("write_file", step=2, path="log.txt", content="second answer\n", append=True).success

    assert (workspace / "log.txt").read_text() == "first answer\nsecond answer\n"


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so no tool runner catches it."""


def test_an_append_killed_after_writing_but_before_its_journal_entry_is_not_repeated(
    call, workspace, monkeypatch
):
    save = WriteJournal.save

    def save_then_die_when_done(self: WriteJournal, entry: dict[str, Any]) -> None:
        if entry["state"] == "done":
            raise Killed()
        save(self, entry)

    monkeypatch.setattr(WriteJournal, "save", save_then_die_when_done)
    with pytest.raises(Killed):
        call("write_file", step=7, path="log.txt", content="once\n", append=True)
    assert (workspace / "log.txt").read_text() == "once\n"
    monkeypatch.setattr(WriteJournal, "save", save)

    rerun = call("write_file", step=7, path="log.txt", content="once\n", append=True)

    assert rerun.success and "already done" in rerun.output
    assert (workspace / "log.txt").read_text() == "once\n"


def test_the_write_journal_lives_outside_the_workspace_the_model_sees(call, workspace, tmp_path):
    assert call("write_file", path="a.txt", content="a").success

    assert call("list_files", recursive=True).output == "a.txt  1"
    assert list((tmp_path / "ws" / ".journal" / TASK).glob("*.json"))


# -- http_get --------------------------------------------------------------------------------------------


def test_http_get_returns_the_status_content_type_and_body(call, web):
    result = call("http_get", url=web.url + "/text")

    assert result == ToolResult(True, "HTTP 200 OK\ncontent-type: text/plain; charset=utf-8\n\nhello web")


def test_http_get_cuts_the_body_at_the_cap_and_says_so(call, web):
    capped = call("http_get", url=web.url + "/big")
    smaller = call("http_get", url=web.url + "/big", max_bytes=10)
    larger = call("http_get", url=web.url + "/big", max_bytes=HTTP_MAX_BYTES * 10)

    body = capped.output.split("\n\n", 1)[1]
    assert body == "x" * HTTP_MAX_BYTES + f"\n[truncated: showing the first {HTTP_MAX_BYTES} of 200 bytes]"
    assert smaller.output.split("\n\n", 1)[1].startswith("x" * 10 + "\n[truncated: showing the first 10 ")
    assert larger.output == capped.output  # the worker's cap is also the upper bound


def test_http_get_gives_up_after_its_timeout(call, web):
    assert failed(call("http_get", url=web.url + "/slow"), "timed out after 0.3 s")


def test_http_get_follows_a_redirect(call, web):
    result = call("http_get", url=web.url + "/moved")

    assert result.success and result.output.endswith("hello web")
    assert [r.path for r in web.requests] == ["/moved", "/text"]


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x", "gopher://example.com", "example.com"])
def test_http_get_refuses_schemes_other_than_http_and_https(call, url):
    assert failed(call("http_get", url=url), "is not allowed; use http or https")


def test_http_get_refuses_loopback_addresses_unless_allowed(call, web, settings):
    strict = settings.model_copy(update={"http_get_allow_private": False})

    assert failed(call("http_get", url=web.url + "/text", settings=strict), "not a public address",
                  "LONGHAUL_HTTP_GET_ALLOW_PRIVATE")
    assert web.requests == []


# -- arguments ------------------------------------------------------------------------------------------


def test_invalid_arguments_fail_naming_the_field(call, workspace):
    assert failed(call("write_file", path="a.txt"), "invalid arguments for write_file", "content: Field required")
    assert failed(call("write_file", path="a.txt", content="x", mode="w"), "mode: Extra inputs are not permitted")
    assert failed(call("http_get", url="https://example.com", max_bytes=0), "max_bytes: Input should be greater")
    assert list(workspace.iterdir()) == []


@pytest.mark.parametrize("raw, expected", [
    ('{"line": "ok"}', {"line": "ok"}),
    ('"{\\"line\\": \\"twice encoded\\"}"', {"line": "twice encoded"}),
    ("", {}),
])
def test_tool_call_arguments_are_decoded_from_the_json_text_models_send(raw, expected):
    assert make_tool_call("c", "ledger", raw).arguments == expected


@pytest.mark.parametrize("raw, problem", [
    ('{"line": ', "not valid JSON"),
    ('["a list"]', "must be a JSON object, got list"),
    ('{"line": NaN}', "not valid JSON"),
])
def test_arguments_that_are_not_a_json_object_become_a_failed_call_naming_the_problem(call, raw, problem):
    bad = make_tool_call("c", "ledger", raw)

    result = run_tool_call(bad, ToolContext(task_id=TASK, step_index=1, call_index=0))

    assert failed(result, "invalid arguments for ledger", problem, "JSON object")


# -- registry and per-task tools ------------------------------------------------------------------------


class ShoutArguments(BaseModel):
    text: str


def test_a_typed_function_becomes_a_tool_with_a_generated_schema_and_runs_once_registered(call, monkeypatch):
    monkeypatch.setattr(tools, "TOOLS", dict(tools.TOOLS))

    @define_tool()
    def shout(args: ShoutArguments, ctx: ToolContext) -> str:
        """Repeat the text in capitals."""
        return f"{args.text.upper()} ({ctx.idempotency_key})"

    assert (shout.name, shout.description) == ("shout", "Repeat the text in capitals.")
    assert shout.json_schema()["properties"] == {"text": {"title": "Text", "type": "string"}}
    assert failed(call("shout", text="hi"), "unknown tool 'shout'")

    register_tool(shout)

    assert call("shout", step=3, index=2, text="hi") == ToolResult(True, "HI (t1:3:2)")


def test_the_tool_decorator_registers_the_tool_when_the_function_is_defined(call, monkeypatch):
    monkeypatch.setattr(tools, "TOOLS", dict(tools.TOOLS))
    assert failed(call("whisper", text="HI"), "unknown tool 'whisper'")

    @tool()
    def whisper(args: ShoutArguments, ctx: ToolContext) -> str:
        """Repeat the text in lower case."""
        return args.text.lower()

    assert tools.TOOLS["whisper"] is whisper
    assert call("whisper", text="HI") == ToolResult(True, "hi")


def test_a_function_without_a_pydantic_arguments_model_is_not_a_tool():
    with pytest.raises(TypeError, match="pydantic model"):
        tool()(lambda args, ctx: "")


def test_a_tool_the_task_did_not_choose_is_refused_even_when_the_model_calls_it(call, workspace):
    options = {"tools": ["read_file"]}

    assert [t.name for t in allowed_tools(options)] == ["read_file"]
    assert failed(call("write_file", options=options, path="a.txt", content="x"),
                  "not allowed for this task", "available: read_file")
    assert not (workspace / "a.txt").exists()


@pytest.mark.parametrize("options, fragments", [
    ({"tools": ["read_file", "nope"]}, ("tools:", "'nope'", "read_file")),
    ({"tools": "read_file"}, ("tools:", "list of tool names")),
    ({"tools": [1]}, ("tools:", "list of tool names")),
])
def test_unknown_tool_names_in_a_task_s_options_fail_early_naming_tools(options, fragments):
    with pytest.raises(InvalidInput) as raised:
        validate_tool_names(options)

    assert all(fragment in str(raised.value) for fragment in fragments), str(raised.value)


def test_every_built_in_tool_is_registered_and_valid_choices_pass():
    validate_tool_names({"tools": ["ledger", "read_file", "write_file", "list_files", "http_get"]})
    validate_tool_names({})
    assert set(tools.TOOLS) >= {"ledger", "read_file", "write_file", "list_files", "http_get"}


def test_workspace_root_comes_from_the_settings(call, settings, tmp_path):
    elsewhere = settings.model_copy(update={"workspace_root": str(tmp_path / "other")})

    assert call("write_file", settings=elsewhere, path="a.txt", content="x").success
    assert (tmp_path / "other" / TASK / "a.txt").read_text() == "x"
    assert not os.path.exists(tmp_path / "ws" / TASK / "a.txt")


def test_an_unknown_tool_name_fails_at_submit_naming_tools_and_stores_nothing(embedded_runtime):
    from longhaul import worker
    with pytest.raises(InvalidInput, match="tools"):
        worker.run_inline("use a tool that does not exist", task_id="no-such-tool", tools=["nope"])

    assert embedded_runtime.store.load("no-such-tool") is None


def test_bad_arguments_travel_in_their_own_field_and_replay_as_the_text_the_model_sent():
    bad = make_tool_call("c", "ledger", '{"line": ')

    assert bad.arguments == {} and bad.invalid_arguments is not None
    assert "not valid JSON" in bad.invalid_arguments.problem
    assert raw_arguments_of(bad) == '{"line": '
    assert "invalid_arguments" not in make_tool_call("c", "ledger", '{"line": "ok"}').model_dump()


def test_a_call_stored_with_bad_arguments_under_the_old_marker_key_still_reads_and_fails_the_same(call):
    stored = {"id": "c", "name": "ledger",
              "arguments": {"__longhaul_invalid_arguments__": {"problem": "the arguments are not valid JSON (x)",
                                                              "raw": '{"line": '}}}

    old = ToolCall.model_validate(stored)

    assert old.arguments == {} and old.invalid_arguments is not None and old.invalid_arguments.raw == '{"line": '
    result = run_tool_call(old, ToolContext(task_id=TASK, step_index=1, call_index=0))
    assert failed(result, "invalid arguments for ledger", "not valid JSON", "JSON object")
    assert ToolCall.model_validate_json(make_tool_call("c", "ledger", "[1]").model_dump_json()).invalid_arguments
