"""Tool-call tag stripping and parsing, and turns normalized for resumption."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longhaul.models import (
    TOOL_CALL_TAGS,
    ChatMessage,
    TaskStatus,
    ToolCall,
    load_resumable_state,
    normalize_resumable_turns,
    parse_tool_call_tags,
    resumable_turns_from_task_record,
    strip_tool_call_tags,
)

#: The seed's seven tag forms, spelled out so a dropped one fails here.
SEED_TAGS = [
    ("<function_calls>", "</function_calls>"),
    ("<function_call>", "</function_call>"),
    ("<tool_call>", "</tool_call>"),
    ("<toolcall>", "</toolcall>"),
    ("<tool-call>", "</tool-call>"),
    ("<tool>", "</tool>"),
    ("<invoke>", "</invoke>"),
]
TAG_IDS = [open_tag for open_tag, _ in SEED_TAGS]
PAYLOAD = '{"name": "shell", "arguments": {"command": "ls -la"}}'


def user(content: str) -> ChatMessage:
    return ChatMessage(role="user", content=content)


def assistant(content: str) -> ChatMessage:
    return ChatMessage(role="assistant", content=content)


def pairs(turns: list[ChatMessage]) -> list[tuple[str, str]]:
    return [(turn.role, turn.content) for turn in turns]


# -- strip_tool_call_tags: examples ----------------------------------------------


def test_the_seven_seed_tag_forms_are_the_known_tags():
    assert list(TOOL_CALL_TAGS.items()) == SEED_TAGS


@pytest.mark.parametrize("open_tag,close_tag", SEED_TAGS, ids=TAG_IDS)
def test_a_closed_tag_is_removed_with_its_payload(open_tag, close_tag):
    text = f"Let me check.\n{open_tag}{PAYLOAD}{close_tag}\nDone."
    assert strip_tool_call_tags(text) == "Let me check.\n\nDone."


@pytest.mark.parametrize("open_tag,close_tag", SEED_TAGS, ids=TAG_IDS)
def test_a_closed_tag_without_json_inside_is_removed_too(open_tag, close_tag):
    assert strip_tool_call_tags(f"before {open_tag}just words{close_tag} after") == "before  after"


def test_several_tags_of_different_forms_are_all_removed():
    text = f"a<tool_call>{PAYLOAD}</tool_call>b<invoke>[1, 2]</invoke>c<function_calls>x</function_calls>d"
    assert strip_tool_call_tags(text) == "abcd"


@pytest.mark.parametrize("open_tag,close_tag", SEED_TAGS, ids=TAG_IDS)
def test_an_unclosed_tag_with_a_json_payload_is_removed_with_stray_closing_tags(open_tag, close_tag):
    text = f"Working on it.\n{open_tag}\n{PAYLOAD}\n</parameters> </{close_tag[2:]}\nNext part."
    assert strip_tool_call_tags(text) == "Working on it.\n\nNext part."


def test_an_unclosed_tag_with_a_json_array_payload_is_removed():
    assert strip_tool_call_tags('call <tool_call> [{"name": "a"}, {"name": "b"}] then') == "call then"


def test_an_unclosed_tag_with_a_payload_that_never_closes_its_stray_tag_drops_the_rest():
    assert strip_tool_call_tags(f"keep <tool>{PAYLOAD}</tool") == "keep"


@pytest.mark.parametrize("open_tag,close_tag", SEED_TAGS, ids=TAG_IDS)
def test_an_unclosed_tag_without_json_is_kept_as_text(open_tag, close_tag):
    text = f"Use the {open_tag} element to describe calls."
    assert strip_tool_call_tags(text) == text


def test_text_after_an_unclosed_tag_without_json_is_kept_verbatim_as_the_seed_does():
    # The seed stops scanning at an unclosed tag without JSON, so a later closed
    # tag survives as text; documented here because it is surprising.
    text = "Use <tool> like this: <invoke>x</invoke>"
    assert strip_tool_call_tags(text) == text


def test_runs_of_blank_lines_collapse_to_one():
    text = f"first\n\n\n\n\nsecond\n<tool_call>{PAYLOAD}</tool_call>\n\n\nthird"
    assert strip_tool_call_tags(text) == "first\n\nsecond\n\nthird"


def test_the_result_is_trimmed():
    assert strip_tool_call_tags(f"  \n<tool>{PAYLOAD}</tool>\n  answer \n\n ") == "answer"
    assert strip_tool_call_tags(f"<tool_call>{PAYLOAD}</tool_call>") == ""


def test_text_without_tags_is_only_trimmed():
    assert strip_tool_call_tags("  plain {json: maybe} [x] </notatag>  ") == "plain {json: maybe} [x] </notatag>"


def test_stripping_is_repeated_when_removing_a_tag_splices_a_new_one():
    # Removing the inner call joins "<tool" and "_call>" into a new closed tag.
    text = "a<tool<invoke>{}</invoke>_call>{}</tool_call>b"
    assert strip_tool_call_tags(text) == "ab"


# -- strip_tool_call_tags: properties --------------------------------------------

TAG_FRAGMENTS = (
    [tag for pair in SEED_TAGS for tag in pair]
    + ["<", ">", "</", "<tool", "_call>", "call>", "{", "}", "[", "]", '"', ":", ",", " ", "\n", "\n\n\n",
       "x", "1", '"name"', PAYLOAD, "[]", "{}", '{"a": [1, {"b": null}]}', "NaN", "\\", "é", "\x00"]
)
tagged_text = st.lists(st.sampled_from(TAG_FRAGMENTS), max_size=40).map("".join)
any_text = st.one_of(st.text(max_size=200), tagged_text, st.lists(st.one_of(st.text(max_size=5), tagged_text),
                                                                    max_size=6).map("".join))


def first_open_tag(text: str) -> tuple[int, str] | None:
    found = [(text.find(open_tag), open_tag) for open_tag, _ in SEED_TAGS if open_tag in text]
    return min(found) if found else None


@settings(max_examples=400)
@given(any_text)
def test_stripping_never_raises_and_returns_trimmed_text(text):
    result = strip_tool_call_tags(text)
    assert isinstance(result, str)
    assert result == result.strip()
    assert "\n\n\n" not in result
    assert len(result) <= len(text)


@settings(max_examples=400)
@given(any_text)
def test_stripping_is_idempotent(text):
    once = strip_tool_call_tags(text)
    assert strip_tool_call_tags(once) == once


@settings(max_examples=400)
@given(any_text)
def test_the_first_tag_left_after_stripping_is_never_closed(text):
    # Everything up to the first tag left is tag-free; that tag is an unclosed
    # one with no JSON after it (kept as text, with whatever follows it).
    result = strip_tool_call_tags(text)
    first = first_open_tag(result)
    if first is None:
        return
    start, open_tag = first
    assert TOOL_CALL_TAGS[open_tag] not in result[start:]


@settings(max_examples=200)
@given(st.lists(st.sampled_from([f"{o}{PAYLOAD}{c}" for o, c in SEED_TAGS] + ["word", " ", "\n", "{x}"]),
                max_size=20).map("".join))
def test_stripped_text_holds_no_tag_when_every_tag_was_closed(text):
    result = strip_tool_call_tags(text)
    assert first_open_tag(result) is None
    assert not any(close_tag in result for _, close_tag in SEED_TAGS)


@pytest.mark.parametrize("depth", [1, 50, 1_500, 3_000])
@pytest.mark.parametrize("opener", ["[", "{", '{"a":', "[[{"])
def test_stripping_and_parsing_survive_deeply_nested_or_unterminated_json(depth, opener):
    # Past ~1,000 levels Python's JSON decoder raises RecursionError, not ValueError.
    text = f"<tool_call>{opener * depth}"
    assert strip_tool_call_tags(text) == text
    assert parse_tool_call_tags(text) == []


# -- parse_tool_call_tags ----------------------------------------------------------


@pytest.mark.parametrize("open_tag,close_tag", SEED_TAGS, ids=TAG_IDS)
def test_a_tagged_tool_call_is_parsed_into_a_tool_call(open_tag, close_tag):
    calls = parse_tool_call_tags(f"Running it.\n{open_tag}{PAYLOAD}{close_tag}")
    assert calls == [ToolCall(id="call_0", name="shell", arguments={"command": "ls -la"})]


def test_tool_calls_are_parsed_in_order_with_string_arguments_and_ids():
    text = (
        '<tool_call>{"name": "read", "arguments": "{\\"path\\": \\"a.txt\\"}"}</tool_call>'
        '<tool_call>{"id": "abc", "name": "write", "arguments": {"path": "b.txt", "lines": [1, 2]}}</tool_call>'
        '<tool_call>{"name": "noargs"}</tool_call>'
        '<invoke>{"name": "legacy", "parameters": {"q": "x"}}</invoke>'
    )
    calls = parse_tool_call_tags(text)
    assert [(call.id, call.name, call.arguments) for call in calls] == [
        ("call_0", "read", {"path": "a.txt"}),
        ("abc", "write", {"path": "b.txt", "lines": [1, 2]}),
        ("call_2", "noargs", {}),
        ("call_3", "legacy", {"q": "x"}),
    ]


def test_a_list_payload_yields_one_call_per_entry():
    text = '<function_calls>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"n": 1}}]</function_calls>'
    assert [(call.name, call.arguments) for call in parse_tool_call_tags(text)] == [("a", {}), ("b", {"n": 1})]


def test_an_unclosed_tag_with_a_payload_is_parsed():
    assert [call.name for call in parse_tool_call_tags(f"<tool_call>\n{PAYLOAD}\n</parameters>")] == ["shell"]


@pytest.mark.parametrize("junk", [
    "<tool_call>not json</tool_call>",
    '<tool_call>{"arguments": {"x": 1}}</tool_call>',
    '<tool_call>{"name": "", "arguments": {}}</tool_call>',
    '<tool_call>{"name": 42, "arguments": {}}</tool_call>',
    '<tool_call>{"name": "x", "arguments": "not json"}</tool_call>',
    '<tool_call>{"name": "x", "arguments": [1, 2]}</tool_call>',
    '<tool_call>["just", "strings"]</tool_call>',
    f"no tags here {PAYLOAD}",
    "<tool_call> unclosed and no json",
])
def test_payloads_that_are_not_tool_calls_are_skipped(junk):
    assert parse_tool_call_tags(junk) == []


def test_junk_between_real_calls_does_not_hide_them():
    text = f"<tool>junk</tool><tool_call>{PAYLOAD}</tool_call><tool>{{\"name\": 1}}</tool>"
    assert [call.name for call in parse_tool_call_tags(text)] == ["shell"]


# -- normalize_resumable_turns -----------------------------------------------------


def seed_normalize(turns: list[ChatMessage]) -> list[tuple[str, str]]:
    """The seed's `normalize_resumable_turns`, ported line by line as an oracle."""
    normalized: list[list[str]] = []
    expecting_user = True
    for turn in turns:
        if (expecting_user, turn.role) == (True, "user"):
            normalized.append([turn.role, turn.content])
            expecting_user = False
        elif (expecting_user, turn.role) == (False, "assistant"):
            normalized.append([turn.role, turn.content])
            expecting_user = True
        elif turn.role in ("user", "assistant"):
            if normalized and turn.content:
                if normalized[-1][1]:
                    normalized[-1][1] += "\n\n"
                normalized[-1][1] += turn.content
    return [(role, content) for role, content in normalized]


