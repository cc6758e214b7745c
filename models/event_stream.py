"""JSON Lines export of a task's chat events, in rotated files named by byte offset.

One chat event per message of a task's execution history, in history order:
who said what, when, which tool answered, whether it succeeded and how long
it took, and which assistant message asked for it. Every line has the same
keys (null where a field does not apply)::

    recorded_at, task_id, session_id, role, message_type, content, tool_name,
    success, duration_ms, parent_event_id, event_id, sequence

Each task's events form one byte stream (offsets start at 0 per task), cut
into files of at most `max_events_per_file` events and `max_bytes_per_file`
bytes, each file named ``<task_id>-chat-events-<start>-<end>.jsonl`` with the
20-digit, zero-padded byte offsets of its first byte and of the byte after
its last line. Concatenating a task's files in name order gives the stream.
Both limits apply to each file on its own (its own event count and bytes),
never to the stream's offset, so every file but a task's last is full.

Consistency: a task is read inside one read transaction, so a task that is
running while it is exported yields a snapshot of complete steps; every file
is written under a temporary name and renamed into place once complete, so
no reader ever sees a torn line or a half file. Files of an earlier export
of the same task into the same folder that the new export does not
reproduce are removed afterwards, so the folder holds one snapshot per task.
Two exports of one task into one folder at the same time are not supported.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence, Union
from urllib.parse import quote

import orjson

from .codec import stored_events, stored_step_trace, to_datetime
from .dialect import StoreFailures
from .errors import CorruptRecord, InvalidInput, TaskNotFound
from .schemas import TaskStatus
from .statements import render_sql
from .tables import EXECUTION, Tables
from .traces import StoredBatch

if TYPE_CHECKING:
    from .store import TaskStore

#: Tool results longer than this many bytes (UTF-8) are cut, with a marker giving the original size.
MAX_TOOL_RESULT_BYTES = 10_000
DEFAULT_MAX_EVENTS_PER_FILE = 10_000
DEFAULT_MAX_BYTES_PER_FILE = 10 * 1024 * 1024

_MESSAGE_TYPES = {"user": "user", "assistant": "assistant", "system": "system", "tool": "tool_result"}
_TOOL_END_EVENTS = ("tool_call_completed", "tool_call_failed")
_OFFSET_DIGITS = 20
#: Longest file-name stem taken from a task id before it is shortened with a hash (names stay < 255 bytes).
_MAX_STEM_CHARS = 160


@dataclass(frozen=True)
class EventFile:
    """One exported file: its task's events from byte `start_offset` to `end_offset` (exclusive)."""

    path: Path
    task_id: str
    start_offset: int
    end_offset: int
    event_count: int


def export_events(
    store: TaskStore,
    out_dir: Union[str, Path],
    *,
    task_ids: Optional[Sequence[str]] = None,
    max_events_per_file: int = DEFAULT_MAX_EVENTS_PER_FILE,
    max_bytes_per_file: int = DEFAULT_MAX_BYTES_PER_FILE,
) -> list[EventFile]:
    """Write the chat events of `task_ids` (default: every task) as JSONL files in `out_dir`.

    Returns the files written, per task in stream order, tasks in the order
    given (all tasks: oldest first). A task with no messages yet writes no
    file. A single event larger than `max_bytes_per_file` goes alone into
    one file. Raises `ValueError` naming the parameter for a limit below 1,
    `TaskNotFound` for an unknown task id (checked before anything is
    written), and `InvalidInput` naming `out_dir` for a folder that cannot be
    created or written (``/dev/null``, ``/proc/x``, a read-only place).
    """
    if max_events_per_file < 1:
        raise ValueError(f"max_events_per_file: must be at least 1, got {max_events_per_file!r}")
    if max_bytes_per_file < 1:
        raise ValueError(f"max_bytes_per_file: must be at least 1, got {max_bytes_per_file!r}")
    with StoreFailures():
        ids = _task_ids(store.tables, task_ids)
    folder = Path(out_dir)
    written: list[EventFile] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # The folder is listed once, not once per task: exporting N tasks into a folder of N tasks'
        # files stays linear (a scan per task made `export --all` quadratic: 79 s at 10k tasks).
        publisher = _Publisher(folder, _EarlierFiles(folder))
        reads = _ExportReads(store)
        try:
            for task_id in ids:
                finished = _export_task(reads, task_id, folder, max_events_per_file, max_bytes_per_file)
                publisher.add(task_id, finished)
                written.extend(file for _tmp, file in finished)
            publisher.publish()  # the last group; every rename and removal durable before the export returns
        except BaseException:
            publisher.discard()
            raise
    except OSError as exc:
        problem = "it is not a folder" if folder.exists() and not folder.is_dir() else exc.strerror or str(exc)
        raise InvalidInput(f"out_dir (--out): cannot write export files in {str(folder)!r} ({problem}); "
                           "give a writable folder") from None
    return written


