"""`read_file`, `write_file`, `list_files`: files confined to the task's own workspace.

A task's workspace is ``<LONGHAUL_WORKSPACE_ROOT>/<folder>``, its folder
name an injective encoding of the task id (`worker.workspaces`), created on
first use and deleted with the task. Paths are relative to it. Refused:
absolute paths, any ``..`` component, any path that resolves (through
symlinks) outside the workspace, and files with more than one hard link;
files are opened with ``O_NOFOLLOW`` after that check, so a symlink swapped
in between cannot redirect the open. Sizes are capped per
file (`LONGHAUL_WORKSPACE_MAX_FILE_BYTES`) and per workspace
(`LONGHAUL_WORKSPACE_MAX_BYTES`).

**Exactly-once writes.** `write_file` keeps a journal keyed by the call's
idempotency key (``<task_id>:<step>:<call_index>``) under
``<root>/.journal/<task>/``, outside the workspace the model sees. The step
that was in flight at a crash runs again with the same keys: a write that
already happened is reported, not repeated (so an ``append`` is not
doubled), and a write interrupted half-way is completed once. The journal
matches the request too (path, content, mode): if the model asks for a
different write on the rerun, that write is carried out.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ToolError
from ..workspaces import journal_path, workspace_path
from .base import ToolContext, ToolFunction, define_tool

#: How many entries `list_files` shows at most.
MAX_LIST_ENTRIES = 1000
#: Names of files a crashed write may leave behind; never listed.
TEMP_PREFIX = ".longhaul-tmp-"

# -- the workspace ---------------------------------------------------------------------------


def workspace_root(ctx: ToolContext) -> Path:
    return Path(ctx.get_settings().workspace_root).resolve()


def workspace_of(ctx: ToolContext) -> Path:
    """The task's workspace directory (created if needed), fully resolved."""
    path = workspace_path(workspace_root(ctx), ctx.task_id)
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def resolve_in_workspace(workspace: Path, path: str) -> Path:
    """`path` (relative) inside `workspace`, symlinks resolved; `ToolError` if it would leave it."""
    if "\x00" in path:
        raise ToolError(f"path {path!r}: contains a NUL byte")
    pure = PurePosixPath(path)
    if pure.is_absolute():
        raise ToolError(f"path {path!r}: absolute paths are not allowed; give a path relative to the workspace")
    if ".." in pure.parts:
        raise ToolError(f"path {path!r}: '..' is not allowed; paths stay inside the task's workspace")
    resolved = (workspace / pure).resolve()
    if resolved != workspace and workspace not in resolved.parents:
        raise ToolError(f"path {path!r}: leads outside the workspace through a symlink; refused")
    return resolved


def relative(workspace: Path, path: Path) -> str:
    return "." if path == workspace else path.relative_to(workspace).as_posix()


def _workspace_bytes(workspace: Path) -> int:
    total = 0
    for folder, _dirs, files in os.walk(workspace):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                pass
    return total


def _read_bytes(path: Path, limit: int) -> tuple[bytes, int]:
    """Up to `limit` bytes of a regular file, and its full size.

    Opened with ``O_NOFOLLOW`` (a symlink swapped in after the containment
    check is refused) and ``O_NONBLOCK`` (a FIFO cannot hang the worker).
    A file with more than one link is refused, judged on the open file: a
    hard link planted in the workspace may name any file of the worker's
    filesystem, and no path check can tell it from the real thing.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise ToolError("no such file (list_files shows what exists)") from None
    if stat.S_ISDIR(mode):
        raise ToolError("is a folder; list_files lists it")
    if not stat.S_ISREG(mode):
        raise ToolError("is not a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if info.st_nlink > 1:
            raise ToolError(f"is a hard link ({info.st_nlink} names for one file), which may lead outside "
                            "the workspace; refused")
        return handle.read(limit), info.st_size


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one rename, durably (a crash leaves the old or the new file)."""
    if path.is_dir():
        raise ToolError("is a folder; choose a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the write journal ---------------------------------------------------------------------------


class WriteJournal:
    """One small JSON file per idempotency key: what a write was asked to do, and whether it is done."""

    def __init__(self, ctx: ToolContext) -> None:
        self.folder = journal_path(workspace_root(ctx), ctx.task_id)
        key = ctx.idempotency_key
        self.path = self.folder / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")
        self.key = key

    def load(self) -> Optional[dict[str, Any]]:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):  # a torn entry is as good as none: the write is redone
            return None

    def save(self, entry: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.path, json.dumps({"key": self.key, **entry}).encode())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the tools --------------------------------------------------------------------------------------


class ReadFileArguments(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=1000,
                      description="File path relative to the task's workspace, e.g. 'notes/plan.md'.")


class WriteFileArguments(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=1000,
                      description="File path relative to the task's workspace; missing folders are created.")
    content: str = Field(description="The text to write (UTF-8).")
    append: bool = Field(default=False, description="Add to the end of the file instead of replacing it.")


