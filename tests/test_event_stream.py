"""JSONL export of chat events: rotation, file names, truncation, links, snapshots of running tasks."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import unquote

import orjson
import pytest

from longhaul import worker
from longhaul.models import CorruptRecord, TaskNotFound, TaskSpec, TaskStatus
from longhaul.models.event_stream import EventFile, event_file_name, export_events, truncate_tool_result
from longhaul.worker.testing import FakeClock, wait_until

NAME = re.compile(r"(?P<stem>.+)-chat-events-(?P<start>\d{20})-(?P<end>\d{20})\.jsonl")


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "export"


# -- helpers ---------------------------------------------------------------------------


def lines_of(files: Sequence[EventFile]) -> list[bytes]:
    """Every line of `files`, in order, each with its newline."""
    return [line for file in files for line in file.path.read_bytes().splitlines(keepends=True)]


def events_of(files: Sequence[EventFile]) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in lines_of(files)]


def stream_of(files: Sequence[EventFile]) -> bytes:
    return b"".join(file.path.read_bytes() for file in files)


def whole_stream(store: Any, task_id: str, folder: Path) -> bytes:
    """The task's stream exported into a single file (limits far above its size)."""
    [single] = export_events(store, folder, task_ids=[task_id], max_events_per_file=10**9, max_bytes_per_file=10**12)
    return single.path.read_bytes()