def _task_ids(tables: Tables, task_ids: Optional[Sequence[str]]) -> list[str]:
    """The ids to export: `task_ids` once each, all of them known (else `TaskNotFound`), or every task."""
    Task = tables.Task
    if task_ids is None:
        return [row[0] for row in Task.select(Task.task_id).order_by(Task.created_at, Task.id).tuples()]
    ids = list(dict.fromkeys(task_ids))
    known = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        known.update(row[0] for row in Task.select(Task.task_id).where(Task.task_id.in_(chunk)).tuples())
    missing = [task_id for task_id in ids if task_id not in known]
    if missing:
        raise TaskNotFound(missing[0])
    return ids


def event_file_name(task_id: str, start_offset: int, end_offset: int) -> str:
    """``<task_id>-chat-events-<start>-<end>.jsonl``, the task id made safe for a file name."""
    return f"{_file_stem(task_id)}-chat-events-{start_offset:0{_OFFSET_DIGITS}d}-{end_offset:0{_OFFSET_DIGITS}d}.jsonl"


def truncate_tool_result(content: str, max_bytes: int = MAX_TOOL_RESULT_BYTES) -> str:
    """`content`, cut to `max_bytes` UTF-8 bytes (never inside a character) plus ``...[truncated N bytes]``.

    N is the original size in bytes. Content within the limit is returned unchanged.
    """
    data = content.encode("utf-8")
    if len(data) <= max_bytes:
        return content
    cut = max_bytes
    while cut > 0 and (data[cut] & 0xC0) == 0x80:  # a continuation byte: the character straddles the cut
        cut -= 1
    return data[:cut].decode("utf-8") + f"...[truncated {len(data)} bytes]"


# -- one task ------------------------------------------------------------------------


class _ExportReads:
    """The statements exporting one task runs, rendered once per export and run with each task's values.

    Rendering a peewee query costs more than SQLite takes to run it: with
    six queries a task, rendering was most of what `export --all` spent.
    """

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        tables = store.tables
        Task, Message, Checkpoint, TraceBatch = tables.Task, tables.Message, tables.Checkpoint, tables.TraceBatch
        in_execution = (Message.task == 0) & (Message.history == EXECUTION)
        # Parameters, in order: the task id; else the task's primary key (then the history, EXECUTION).
        self.task = render_sql(Task.select(Task.id, Task.created_at, Task.started_at, Task.updated_at,
                                           Task.completed_at, Task.status).where(Task.task_id == ""))
        self.checkpoints = render_sql(Checkpoint.select(Checkpoint.step_index, Checkpoint.created_at, Checkpoint.items,
                                                        Checkpoint.trace_first_sequence, Checkpoint.trace)
                                      .where(Checkpoint.task == 0).order_by(Checkpoint.step_index))
        self.trace_batches = render_sql(TraceBatch.select(TraceBatch.first_sequence, TraceBatch.started_at,
                                                          TraceBatch.agent, TraceBatch.model, TraceBatch.job_type,
                                                          TraceBatch.events)
                                        .where(TraceBatch.task == 0).order_by(TraceBatch.last_sequence))
        self.first_stepped = render_sql(Message.select(Message.position)
                                        .where(in_execution & Message.step_index.is_null(False))
                                        .order_by(Message.position).limit(1))
        self.last_user = render_sql(Message.select(Message.position).where(in_execution & (Message.role == "user"))
                                    .order_by(Message.position.desc()).limit(1))
        self.messages = render_sql(Message.select(Message.position, Message.step_index, Message.role, Message.content,
                                                  Message.tool_call_id, Message.name, Message.tool_calls)
                                   .where(in_execution).order_by(Message.position))

    def run(self, sql: str, *params: Any) -> Any:
        return self.store.db.execute_sql(sql, params)