class ListFilesArguments(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(default=".", min_length=1, max_length=1000,
                      description="Folder relative to the task's workspace ('.' is the workspace itself).")
    recursive: bool = Field(default=False, description="Also list the contents of sub-folders.")


def _naming_the_path(fn: ToolFunction) -> ToolFunction:
    """Report problems as ``path '<path>': <problem>``: OS errors without the host's absolute paths."""

    @functools.wraps(fn)
    def run(args: Any, ctx: ToolContext) -> str:
        try:
            return fn(args, ctx)
        except ToolError as exc:
            if str(exc).startswith(("path ", "content:")):  # already says what it is about
                raise
            raise ToolError(f"path {args.path!r}: {exc}") from None
        except OSError as exc:
            raise ToolError(f"path {args.path!r}: {exc.strerror or type(exc).__name__}") from None

    return run


@define_tool("read_file", parallel=True)
@_naming_the_path
def read_file(args: ReadFileArguments, ctx: ToolContext) -> str:
    """Read a text file from this task's workspace. Long files are cut off at the size limit, and say so."""
    workspace = workspace_of(ctx)
    target = resolve_in_workspace(workspace, args.path)
    limit = ctx.get_settings().workspace_max_file_bytes
    data, size = _read_bytes(target, limit)
    text = data.decode("utf-8", errors="replace")
    if size > limit:
        text += f"\n[truncated: the file is {size} bytes; read_file returns the first {limit}]"
    return text


@define_tool("write_file")
@_naming_the_path
def write_file(args: WriteFileArguments, ctx: ToolContext) -> str:
    """Write (or with append=true, add to) a text file in this task's workspace."""
    settings = ctx.get_settings()
    workspace = workspace_of(ctx)
    target = resolve_in_workspace(workspace, args.path)
    name = relative(workspace, target)
    data = args.content.encode("utf-8")
    request = {"path": name, "append": args.append, "content_sha256": _sha256(data)}
    journal = WriteJournal(ctx)
    entry = journal.load()
    if entry is not None and entry.get("request") == request and entry.get("state") == "done":
        return _already_done(entry, ctx)
    old = b""
    if target.exists():
        old, _size = _read_bytes(target, settings.workspace_max_file_bytes + 1)
    if entry is not None and entry.get("request") == request and entry.get("result_sha256") == _sha256(old):
        # The interrupted attempt wrote the file but did not mark it done.
        journal.save({**entry, "state": "done"})
        return _already_done(entry, ctx)
    new = old + data if args.append else data
    if len(new) > settings.workspace_max_file_bytes:
        raise ToolError(f"content: the file would be {len(new)} bytes, more than the "
                        f"{settings.workspace_max_file_bytes}-byte limit per file")
    total = _workspace_bytes(workspace) - len(old) + len(new)
    if total > settings.workspace_max_bytes:
        raise ToolError(f"content: the workspace would hold {total} bytes, more than its "
                        f"{settings.workspace_max_bytes}-byte limit; overwrite files with shorter content first")
    verb = "appended" if args.append else "wrote"
    output = f"{verb} {len(data)} bytes to {name} (now {len(new)} bytes)"
    pending = {"request": request, "result_sha256": _sha256(new), "output": output, "state": "pending"}
    journal.save(pending)
    _write_atomically(target, new)
    journal.save({**pending, "state": "done"})
    return output


def _already_done(entry: dict[str, Any], ctx: ToolContext) -> str:
    """The reply to a write this call (its idempotency key) already made."""
    return entry["output"] + f" (already done by this call, idempotency key {ctx.idempotency_key})"


@define_tool("list_files", parallel=True)
@_naming_the_path
def list_files(args: ListFilesArguments, ctx: ToolContext) -> str:
    """List the files and folders in this task's workspace (sizes in bytes; folders end in '/')."""
    workspace = workspace_of(ctx)
    folder = resolve_in_workspace(workspace, args.path)
    if not folder.is_dir():
        raise ToolError("not a folder")
    lines: list[str] = []
    for current, dirs, files in os.walk(folder):
        for name in dirs + files:
            if name.startswith(TEMP_PREFIX):
                continue
            path = Path(current) / name
            shown = relative(workspace, path)
            try:
                info = os.lstat(path)
            except FileNotFoundError:  # removed while listing
                continue
            if stat.S_ISLNK(info.st_mode):
                lines.append(f"{shown} (symlink)")
            elif stat.S_ISDIR(info.st_mode):
                lines.append(f"{shown}/")
            else:
                lines.append(f"{shown}  {info.st_size}")
        if not args.recursive:
            break
    if not lines:
        return f"{relative(workspace, folder)}: empty"
    lines.sort()
    if len(lines) > MAX_LIST_ENTRIES:
        lines = lines[:MAX_LIST_ENTRIES] + [f"[... {len(lines) - MAX_LIST_ENTRIES} more entries not shown]"]
    return "\n".join(lines)


READ_FILE = read_file
WRITE_FILE = write_file
LIST_FILES = list_files
