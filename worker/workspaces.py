"""Where a task's files live, and removing them with the task.

Each task owns two folders under `LONGHAUL_WORKSPACE_ROOT`: its workspace
(``<root>/<name>``, what the file tools show the model) and its write
journal (``<root>/.journal/<name>``, what makes `write_file` exactly-once).
`<name>` is `task_folder_name(task_id)`, an injective encoding: two
distinct task ids never share a folder, whatever characters they hold and
even on a case-insensitive filesystem.

The store deletes task rows (`delete`, `prune`) and resets a task for a
rerun; the functions here delete the files that go with them, so a new
task with an old id starts with an empty workspace and a rerun with an
empty journal.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

if TYPE_CHECKING:
    from longhaul.models import TaskStore

logger = logging.getLogger(__name__)

#: Name of the folder (under the root) holding every task's write journal.
JOURNAL_FOLDER = ".journal"
#: Longest folder name spelled out; longer encodings become a hash (file names stop at 255 bytes).
MAX_SPELLED_NAME_CHARS = 120
#: Tasks read per page when listing a thread's tasks before deleting them.
LIST_PAGE = 1000
#: Characters a folder name keeps as they are; every other byte is escaped as ``_xx`` (lower-case hex).
_KEPT = re.compile(r"[a-z0-9-]")


def task_folder_name(task_id: str) -> str:
    """A folder name for `task_id`, different for every distinct id.

    Lower-case letters, digits and ``-`` stay as they are; every other
    UTF-8 byte (``_``, ``.``, ``/``, capitals, non-ASCII) becomes ``_`` and
    two lower-case hex digits. The escape character is itself escaped, so
    the encoding can be read back, hence never maps two ids to one name;
    it never starts with ``.`` (no clash with `JOURNAL_FOLDER`, no hidden
    or ``..`` name) and differs by more than case. An encoding longer than
    `MAX_SPELLED_NAME_CHARS` is ``~`` and the id's SHA-256 (``~`` appears in
    no spelled-out name, so the two forms never meet).
    """
    parts = []
    for char in task_id:
        if _KEPT.fullmatch(char):
            parts.append(char)
        else:
            parts.append("".join(f"_{byte:02x}" for byte in char.encode("utf-8", "surrogatepass")))
    name = "".join(parts)
    if len(name) > MAX_SPELLED_NAME_CHARS or not name:
        return "~" + hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).hexdigest()
    return name


def workspace_path(root: str | Path, task_id: str) -> Path:
    """The task's workspace folder under `root` (not created)."""
    return Path(root) / task_folder_name(task_id)


def journal_path(root: str | Path, task_id: str) -> Path:
    """The folder of the task's write journal under `root` (not created)."""
    return Path(root) / JOURNAL_FOLDER / task_folder_name(task_id)


def remove_journal(root: str | Path, task_id: str) -> None:
    """Forget every write the task's tool calls made, so a rerun writes its files again."""
    _remove_folder(journal_path(root, task_id))


def remove_task_files(root: str | Path, task_ids: Iterable[str]) -> None:
    """Delete the workspaces and write journals of deleted tasks (missing folders are fine)."""
    for task_id in task_ids:
        _remove_folder(workspace_path(root, task_id))
        _remove_folder(journal_path(root, task_id))


def delete_thread(store: TaskStore, root: str | Path, thread_id: str) -> int:
    """Delete every task of a thread with its rows and its files; returns how many tasks were deleted."""
    task_ids: list[str] = []
    while page := store.list_tasks(thread_id=thread_id, limit=LIST_PAGE, offset=len(task_ids)):
        task_ids.extend(row.task_id for row in page)
    deleted = store.delete_by_thread_id(thread_id)
    remove_task_files(root, task_ids)
    return deleted


def prune(store: TaskStore, root: str | Path, *, max_tasks: Optional[int] = None,
          older_than_s: Optional[float] = None, dry_run: bool = False) -> list[str]:
    """`TaskStore.prune`, deleting the pruned tasks' files too; returns the ids (see `TaskStore.prune`)."""
    task_ids = store.prune(max_tasks=max_tasks, older_than_s=older_than_s, dry_run=dry_run)
    if not dry_run:
        remove_task_files(root, task_ids)
    return task_ids


def _remove_folder(path: Path) -> None:
    # A symlink planted in place of the folder is unlinked, never followed (rmtree refuses links).
    if path.is_symlink():
        path.unlink()
        return
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("could not delete %s: %s", path, exc.strerror or exc)