def at(epoch_s: float) -> str:
    """How an export writes a timestamp."""
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def assert_complete_snapshot(files: Sequence[EventFile], folder: Path) -> list[dict[str, Any]]:
    """The files are whole (every line JSON, sizes as named) and they are all the folder holds; their events."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(f.path.name for f in files)  # no temporary files
    events = []
    for file in files:
        data = file.path.read_bytes()
        assert data.endswith(b"\n") and len(data) == file.end_offset - file.start_offset
        lines = data.splitlines()
        assert len(lines) == file.event_count
        events.extend(orjson.loads(line) for line in lines)
    assert [event["sequence"] for event in events] == list(range(len(events)))
    return events


# -- rotation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_events, expected_counts", [
    (5, [5, 5, 2]),
    (1, [1] * 12),
    (12, [12]),
    (1000, [12]),
])
def test_count_rotation_puts_exactly_max_events_in_every_file_but_the_last(
    make_stepped_task, clocked_store, out_dir, max_events, expected_counts
):
    task_id = make_stepped_task(steps=5)  # prompt, 5 x (assistant, tool), final answer: 12 events

    files = export_events(clocked_store, out_dir, max_events_per_file=max_events)

    assert [file.event_count for file in files] == expected_counts
    assert [event["sequence"] for event in events_of(files)] == list(range(12))
    assert {file.task_id for file in files} == {task_id}


def test_byte_rotation_keeps_each_file_within_max_bytes_and_fills_it_before_the_next(
    make_stepped_task, clocked_store, out_dir
):
    make_stepped_task(steps=30, tool_output=lambda step, call: "x" * (37 * step % 200))
    max_bytes = 2_000

    files = export_events(clocked_store, out_dir, max_bytes_per_file=max_bytes)

    sizes = [file.path.stat().st_size for file in files]
    assert len(files) > 3 and all(size <= max_bytes for size in sizes), sizes
    first_lines = [file.path.read_bytes().splitlines(keepends=True)[0] for file in files]
    for size, next_first_line in zip(sizes[:-1], first_lines[1:], strict=True):
        assert size + len(next_first_line) > max_bytes  # rotated only because the next event did not fit
    # The seed compared the stream's offset with the per-file limit: every file after the first held one event.
    assert all(file.event_count > 1 for file in files[:-1])


def test_rotation_applies_both_limits_whichever_is_reached_first(make_stepped_task, clocked_store, out_dir):
    make_stepped_task(steps=20, tool_output=lambda step, call: "y" * (700 if step > 10 else 10))
    max_bytes = 3_000

    files = export_events(clocked_store, out_dir, max_events_per_file=6, max_bytes_per_file=max_bytes)

    assert all(file.event_count <= 6 and file.path.stat().st_size <= max_bytes for file in files)
    assert files[0].event_count == 6  # small early events: the count limit cuts
    assert any(file.event_count < 6 for file in files[:-1])  # large later events: the byte limit cuts


def test_an_event_larger_than_max_bytes_goes_alone_into_its_own_file(make_stepped_task, clocked_store, out_dir):
    make_stepped_task(steps=6, tool_output=lambda step, call: "big " * 800 if step == 3 else "small")
    max_bytes = 1_000

    files = export_events(clocked_store, out_dir, max_bytes_per_file=max_bytes)

    oversized = [file for file in files if file.path.stat().st_size > max_bytes]
    assert len(oversized) == 1 and oversized[0].event_count == 1
    [event] = events_of(oversized)
    assert event["content"].startswith("big big") and event["message_type"] == "tool_result"
    neighbours = files[files.index(oversized[0]) - 1], files[files.index(oversized[0]) + 1]
    assert all(file.event_count > 1 for file in neighbours)  # the files around it still fill up


# -- file names and offsets ----------------------------------------------------------------------


def test_file_names_give_each_files_byte_offsets_within_the_task_stream(
    make_stepped_task, clocked_store, out_dir, tmp_path
):
    task_id = make_stepped_task(steps=12, tool_output=lambda step, call: "z" * (13 * step))

    files = export_events(clocked_store, out_dir, max_bytes_per_file=900)

    assert len(files) > 2
    assert stream_of(files) == whole_stream(clocked_store, task_id, tmp_path / "whole")
    offset = 0
    for file in files:
        size = file.path.stat().st_size
        match = NAME.fullmatch(file.path.name)
        assert match is not None, file.path.name
        assert (int(match["start"]), int(match["end"])) == (file.start_offset, file.end_offset) == (offset,
                                                                                                   offset + size)
        assert match["stem"] == task_id and file.path.name == event_file_name(task_id, offset, offset + size)
        offset += size
    assert sorted(files, key=lambda file: file.path.name) == files  # zero padding: name order is stream order


def test_a_task_id_with_slashes_stays_inside_the_output_folder(make_stepped_task, clocked_store, out_dir):
    task_id = make_stepped_task("../../escape/me", steps=1)

    files = export_events(clocked_store, out_dir)

    assert [file.path.parent for file in files] == [out_dir]
    match = NAME.fullmatch(files[0].path.name)
    assert match is not None and unquote(match["stem"]) == task_id
    assert events_of(files)[0]["task_id"] == task_id


def test_exporting_again_replaces_the_files_of_the_earlier_export(
    make_stepped_task, make_update, clocked_store, out_dir
):
    task_id = make_stepped_task("task-1", steps=2, finish=False)  # prompt + 2 steps: 5 events
    first = export_events(clocked_store, out_dir, max_events_per_file=4)
    clocked_store.record_checkpoint(make_update(3))

    second = export_events(clocked_store, out_dir, max_events_per_file=4)

    assert [file.event_count for file in first] == [4, 1] and [file.event_count for file in second] == [4, 3]
    assert first[0].path == second[0].path and first[1].path not in [file.path for file in second]
    events = assert_complete_snapshot(second, out_dir)
    assert len(events) == 7 and events[-1]["event_id"] == f"{task_id}:6"


# -- what an event says ----------------------------------------------------------------------------


def test_tool_results_link_to_the_assistant_message_that_asked_with_their_success_and_duration(
    make_stepped_task, clocked_store, clock: FakeClock, out_dir
):
    started_s = clock()
    task_id = make_stepped_task(steps=2, calls=2, failing=((2, 1),))

    events = events_of(export_events(clocked_store, out_dir))

    assert [e["message_type"] for e in events] == ["user", "assistant", "tool_result", "tool_result",
                                                   "assistant", "tool_result", "tool_result", "assistant"]
    assert [e["role"] for e in events] == ["user", "assistant", "tool", "tool", "assistant", "tool", "tool",
                                           "assistant"]
    assert [e["event_id"] for e in events] == [f"{task_id}:{i}" for i in range(8)]
    assert all(e["task_id"] == e["session_id"] == task_id for e in events)
    tools = [e for e in events if e["message_type"] == "tool_result"]
    assert [e["parent_event_id"] for e in tools] == [f"{task_id}:1"] * 2 + [f"{task_id}:4"] * 2
    assert [e["success"] for e in tools] == [True, True, True, False]
    assert [e["duration_ms"] for e in tools] == [10.5, 11.5, 20.5, 21.5]
    assert [e["tool_name"] for e in tools] == ["shell"] * 4
    assert [e["content"] for e in tools] == ["output 1.0", "output 1.1", "output 2.0", "output 2.1"]
    others = [e for e in events if e["message_type"] != "tool_result"]
    assert all(e["parent_event_id"] is None and e["success"] is None and e["duration_ms"] is None for e in others)
    # The prompt when the task was created, each step at its checkpoint, the answer when it completed.
    assert [e["recorded_at"] for e in events] == [at(started_s)] + [at(started_s + 1)] * 3 + [
        at(started_s + 2)] * 3 + [at(started_s + 3)]


def test_a_tool_result_without_a_trace_or_a_matching_call_id_still_gets_its_parent_and_success(
    make_update, clocked_store, out_dir
):
    clocked_store.record_checkpoint(make_update(1))  # no traces; the assistant message lists no calls

    events = events_of(export_events(clocked_store, out_dir))

    assistant, tool = events
    assert tool["parent_event_id"] == assistant["event_id"]
    assert (tool["success"], tool["duration_ms"]) == (True, None)


def test_a_task_that_answers_at_once_dates_its_opening_at_its_start_and_its_answer_at_its_end(
    embedded_runtime, out_dir
):
    worker.run_inline("first question", task_id="earlier", thread_id="thread", steps=0)
    record = worker.run_inline("second question", task_id="later", thread_id="thread", steps=0)
    assert record.started_at is not None and record.completed_at is not None

    events = events_of(export_events(embedded_runtime.store, out_dir, task_ids=["later"]))

    assert [(e["role"], e["content"][:15]) for e in events] == [
        ("user", "first question"), ("assistant", "Done: 0 steps r"), ("user", "second question"),
        ("assistant", "Done: 0 steps r")]
    iso = [at(record.started_at.timestamp())] * 3 + [at(record.completed_at.timestamp())]
    assert [e["recorded_at"] for e in events] == iso


@pytest.mark.parametrize("content, expected", [
    pytest.param("x" + "é" * 6000, "x" + "é" * 4999 + "...[truncated 12001 bytes]", id="2-byte char at the cut"),
    pytest.param("a" * 9998 + "😀" + "b", "a" * 9998 + "...[truncated 10003 bytes]", id="4-byte char at the cut"),
    pytest.param("w" * 10_001, "w" * 10_000 + "...[truncated 10001 bytes]", id="one byte over"),
    pytest.param("z" * 10_000, "z" * 10_000, id="exactly the limit"),
])
def test_long_tool_results_are_cut_on_a_character_boundary_with_their_original_size(content, expected):
    assert truncate_tool_result(content) == expected
    assert len(truncate_tool_result(content).split("...[truncated")[0].encode()) <= 10_000


def test_an_export_truncates_tool_results_over_10000_bytes_and_nothing_else(
    make_stepped_task, clocked_store, out_dir
):
    make_stepped_task(steps=2, tool_output=lambda step, call: "é" * 7_000 if step == 1 else "short",
                      prompt="p" * 20_000)

    events = events_of(export_events(clocked_store, out_dir))

    long_result = events[2]["content"]
    assert long_result == "é" * 5_000 + "...[truncated 14000 bytes]"
    assert events[4]["content"] == "short"
    assert events[0]["content"] == "p" * 20_000  # the prompt is not a tool result


# -- consistency -----------------------------------------------------------------------------------


def test_a_task_exported_while_it_runs_is_a_snapshot_of_whole_steps_without_torn_lines(make_runtime, out_dir):
    rt = make_runtime()
    task_id = worker.submit(rt, "export me while I run", task_id="live", steps=40, step_delay_s=0.02)
    rt.start_embedded_worker()
    rt.send(task_id)
    wait_until(lambda: rt.store.summary(task_id).checkpoint_count >= 1, timeout_s=10, what="the first step")

    exports_while_running = 0
    while not rt.store.summary(task_id).status.is_terminal:
        files = export_events(rt.store, out_dir, task_ids=[task_id], max_events_per_file=5, max_bytes_per_file=1_500)
        events = assert_complete_snapshot(files, out_dir)
        # Whole steps only: the prompt, then (assistant, tool result) pairs, maybe the final answer.
        for event in events:
            if event["message_type"] == "tool_result":
                assert event["parent_event_id"] == events[event["sequence"] - 1]["event_id"]
        assert events[-1]["message_type"] in ("user", "tool_result") or events[-1]["content"].startswith("Done")
        exports_while_running += 1
    final = assert_complete_snapshot(export_events(rt.store, out_dir, task_ids=[task_id], max_events_per_file=5,
                                                   max_bytes_per_file=1_500), out_dir)

    assert exports_while_running >= 3, "the task finished before the export could watch it run"
    assert rt.store.summary(task_id).status is TaskStatus.COMPLETED
    assert len(final) == 1 + 2 * 40 + 1 and final[-1]["content"].startswith("Done: 40 steps")


def test_an_export_of_all_tasks_gives_each_task_its_own_stream_from_offset_zero(
    make_stepped_task, clocked_store, out_dir
):
    make_stepped_task("first", steps=2)
    make_stepped_task("second", steps=3, calls=2)
    clocked_store.create_task(task_id="queued", thread_id="queued", channel="test", provider="scripted",
                              model="m", spec=TaskSpec(prompt="not started"))

    files = export_events(clocked_store, out_dir, max_events_per_file=4)

    by_task = {task_id: [f for f in files if f.task_id == task_id] for task_id in ("first", "second", "queued")}
    assert [f.event_count for f in by_task["first"]] == [4, 2]
    assert [f.event_count for f in by_task["second"]] == [4, 4, 3]
    assert by_task["queued"] == []  # no messages yet: no file
    assert all(task_files[0].start_offset == 0 for task_files in by_task.values() if task_files)
    assert all(e["task_id"] == "second" for e in events_of(by_task["second"]))
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f.path.name for f in files)


def test_an_export_of_chosen_tasks_writes_only_those(make_stepped_task, clocked_store, out_dir):
    make_stepped_task("first", steps=1)
    make_stepped_task("second", steps=1)

    files = export_events(clocked_store, out_dir, task_ids=["second"])

    assert [f.task_id for f in files] == ["second"]


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("limits, name", [
    ({"max_events_per_file": 0}, "max_events_per_file"),
    ({"max_bytes_per_file": 0}, "max_bytes_per_file"),
    ({"max_bytes_per_file": -5}, "max_bytes_per_file"),
])
def test_limits_below_one_are_refused_naming_the_parameter(make_stepped_task, clocked_store, out_dir, limits, name):
    make_stepped_task(steps=1)

    with pytest.raises(ValueError, match=name):
        export_events(clocked_store, out_dir, **limits)
    assert not out_dir.exists()


def test_an_unknown_task_id_raises_task_not_found_before_any_file_is_written(
    make_stepped_task, clocked_store, out_dir
):
    make_stepped_task("known", steps=1)

    with pytest.raises(TaskNotFound, match="missing"):
        export_events(clocked_store, out_dir, task_ids=["known", "missing"])
    assert not out_dir.exists()


# -- many tasks --------------------------------------------------------------------------------------------


def test_exporting_many_tasks_again_removes_only_their_stale_files_and_lists_the_folder_once(
    make_stepped_task, clocked_store, out_dir, monkeypatch
):
    ids = [make_stepped_task(f"task-{index:03d}", steps=2) for index in range(300)]  # more than one publish group
    first = export_events(clocked_store, out_dir, max_events_per_file=2)  # 6 events a task: 3 files each
    stranger = out_dir / "notes.txt"
    stranger.write_text("not an export file")
    scans: list[Path] = []
    real_scandir = __import__("os").scandir
    monkeypatch.setattr("longhaul.models.event_stream.os.scandir",
                        lambda path: scans.append(Path(path)) or real_scandir(path))

    second = export_events(clocked_store, out_dir, max_events_per_file=4)  # 2 files each now

    assert len(first) == 3 * len(ids) and len(second) == 2 * len(ids)
    assert scans == [out_dir]  # one listing for 300 tasks: linear, not a scan per task
    assert stranger.exists()
    stranger.unlink()
    # The first export's third files are gone, and no temporaries are left.
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f.path.name for f in second)
    for task_id in (ids[0], ids[150], ids[-1]):
        events = events_of([file for file in second if file.task_id == task_id])
        assert [event["sequence"] for event in events] == list(range(6))


def test_an_export_that_fails_midway_leaves_no_temporary_files(make_stepped_task, clocked_store, out_dir):
    for index in range(5):
        make_stepped_task(f"task-{index}", steps=1)
    clocked_store.db.execute_sql("UPDATE \"checkpoint\" SET \"items\" = 'not json' WHERE \"task_id\" = "
                                 "(SELECT \"id\" FROM \"task\" WHERE \"task_id\" = 'task-3')")

    with pytest.raises(CorruptRecord, match="task-3"):
        export_events(clocked_store, out_dir)

    assert not [path.name for path in out_dir.iterdir() if path.name.startswith(".")]