def _export_task(reads: _ExportReads, task_id: str, folder: Path, max_events: int,
                 max_bytes: int) -> list[tuple[Path, EventFile]]:
    """The task's files, written and closed under temporary names: `_Publisher` puts them in place."""
    writer = _RotatingWriter(folder, task_id, max_events=max_events, max_bytes=max_bytes)
    try:
        with StoreFailures(task_id), reads.store.read_snapshot():
            for event in _chat_events(reads, task_id):
                writer.write(orjson.dumps(event, option=orjson.OPT_UTC_Z | orjson.OPT_APPEND_NEWLINE))
        finished = writer.close()
    except BaseException:
        writer.discard()
        raise
    return finished


def _chat_events(reads: _ExportReads, task_id: str) -> Iterator[dict[str, Any]]:
    """The task's chat events in history order; call inside one read transaction."""
    task = reads.run(reads.task, task_id).fetchone()
    if task is None:
        raise TaskNotFound(task_id)
    task_pk, created_at, started_at, updated_at, completed_at, status = task
    checkpoint_rows = reads.run(reads.checkpoints, task_pk).fetchall()
    steps = _step_outcomes(task_id, checkpoint_rows)
    durations = _tool_durations(task_id, reads.run(reads.trace_batches, task_pk).fetchall(), checkpoint_rows)
    first_stepped = _scalar(reads.run(reads.first_stepped, task_pk, EXECUTION, 1))
    last_user = _scalar(reads.run(reads.last_user, task_pk, EXECUTION, "user", 1))
    # Messages without a step are either the opening (thread turns, the prompt) or
    # what `finish` appended (the final answer): the opening ends at the first step,
    # or, for a task that answered at once, after its last user message.
    opening_end = first_stepped if first_stepped is not None else (
        last_user + 1 if last_user is not None else float("inf"))
    opened_at = to_datetime(started_at or created_at)
    closed_at = to_datetime(completed_at or updated_at)

    links = _ParentLinks(task_id)
    tool_index: dict[int, int] = {}  # step -> tool results seen so far in it
    rows = reads.run(reads.messages, task_pk, EXECUTION)
    # A running task's open step (its answer journaled, its checkpoint not yet) is left out: whole steps only.
    # A finished task's last step may be closed without a checkpoint (its calls answered by `finish`): kept.
    if not TaskStatus(status).is_terminal:
        rows = (row for row in rows if row[1] is None or row[1] in steps)
    for sequence, (position, step, role, content, tool_call_id, name, tool_calls) in enumerate(rows):
        event_id = f"{task_id}:{sequence}"
        event: dict[str, Any] = dict(
            recorded_at=_recorded_at(steps, step, position, opening_end, opened_at, closed_at),
            task_id=task_id, session_id=task_id, role=role, message_type=_MESSAGE_TYPES.get(role, role),
            content=content, tool_name=None, success=None, duration_ms=None, parent_event_id=None,
            event_id=event_id, sequence=sequence,
        )
        if role == "assistant":
            links.assistant(event_id, tool_calls)
        elif role == "tool":
            index = tool_index.get(step, 0) if step is not None else 0
            if step is not None:
                tool_index[step] = index + 1
            outcome = steps.get(step) if step is not None else None
            event.update(
                content=truncate_tool_result(content), tool_name=name, parent_event_id=links.parent(tool_call_id),
                success=outcome.success(index) if outcome else None,
                duration_ms=durations.lookup(step, tool_call_id, index, outcome.calls if outcome else 0),
            )
        yield event


def _recorded_at(steps: dict[int, _StepOutcome], step: Optional[int], position: int, opening_end: float,
                 opened_at: Optional[datetime], closed_at: Optional[datetime]) -> Optional[datetime]:
    if step is not None:
        outcome = steps.get(step)
        return outcome.created_at if outcome is not None else closed_at
    return opened_at if position < opening_end else closed_at


@dataclass(frozen=True)
class _StepOutcome:
    created_at: Optional[datetime]
    successes: tuple[bool, ...]  # per tool call, in call order

    @property
    def calls(self) -> int:
        return len(self.successes)

    def success(self, index: int) -> Optional[bool]:
        return self.successes[index] if index < len(self.successes) else None


def _step_outcomes(task_id: str, checkpoint_rows: list[tuple[Any, ...]]) -> dict[int, _StepOutcome]:
    """step -> when its checkpoint was written and which of its calls succeeded (outputs are dropped)."""
    outcomes: dict[int, _StepOutcome] = {}
    for step, created_at, items, _first_sequence, _trace in checkpoint_rows:
        try:
            successes = tuple(bool(item.get("success")) for item in orjson.loads(items))
        except (orjson.JSONDecodeError, AttributeError, TypeError) as exc:
            raise CorruptRecord(task_id, f"checkpoint[{step}].items", str(exc)) from None
        outcomes[step] = _StepOutcome(to_datetime(created_at), successes)
    return outcomes


