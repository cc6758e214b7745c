"""Bytes one agent step adds to the store and writes to disk (issue #6 target 5: new content + <= 1 KiB).

Four workloads, each run as two tasks of N1 and N2 steps in fresh SQLite
files; every per-step figure is the difference between the two divided by
N2 - N1, so what a task costs once (its row, its prompt, its first and last
trace events, the final answer) cancels out:

- **step loop, traces on / off**: one scripted task through the real step
  loop (`execute_task` on an embedded runtime, as bench/trace_overhead.py
  runs it): an assistant message with a ``ledger`` tool call and the tool's
  answer per step, ~100 bytes each.
- **400-byte steps, traces on / off**: the issue's workload, through
  `TaskStore.record_checkpoint`: an assistant message of ~400 bytes with one
  tool call, a tool message of ~400 bytes, one checkpoint item whose output is
  the tool message, and the trace events the step loop emits for such a step.

Per step it prints the new content (message text plus tool-call JSON, read
back from the ``message`` table), the payload bytes stored in every table and
index (SQLite's ``dbstat``), the overhead (stored - content), the b-tree page
bytes, and the bytes appended to the WAL file (every commit appends each page
it changed, whole, plus a 24-byte frame header). Then the same figures per
table and index (a WAL frame belongs to the b-tree that owns its page).

Last, WAL bytes per step at 10 and 5,000 prior messages for the 400-byte
steps, against two baselines from the same run: the seed's design (the whole
history JSON rewritten per step, bench/checkpoint_cost.py's ``SeedStore``)
and a raw-sqlite3 append floor (two message rows and one checkpoint row).
Nothing here asserts on sizes; it prints figures for a reader to judge.

    python bench/storage_bytes.py            # about 15 s
    python bench/storage_bytes.py --quick    # about 5 s
    python bench/storage_bytes.py --json     # the figures, for scripts
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint_cost import SeedStore  # noqa: E402
from command_line import bench_main  # noqa: E402

from longhaul.models import ChatMessage, CheckpointItem, CheckpointUpdate, TaskStatus, TaskStore, ToolCall  # noqa: E402
from longhaul.models.traces import NullTraceWriter, TraceWriter  # noqa: E402
from longhaul.worker import Runtime, api, load_settings, set_runtime  # noqa: E402
from longhaul.worker.execute import execute_task  # noqa: E402

MESSAGE_BYTES = 400
TARGET_OVERHEAD_BYTES = 1_024
PRIOR_MESSAGES = (10, 5_000)
WAL_CHECKPOINT = "PRAGMA wal_checkpoint(TRUNCATE)"
WAL_HEADER_BYTES = 32
WAL_FRAME_HEADER_BYTES = 24
#: The b-tree of the schema itself: not task data.
SCHEMA_TREES = frozenset({"sqlite_schema", "sqlite_master"})


@dataclass(frozen=True)
class Plan:
    steps: tuple[int, int]  # the two task lengths whose difference gives the per-step figures
    wal_steps: int  # appending steps per WAL batch (longhaul, floor)
    seed_wal_steps: int  # steps per WAL batch of the seed design (each rewrites the whole history)


FULL = Plan(steps=(500, 5_500), wal_steps=1_000, seed_wal_steps=10)
QUICK = Plan(steps=(100, 1_100), wal_steps=200, seed_wal_steps=4)


# -- measuring one file ----------------------------------------------------------


@dataclass(frozen=True)
class Footprint:
    """What one database holds after a run, and what its WAL received since `start_wal_batch`."""

    page_size: int
    content: int  # message text + tool-call JSON, in bytes
    payload: dict[str, int]  # per table and index
    pages: dict[str, int]  # per table and index, in bytes
    wal: int
    wal_by_tree: dict[str, int]  # the WAL's frames, by the table or index that owns each page


def start_wal_batch(conn: sqlite3.Connection) -> None:
    """Empty the WAL and stop SQLite from checkpointing it, so its size is what the next writes appended."""
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute(WAL_CHECKPOINT)


def wal_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + "-wal")


def wal_bytes(db_path: Path) -> int:
    size = wal_path(db_path).stat().st_size if wal_path(db_path).exists() else 0
    return max(0, size - WAL_HEADER_BYTES)


def wal_bytes_by_tree(conn: sqlite3.Connection, db_path: Path, page_size: int) -> dict[str, int]:
    """The WAL's bytes per table and index: each frame's page number (its first 4 bytes), owner from dbstat."""
    owners = dict(conn.execute("SELECT pageno, name FROM dbstat").fetchall())
    by_tree: dict[str, int] = {}
    with wal_path(db_path).open("rb") as wal:
        wal.seek(WAL_HEADER_BYTES)
        while header := wal.read(WAL_FRAME_HEADER_BYTES):
            owner = owners.get(int.from_bytes(header[:4], "big"), "(free pages)")
            by_tree[owner] = by_tree.get(owner, 0) + WAL_FRAME_HEADER_BYTES + page_size
            wal.seek(page_size, 1)
    return by_tree


def footprint(conn: sqlite3.Connection, db_path: Path) -> Footprint:
    (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    (content,) = conn.execute(
        "SELECT COALESCE(SUM(LENGTH(CAST(content AS BLOB))), 0)"
        " + COALESCE(SUM(LENGTH(CAST(tool_calls AS BLOB))), 0) FROM message").fetchone()
    trees = conn.execute("SELECT name, SUM(payload), SUM(pgsize) FROM dbstat GROUP BY name").fetchall()
    trees = [row for row in trees if row[0] not in SCHEMA_TREES]
    return Footprint(page_size=page_size, content=content, payload={name: payload for name, payload, _ in trees},
                     pages={name: pages for name, _, pages in trees}, wal=wal_bytes(db_path),
                     wal_by_tree=wal_bytes_by_tree(conn, db_path, page_size))


def per_step(short: Footprint, long: Footprint, steps: int) -> dict[str, Any]:
    """The difference between two task lengths, per step."""
    def diff(key: str) -> dict[str, float]:
        a, b = getattr(short, key), getattr(long, key)
        return {name: (b.get(name, 0) - a.get(name, 0)) / steps for name in sorted({*a, *b})}

    payload, pages = diff("payload"), diff("pages")
    content, stored = (long.content - short.content) / steps, sum(payload.values())
    return {"page_size": long.page_size, "content": content, "stored": stored, "overhead": stored - content,
            "pages": sum(pages.values()), "wal": (long.wal - short.wal) / steps,
            "payload_by_tree": payload, "pages_by_tree": pages, "wal_by_tree": diff("wal_by_tree")}


# -- the workloads ------------------------------------------------------------------


def loop_run(workdir: Path, name: str, *, traces: bool, steps: int) -> Footprint:
    """One scripted task of `steps` steps through the real step loop."""
    db_path = workdir / f"{name}.db"
    settings = load_settings(database_url=f"sqlite:///{db_path}", redis_url=None, traces=traces)
    runtime = Runtime(settings, embedded=True)
    set_runtime(runtime)
    try:
        task_id = api.submit(runtime, "storage bytes", task_id=name, steps=steps)
        conn = runtime.store.db.connection()
        start_wal_batch(conn)
        status = execute_task(runtime, task_id)
        summary = runtime.store.summary(task_id)
        assert status is TaskStatus.COMPLETED and summary.checkpoint_count == steps, summary.last_error
        assert runtime.store.db.connection() is conn, "the loop reopened its connection: the WAL was checkpointed"
        return footprint(conn, db_path)
    finally:
        set_runtime(None)
        runtime.stop_embedded_worker()
        runtime.store.close()


@dataclass(frozen=True)
class Step:
    """One 400-byte step: an assistant message with a tool call (~400 B together) and the tool's answer."""

    call: ToolCall
    assistant: ChatMessage
    tool: ChatMessage
    note: str

    @classmethod
    def number(cls, step: int) -> Step:
        call = ToolCall(id=f"call-{step}", name="shell", arguments={"command": f"cat notes/{step}.txt"})
        call_bytes = len(orjson.dumps([call.model_dump()]))
        text = f"Step {step}: reading the notes. ".ljust(MESSAGE_BYTES - call_bytes, "x")
        return cls(call=call, assistant=ChatMessage.assistant(text, tool_calls=[call]),
                   tool=ChatMessage(role="tool", content=f"notes {step}: ".ljust(MESSAGE_BYTES, "y"),
                                    tool_call_id=call.id, name=call.name),
                   note=f"step {step} done: {call.name} ok")

    @property
    def messages(self) -> list[ChatMessage]:
        return [self.assistant, self.tool]