@pytest.mark.parametrize("turns,expected", [
    pytest.param([user("a"), assistant("b"), user("c")], [("user", "a"), ("assistant", "b"), ("user", "c")],
                 id="alternating-kept"),
    pytest.param([user("a"), user("b"), assistant("c"), assistant("d")],
                 [("user", "a\n\nb"), ("assistant", "c\n\nd")], id="out-of-order-merged-with-blank-line"),
    pytest.param([assistant("hi"), assistant("again"), user("a")], [("user", "a")], id="leading-assistant-dropped"),
    pytest.param([ChatMessage.system("s"), user("a"), ChatMessage(role="tool", content="t"), assistant("b")],
                 [("user", "a"), ("assistant", "b")], id="other-roles-dropped"),
    pytest.param([user(""), user("b")], [("user", "b")], id="merge-into-empty-has-no-blank-line"),
    pytest.param([user("a"), user("")], [("user", "a")], id="empty-out-of-order-turn-dropped"),
    pytest.param([user("a"), assistant("")], [("user", "a"), ("assistant", "")], id="empty-in-order-turn-kept"),
    pytest.param([user("a"), assistant(""), assistant("c")], [("user", "a"), ("assistant", "c")],
                 id="merge-after-empty-turn"),
    pytest.param([], [], id="empty"),
])
def test_turns_are_normalized_as_the_seed_does(turns, expected):
    assert pairs(normalize_resumable_turns(turns)) == expected
    assert seed_normalize(turns) == expected