def _scalar(cursor: Any) -> Any:
    row = cursor.fetchone()
    return None if row is None else row[0]


class _Durations:
    """Tool call durations from the trace, by ``(step, call_id)``; by call order for calls without an id."""

    def __init__(self) -> None:
        self.by_id: dict[tuple[int, str], float] = {}
        self.in_order: dict[int, list[float]] = {}

    def add(self, step: int, call_id: str, duration_ms: float) -> None:
        if call_id:
            self.by_id[(step, call_id)] = duration_ms  # a step that ran twice: its later (checkpointed) run wins
        self.in_order.setdefault(step, []).append(duration_ms)

    def lookup(self, step: Optional[int], call_id: Optional[str], index: int, calls: int) -> Optional[float]:
        if step is None:
            return None
        if call_id:
            return self.by_id.get((step, call_id))
        recorded = self.in_order.get(step, [])[-calls:] if calls else []
        return recorded[index] if index < len(recorded) else None


def _tool_durations(task_id: str, batch_rows: list[tuple[Any, ...]],
                    checkpoint_rows: list[tuple[Any, ...]]) -> _Durations:
    """The durations in the task's trace: its `trace_batch` rows and its checkpoints' step traces, in sequence order.

    What `TraceStore.batches` reads, from rows this export has read already.
    """
    batches: list[StoredBatch] = [tuple(row) for row in batch_rows]  # type: ignore[misc]
    batches.extend(stored_step_trace(task_id, first, raw) for _step, _at, _items, first, raw in checkpoint_rows
                   if raw is not None)
    batches.sort(key=lambda batch: batch[0])
    durations = _Durations()
    for batch in batches:
        for _sequence, _ms, event_type, data, _refs in stored_events(task_id, batch[0], batch[5]):
            if event_type not in _TOOL_END_EVENTS:
                continue
            step, duration_ms = data.get("step"), data.get("duration_ms")
            if isinstance(step, int) and isinstance(duration_ms, (int, float)):
                durations.add(step, str(data.get("call_id") or ""), float(duration_ms))
    return durations


class _ParentLinks:
    """Which assistant message asked for each tool result."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.by_call_id: dict[str, str] = {}
        self.latest: Optional[str] = None  # the latest assistant message

    def assistant(self, event_id: str, tool_calls_json: Optional[str]) -> None:
        self.latest = event_id
        # Providers reuse ids across turns (``call_0`` every step): only this turn's count.
        self.by_call_id = {}
        for call in _decode_calls(self.task_id, tool_calls_json):
            call_id = call.get("id") if isinstance(call, dict) else None
            if call_id:
                self.by_call_id[str(call_id)] = event_id

    def parent(self, tool_call_id: Optional[str]) -> Optional[str]:
        if tool_call_id and tool_call_id in self.by_call_id:
            return self.by_call_id[tool_call_id]
        return self.latest


def _decode_calls(task_id: str, raw: Optional[str]) -> list[Any]:
    if raw is None:
        return []
    try:
        calls = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CorruptRecord(task_id, "message.tool_calls", str(exc)) from None
    return calls if isinstance(calls, list) else []


# -- files ---------------------------------------------------------------------------


class _RotatingWriter:
    """Cuts one task's event stream into files, each closed under a temporary name (`_Publisher` renames them)."""

    def __init__(self, folder: Path, task_id: str, *, max_events: int, max_bytes: int) -> None:
        self.folder = folder
        self.task_id = task_id
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.offset = 0  # bytes of the stream written so far
        self.finished: list[tuple[Path, EventFile]] = []  # (temporary path, the file it becomes)
        self._handle: Optional[IO[bytes]] = None
        self._tmp_path: Optional[Path] = None
        self._file_start = 0
        self._file_events = 0

    def write(self, line: bytes) -> None:
        if self._handle is not None and (
            self._file_events >= self.max_events or self.offset - self._file_start + len(line) > self.max_bytes
        ):
            self._finish_file()
        if self._handle is None:
            self._tmp_path = self.folder / f".{_file_stem(self.task_id)}.{uuid.uuid4().hex}.tmp"
            self._handle = open(self._tmp_path, "xb")
            self._file_start, self._file_events = self.offset, 0
        self._handle.write(line)
        self.offset += len(line)
        self._file_events += 1

    def close(self) -> list[tuple[Path, EventFile]]:
        if self._handle is not None:
            self._finish_file()
        return self.finished

    def discard(self) -> None:
        """Remove every temporary file of this task (after an error): none was put in place yet."""
        handle, path = self._handle, self._tmp_path
        self._handle = self._tmp_path = None
        if handle is not None:
            handle.close()
        if path is not None:
            path.unlink(missing_ok=True)
        for tmp_path, _file in self.finished:
            tmp_path.unlink(missing_ok=True)

    def _finish_file(self) -> None:
        handle, tmp_path = self._handle, self._tmp_path
        assert handle is not None and tmp_path is not None
        handle.close()
        self._handle = self._tmp_path = None
        path = self.folder / event_file_name(self.task_id, self._file_start, self.offset)
        self.finished.append((tmp_path, EventFile(path=path, task_id=self.task_id, start_offset=self._file_start,
                                                  end_offset=self.offset, event_count=self._file_events)))