def prior_messages(count: int) -> list[ChatMessage]:
    """`count` messages of earlier steps (numbered -1, -2, ...)."""
    return [message for n in range(1, count // 2 + 1) for message in Step.number(-n).messages]


def traced_step(task_id: str, number: int, tracer: TraceWriter) -> CheckpointUpdate:
    """A 400-byte step as the step loop records it, its trace events emitted into `tracer` (see worker/loop.py)."""
    step = Step.number(number)
    call, output = step.call, step.tool.content
    tracer.emit("content", {"text": step.assistant.content})
    tracer.emit("tool_call_started", {"step": number, "tool": call.name, "call_id": call.id,
                                      "arguments": call.arguments, "idempotency_key": f"{task_id}:{number}:0"})
    tracer.emit("tool_call_completed", {"step": number, "tool": call.name, "call_id": call.id,
                                        "duration_ms": 12.345, "output": output})
    tracer.emit("checkpoint", {"step": number, "note": step.note})
    tracer.emit("turn_completed", {"step": number, "tool_calls": 1})
    tracer.end_turn()
    return CheckpointUpdate(
        task_id=task_id, thread_id=f"thread-{task_id}", channel="bench", provider="stub", model="m",
        step_index=number, new_messages=step.messages, checkpoint_note=step.note,
        items=[CheckpointItem(tool_name=call.name, arguments=call.arguments, success=True, output=output)],
    )


class StepRecorder:
    """Records 400-byte steps of one task through `TaskStore.record_checkpoint`, with or without traces."""

    def __init__(self, store: TaskStore, task_id: str, *, traces: bool) -> None:
        self.store, self.task_id = store, task_id
        writer = TraceWriter if traces else NullTraceWriter  # as the step loop picks it
        self.tracer = writer(agent="stub", model="m", job_type="agent_task", next_sequence=0,
                             started_at=store.clock(), clock=store.clock)

    def prefill(self, messages: int) -> None:
        """Step 0: `messages` prior messages, in one checkpoint."""
        self.store.record_checkpoint(CheckpointUpdate(task_id=self.task_id, thread_id=f"thread-{self.task_id}",
                                                      channel="bench", provider="stub", model="m", step_index=0,
                                                      new_messages=prior_messages(messages)))

    def step(self, step: int) -> None:
        update = traced_step(self.task_id, step, self.tracer)
        self.store.record_checkpoint(update, traces=self.tracer.take())


def store_run(workdir: Path, name: str, *, traces: bool, steps: int) -> Footprint:
    """One task of `steps` 400-byte steps through `record_checkpoint`."""
    db_path = workdir / f"{name}.db"
    store = TaskStore(db_path)
    try:
        recorder = StepRecorder(store, name, traces=traces)
        conn = store.db.connection()
        start_wal_batch(conn)
        for step in range(1, steps + 1):
            recorder.step(step)
        assert store.db.connection() is conn, "the store reopened its connection: the WAL was checkpointed"
        return footprint(conn, db_path)
    finally:
        store.close()


WORKLOADS: dict[str, tuple[Callable[..., Footprint], bool]] = {
    "step loop, traces on": (loop_run, True),
    "step loop, traces off": (loop_run, False),
    "400-byte steps, traces on": (store_run, True),
    "400-byte steps, traces off": (store_run, False),
}


def per_step_figures(workdir: Path, plan: Plan) -> dict[str, dict[str, Any]]:
    short, long = plan.steps
    figures = {}
    for index, (label, (run, traces)) in enumerate(WORKLOADS.items()):
        a = run(workdir, f"w{index}-{short}", traces=traces, steps=short)
        b = run(workdir, f"w{index}-{long}", traces=traces, steps=long)
        figures[label] = per_step(a, b, long - short)
        for path in workdir.glob(f"w{index}-*"):  # the long runs' WALs take hundreds of MB
            path.unlink()
    return figures


# -- WAL bytes per step at a given history length -------------------------------------


def wal_per_step(conn: sqlite3.Connection, db_path: Path, steps: int, step: Callable[[int], object]) -> float:
    start_wal_batch(conn)
    for index in range(1, steps + 1):
        step(index)
    return wal_bytes(db_path) / steps


def longhaul_wal(workdir: Path, prior: int, steps: int, *, traces: bool) -> float:
    db_path = workdir / f"wal-longhaul-{prior}-{'on' if traces else 'off'}.db"
    store = TaskStore(db_path)
    try:
        recorder = StepRecorder(store, "t", traces=traces)
        recorder.prefill(prior)
        return wal_per_step(store.db.connection(), db_path, steps, recorder.step)
    finally:
        store.close()


def seed_wal(workdir: Path, prior: int, steps: int) -> float:
    db_path = workdir / f"wal-seed-{prior}.db"
    seed = SeedStore(db_path)
    history = [m.model_dump(exclude_none=True) for m in prior_messages(prior)]
    try:
        seed.record_checkpoint("t", 0, history, "prefill", [])

        def step(index: int) -> None:
            update = traced_step("t", index, NullTraceWriter(agent="", model="", job_type="", next_sequence=0,
                                                              started_at=0.0))
            history.extend(m.model_dump(exclude_none=True) for m in update.new_messages)
            seed.record_checkpoint("t", index, history, update.checkpoint_note or "",
                                   [item.model_dump() for item in update.items])

        return wal_per_step(seed.conn, db_path, steps, step)
    finally:
        seed.close()


FLOOR_SCHEMA = """
CREATE TABLE message (id INTEGER PRIMARY KEY, task_id TEXT NOT NULL, position INTEGER NOT NULL,
    role TEXT NOT NULL, content TEXT NOT NULL, UNIQUE (task_id, position));
CREATE TABLE checkpoint (id INTEGER PRIMARY KEY, task_id TEXT NOT NULL, step_index INTEGER NOT NULL,
    note TEXT, UNIQUE (task_id, step_index));
"""
FLOOR_INSERT_MESSAGE = "INSERT INTO message (task_id, position, role, content) VALUES ('t', ?, ?, ?)"
FLOOR_INSERT_CHECKPOINT = "INSERT INTO checkpoint (task_id, step_index, note) VALUES ('t', ?, ?)"


def floor_wal(workdir: Path, prior: int, steps: int) -> float:
    """Raw sqlite3, append only: two message rows and one checkpoint row (its note) per step, nothing else."""
    db_path = workdir / f"wal-floor-{prior}.db"
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.executescript(FLOOR_SCHEMA)
        conn.execute("BEGIN")
        conn.executemany(FLOOR_INSERT_MESSAGE, [(n, "user", "x" * MESSAGE_BYTES) for n in range(prior)])
        conn.execute("COMMIT")

        def step(index: int) -> None:
            step = Step.number(index)
            position = prior + 2 * (index - 1)
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(FLOOR_INSERT_MESSAGE, [(position, "assistant", step.assistant.content),
                                                    (position + 1, "tool", step.tool.content)])
            conn.execute(FLOOR_INSERT_CHECKPOINT, (index, step.note))
            conn.execute("COMMIT")

        return wal_per_step(conn, db_path, steps, step)
    finally:
        conn.close()


def wal_figures(workdir: Path, plan: Plan) -> dict[str, dict[int, float]]:
    """WAL bytes per step of each design at each prior history length."""
    return {
        "longhaul, traces on": {p: longhaul_wal(workdir, p, plan.wal_steps, traces=True) for p in PRIOR_MESSAGES},
        "longhaul, traces off": {p: longhaul_wal(workdir, p, plan.wal_steps, traces=False) for p in PRIOR_MESSAGES},
        "seed design (rewrite history)": {p: seed_wal(workdir, p, plan.seed_wal_steps) for p in PRIOR_MESSAGES},
        "raw sqlite3 append (floor)": {p: floor_wal(workdir, p, plan.wal_steps) for p in PRIOR_MESSAGES},
    }


# -- report --------------------------------------------------------------------


def run(plan: Plan) -> dict[str, Any]:
    """Every figure, from one temporary folder; returned as plain data."""
    with tempfile.TemporaryDirectory(prefix="longhaul-bytes-bench-") as root:
        steps = per_step_figures(Path(root), plan)
        wal = wal_figures(Path(root), plan)
    target = steps["400-byte steps, traces on"]["overhead"]
    return {
        "task_lengths": list(plan.steps),
        "page_size": steps["400-byte steps, traces on"]["page_size"],
        "per_step": steps,
        "wal_steps": {"appends": plan.wal_steps, "seed": plan.seed_wal_steps},
        "wal_per_step": wal,
        "target_overhead_bytes": TARGET_OVERHEAD_BYTES,
        "overhead_bytes": target,
        "target_met": target <= TARGET_OVERHEAD_BYTES,
    }


def print_table(result: dict[str, Any]) -> None:
    short, long = result["task_lengths"]
    steps: dict[str, dict[str, Any]] = result["per_step"]
    print(f"bytes per agent step: tasks of {short:,} and {long:,} steps, the difference / {long - short:,} "
          f"(page size {result['page_size']:,} B)")
    print(f"stored = payload bytes added per step (dbstat), the target is new content + <= "
          f"{TARGET_OVERHEAD_BYTES:,} bytes; pages = b-tree bytes added; WAL = bytes appended to the -wal file")
    print()
    print(f"  {'workload':<28}{'content':>9}{'stored':>9}{'overhead':>10}{'pages':>9}{'WAL':>9}")
    for label, row in steps.items():
        print(f"  {label:<28}{row['content']:>9,.0f}{row['stored']:>9,.0f}{row['overhead']:>10,.0f}"
              f"{row['pages']:>9,.0f}{row['wal']:>9,.0f}")
    print()
    trees = sorted({tree for row in steps.values() for key in ("payload_by_tree", "wal_by_tree") for tree in row[key]})
    width = max(len("table or index"), *(len(tree) for tree in trees))
    print("  per step by table and index: payload / pages / WAL, one column per workload in the order above")
    print(f"  {'table or index':<{width}}" + "".join(f"{'#' + str(n + 1):>22}" for n in range(len(steps))))
    for tree in trees:
        cells = [f"{row['payload_by_tree'].get(tree, 0):,.0f} / {row['pages_by_tree'].get(tree, 0):,.0f} / "
                 f"{row['wal_by_tree'].get(tree, 0):,.0f}" for row in steps.values()]
        print(f"  {tree:<{width}}" + "".join(f"{cell:>22}" for cell in cells))
    print("  (WAL frames are mapped to their b-tree through dbstat; sqlite_schema's frames are page 1, whose header "
          "holds the file's size)")
    print()
    wal: dict[str, dict[Any, float]] = result["wal_per_step"]
    runs = result["wal_steps"]
    print(f"WAL bytes written per step, 400-byte steps, after 10 and 5,000 prior messages "
          f"(batches of {runs['appends']:,} steps; seed design {runs['seed']:,}: the history grows 2 per step)")
    print(f"  {'design':<30}" + "".join(f"{f'{p:,} prior':>14}" for p in PRIOR_MESSAGES))
    for label, row in wal.items():
        print(f"  {label:<30}" + "".join(f"{row[p]:>14,.0f}" for p in PRIOR_MESSAGES))
    on, off = wal["longhaul, traces on"], wal["longhaul, traces off"]
    seed, floor = wal["seed design (rewrite history)"], wal["raw sqlite3 append (floor)"]
    ratios = (("longhaul traces on / floor", on, floor), ("longhaul traces off / floor", off, floor),
              ("seed / longhaul traces on", seed, on))
    for label, num, den in ratios:
        print(f"  {label:<30}" + "".join(f"{num[p] / den[p]:>13.2f}x" for p in PRIOR_MESSAGES))
    print()
    verdict = "met" if result["target_met"] else "not met"
    print(f"target 5: overhead {result['overhead_bytes']:,.0f} bytes/step -> {verdict} "
          f"(400-byte steps, traces on; target <= {TARGET_OVERHEAD_BYTES:,})")


def main(argv: list[str] | None = None) -> None:
    bench_main(__doc__, lambda quick: run(QUICK if quick else FULL), print_table,
               quick_help="shorter tasks and batches (under 15 s)", argv=argv)


if __name__ == "__main__":
    main()