def test_normalizing_keeps_only_role_and_content():
    call = ToolCall(name="shell", arguments={})
    turns = [user("a"), ChatMessage(role="assistant", content="b", tool_calls=[call], name="bot")]
    assert normalize_resumable_turns(turns) == [user("a"), assistant("b")]


chat_turns = st.lists(
    st.builds(ChatMessage, role=st.sampled_from(["system", "user", "assistant", "tool"]),
              content=st.one_of(st.just(""), st.text(max_size=12))),
    max_size=25,
)


@settings(max_examples=400)
@given(chat_turns)
def test_normalized_turns_strictly_alternate_starting_with_user(turns):
    normalized = normalize_resumable_turns(turns)
    assert [turn.role for turn in normalized] == ["user", "assistant"] * (len(normalized) // 2) + (
        ["user"] if len(normalized) % 2 else [])


@settings(max_examples=400)
@given(chat_turns)
def test_normalizing_matches_the_seed_on_any_turns(turns):
    assert pairs(normalize_resumable_turns(turns)) == seed_normalize(turns)


@settings(max_examples=200)
@given(chat_turns)
def test_normalizing_loses_nothing_said_after_the_first_user_turn(turns):
    first_user = next((i for i, turn in enumerate(turns) if turn.role == "user"), len(turns))
    said = [t.content for t in turns[first_user:] if t.role in ("user", "assistant") and t.content]
    kept = [t.content for t in normalize_resumable_turns(turns) if t.content]
    assert "\n\n".join(kept) == "\n\n".join(said)