#: Files put in place together (see `_Publisher`).
_FILES_PER_PUBLISH = 256


class _Publisher:
    """Puts finished files in place a group at a time: each fsynced, then renamed, then the stale ones removed.

    A rename never exposes a file whose bytes are not on disk. On Linux one
    ``syncfs`` of the folder's file system makes a whole group durable at
    once; elsewhere each file is fsynced, after all are written (the
    journal commit the first forces carries the others' data too). Either
    costs a fraction of writing, syncing and renaming each file in turn,
    which was most of what exporting 100,000 small tasks spent.
    """

    def __init__(self, folder: Path, earlier: _EarlierFiles) -> None:
        self.folder = folder
        self.earlier = earlier
        self.pending: list[tuple[Path, EventFile]] = []
        self.tasks: list[tuple[str, set[str]]] = []  # (task id, names of its new files)

    def add(self, task_id: str, finished: list[tuple[Path, EventFile]]) -> None:
        self.pending.extend(finished)
        self.tasks.append((task_id, {file.path.name for _tmp, file in finished}))
        if len(self.pending) >= _FILES_PER_PUBLISH or len(self.tasks) >= _FILES_PER_PUBLISH:
            self.publish()

    def publish(self) -> None:
        if self.pending and not _sync_filesystem(self.folder):
            for tmp_path, _file in self.pending:
                fd = os.open(tmp_path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        for tmp_path, file in self.pending:
            os.replace(tmp_path, file.path)
        self.pending = []
        for task_id, keep in self.tasks:
            self.earlier.remove_stale(task_id, keep=keep)  # after the new files are in place
        self.tasks = []
        _fsync_folder(self.folder)

    def discard(self) -> None:
        """Remove the files not yet put in place (after an error); those already in place stay."""
        for tmp_path, _file in self.pending:
            tmp_path.unlink(missing_ok=True)
        self.pending, self.tasks = [], []


def _file_stem(task_id: str) -> str:
    """The task id as a file-name stem: percent-encoded (so ``/`` cannot make a path), hashed if long."""
    stem = quote(task_id, safe="")
    if len(stem) > _MAX_STEM_CHARS:
        digest = hashlib.sha256(task_id.encode("utf-8")).hexdigest()[:16]
        stem = f"{stem[:_MAX_STEM_CHARS - 17]}-{digest}"
    return stem


def _sync_filesystem(folder: Path) -> bool:
    """``syncfs(2)`` the file system holding `folder` (Linux): True if done, False where unavailable or refused."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return False
    fd = os.open(folder, os.O_RDONLY)
    try:
        return syncfs(fd) == 0
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _EarlierFiles:
    """The export files already in a folder, by file-name stem, listed once; removes a task's stale ones."""

    _NAME = re.compile(rf"(.+)-chat-events-\d{{{_OFFSET_DIGITS}}}-\d{{{_OFFSET_DIGITS}}}\.jsonl")

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.by_stem: dict[str, list[str]] = {}
        for entry in os.scandir(folder):
            found = self._NAME.fullmatch(entry.name)
            if found is not None:
                self.by_stem.setdefault(found.group(1), []).append(entry.name)

    def remove_stale(self, task_id: str, *, keep: Iterable[str]) -> None:
        """Delete this task's files from an earlier export that the new one did not rewrite."""
        keep = set(keep)
        for name in self.by_stem.pop(_file_stem(task_id), ()):
            if name not in keep:
                (self.folder / name).unlink(missing_ok=True)


__all__ = ["EventFile", "export_events", "event_file_name", "truncate_tool_result", "MAX_TOOL_RESULT_BYTES"]