# -- turns from a stored task --------------------------------------------------------


def test_resumable_turns_strip_tags_and_drop_empty_assistant_turns(store, make_snapshot):
    store.save_snapshot(make_snapshot(resumable_history=[
        ChatMessage.system("You are helpful."),
        user("fix the build"),
        assistant(f"<tool_call>{PAYLOAD}</tool_call>"),  # empty once stripped: dropped
        ChatMessage(role="tool", content="ok", tool_call_id="call_0"),
        assistant(f"Looking.\n<tool>{PAYLOAD}</tool>\n\n\n\nFixed it."),
        user("thanks"),
        assistant("   "),
    ]))

    turns = resumable_turns_from_task_record(store.load("task-1"))

    assert pairs(turns) == [("user", "fix the build"), ("assistant", "Looking.\n\nFixed it."), ("user", "thanks")]


def test_load_resumable_state_is_none_for_an_unknown_thread(store):
    assert load_resumable_state(store, "no-such-thread") is None


def test_load_resumable_state_is_none_when_there_are_no_turns(store, make_snapshot):
    store.save_snapshot(make_snapshot(resumable_history=[
        ChatMessage.system("s"), assistant("before any user"), assistant("<invoke>{}</invoke>")]))
    assert load_resumable_state(store, "thread-1") is None


def test_load_resumable_state_gives_the_thread_s_story_and_its_latest_checkpoint_note(clocked_store, clock,
                                                                                    make_snapshot):
    clocked_store.save_snapshot(make_snapshot(TaskStatus.COMPLETED, task_id="earlier",
                                              resumable_history=[user("old"), assistant("old answer")],
                                              latest_checkpoint_note="old note"))
    clock.advance(1)
    clocked_store.save_snapshot(make_snapshot(TaskStatus.COMPLETED, task_id="latest",
                                              resumable_history=[user("hi"), assistant("<tool>{}</tool>hello")],
                                              latest_checkpoint_note="step 3 confirmed"))

    turns, note = load_resumable_state(clocked_store, "thread-1")
    assert (pairs(turns), note) == ([("user", "old"), ("assistant", "old answer"), ("user", "hi"),
                                     ("assistant", "hello")], "step 3 confirmed")

    turns, note = load_resumable_state(clocked_store, "thread-1", before_task_id="latest")
    assert (pairs(turns), note) == ([("user", "old"), ("assistant", "old answer")], "old note")

