"""The same agent job on longhaul and on its peers, side by side, with longhaul's speed-up over each.

The job: an agent of N steps (N = 10 and N = 1,000; ``--quick``: 10 and 100).
Each step appends 2 messages of ~400 bytes (an assistant message and a tool
result) and records one checkpoint. Printed per peer: the mean cost of a step
in milliseconds at each N, the cost of loading the latest state at the end of
the longest job (ms), and longhaul's speed-up over the peer (the peer's figure
divided by longhaul's ``record_checkpoint`` figure, both from this run).

Peers (each harness written here, small, no network, each on its own SQLite
file in one temporary folder):

- **seed design**: the whole history JSON rewritten per step (raw sqlite3),
  bench/checkpoint_cost.py's ``SeedStore``; load = read and parse that JSON.
- **LangGraph + SqliteSaver**: a ``StateGraph(MessagesState)`` (the
  ``add_messages`` reducer) whose one node appends 2 messages and loops back
  to itself until N steps are done, so each step is one superstep and one
  checkpoint; load = ``graph.get_state(config)``.
- **DBOS on SQLite**: one workflow calling N ``@DBOS.step`` functions, each
  returning its 2 messages, which DBOS records as the step's output (its
  checkpoint); load = ``DBOS.list_workflow_steps`` (every recorded output,
  which is what a recovering workflow replays from).
- **Peewee, naive append-only**: one ``Model.create`` per message and per
  checkpoint in one transaction, the query built on every call.
- **raw sqlite3 append-only**: one ``executemany`` for the messages and one
  INSERT for the checkpoint; the floor.
- **longhaul**: ``TaskStore.record_checkpoint`` per step (the reference row);
  load = ``store.get(task_id, checkpoints=False)``. A second row runs the
  whole step loop, ``worker.run_inline(..., steps=N)`` with the scripted
  provider (its own short messages, a tool call, traces and a lease per step).

Fairness choices:

- Durability is the same everywhere: WAL and ``synchronous=NORMAL`` on every
  file (SqliteSaver turns WAL on itself; DBOS gets it through its engine's
  connect arguments), one transaction per step, committed before the next
  step starts. LangGraph runs with ``durability="sync"`` for that reason (its
  default, ``"async"``, saves a checkpoint while the next step runs).
- A step's timed cost includes building that step's messages in the peer's
  own types (``ChatMessage``/``CheckpointUpdate`` for longhaul, LangChain
  messages for LangGraph), because a peer cannot skip its own; the ~400-byte
  texts are made beforehand for everyone.
- A job's start is off the clock for everyone: longhaul's ``create_task`` (as
  ``submit`` does before a task runs), LangGraph's input checkpoint, DBOS's
  workflow row. LangGraph and DBOS steps are timed from inside the run (node
  entry to next node entry; around each step call) for that reason. The
  ``run_inline`` row takes its step times from the store, the gaps between
  consecutive checkpoints (steps 2 to N): the task's start-up, the broker
  hand-off and the caller's polling are left out.
- Each peer does a short warm-up job off the clock (imports, connections,
  statement caches, schema). The garbage collector stays on, as in a real
  worker, after a collection before each timed job: each peer pays for its
  own allocations.
- The N = 10 job runs several times on fresh ids and its steps are averaged;
  the long job runs once. A load is the mean of a few loads of the long job's
  state, with a warm page cache (a worker that just wrote it).
- Peers take turns: each round runs the short job once on every peer, then
  each runs its long job, then the loads alternate, so a burst of load from
  elsewhere on the machine lands on all of them alike rather than on one.

Nothing asserts on timings; figures are printed for a reader to judge. A peer
whose package is missing prints ``skipped: pip install -e '.[bench]'``.

    python bench/peers.py            # 1-2 minutes
    python bench/peers.py --quick    # about 10 s
    python bench/peers.py --json     # the figures, for scripts
"""

from __future__ import annotations

import gc
import logging
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from itertools import pairwise
from pathlib import Path
from typing import Any, Callable, Optional

import orjson
import peewee

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint_cost import SeedStore  # noqa: E402
from command_line import bench_main  # noqa: E402

from longhaul.models import ChatMessage, CheckpointItem, CheckpointUpdate, TaskSpec, TaskStore  # noqa: E402

MESSAGE_BYTES = 400
INSTALL_HINT = "pip install -e '.[bench]'"
#: The same pragmas for every file a harness opens itself (longhaul's own, see models/db.py).
PRAGMAS = {"journal_mode": "wal", "synchronous": "normal", "foreign_keys": 1, "busy_timeout": 30_000}
WARM_UP_STEPS = 5


@dataclass(frozen=True)
class Plan:
    step_counts: tuple[int, int]  # N of the short job, N of the long job
    short_runs: int  # how many times the short job runs (fresh ids), steps averaged
    loads: int  # timed loads of the long job's state


FULL = Plan(step_counts=(10, 1_000), short_runs=50, loads=20)
QUICK = Plan(step_counts=(10, 100), short_runs=5, loads=3)


def step_texts(step: int) -> tuple[str, str]:
    """The assistant message and the tool result of one step, ~400 bytes each."""
    return (f"step {step}: calling the shell tool to look at the repository. ".ljust(MESSAGE_BYTES, "a"),
            f"step {step}: tool result, exit status 0. ".ljust(MESSAGE_BYTES, "t"))


def items_json(step: int) -> str:
    """The checkpoint's one item (what the step's tool did), as the SQL harnesses store it."""
    return orjson.dumps([{"tool_name": "shell", "arguments": {"command": f"echo {step}"},
                          "success": True, "output": "ok"}]).decode()


class Skipped(Exception):
    """A peer that cannot run here; the message says why."""


# -- harnesses -------------------------------------------------------------------
#
# Each harness: `open(root)` once, `run(job_id, steps, texts)` -> one cost in ms
# per step, `load(job_id)` -> the number of messages of the latest state, `close()`.


class Harness:
    name = ""

    def open(self, root: Path) -> None:
        raise NotImplementedError

    def run(self, job_id: str, steps: int, texts: list[tuple[str, str]]) -> list[float]:
        raise NotImplementedError

    def load(self, job_id: str) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _timed_steps(steps: int, step: Callable[[int], object]) -> list[float]:
    samples = []
    for index in range(1, steps + 1):
        started = time.perf_counter_ns()
        step(index)
        samples.append((time.perf_counter_ns() - started) / 1e6)
    return samples


class LonghaulStore(Harness):
    name = "longhaul TaskStore.record_checkpoint"

    def open(self, root: Path) -> None:
        self.store = TaskStore(root / "longhaul.db")

    def run(self, job_id: str, steps: int, texts: list[tuple[str, str]]) -> list[float]:
        # Off the clock, as `submit` does before a task runs (the peers' job start is off the clock too).
        self.store.create_task(task_id=job_id, thread_id=job_id, channel="bench", provider="stub", model="m",
                               spec=TaskSpec(prompt="bench: the agent job"))

        def step(index: int) -> None:
            assistant, tool = texts[index]
            self.store.record_checkpoint(CheckpointUpdate(
                task_id=job_id, thread_id=job_id, channel="bench", provider="stub", model="m", step_index=index,
                new_messages=[ChatMessage(role="assistant", content=assistant),
                              ChatMessage(role="tool", content=tool, tool_call_id=f"call-{index}", name="shell")],
                checkpoint_note=f"after step {index}",
                items=[CheckpointItem(tool_name="shell", arguments={"command": f"echo {index}"}, success=True,
                                      output="ok")],
            ))

        return _timed_steps(steps, step)

    def load(self, job_id: str) -> int:
        return len(self.store.get(job_id, checkpoints=False).execution_history)

    def close(self) -> None:
        self.store.close()


class LonghaulInline(Harness):
    name = "longhaul run_inline, whole step loop"

    def open(self, root: Path) -> None:
        from longhaul.worker import Runtime, load_settings, set_runtime

        self.runtime = Runtime(load_settings(database_url=str(root / "inline.db"), redis_url=None), embedded=True)
        set_runtime(self.runtime)

    def run(self, job_id: str, steps: int, texts: list[tuple[str, str]]) -> list[float]:
        from longhaul.worker import api

        record = api.run_inline("bench: the scripted agent job", task_id=job_id, provider="scripted", steps=steps)
        if record.checkpoint_count != steps:
            raise RuntimeError(f"run_inline {job_id!r} stopped at {record.checkpoint_count}/{steps} steps "
                               f"({record.status.value}): {record.last_error}")
        # Step times from the store, the gaps between consecutive checkpoints (steps 2..N): neither the
        # task's start-up nor the broker hand-off and the caller's polling is charged to the steps.
        times = [checkpoint.created_at for checkpoint in record.checkpoints]
        return [(later - earlier).total_seconds() * 1000 for earlier, later in pairwise(times)]

    def load(self, job_id: str) -> int:
        return len(self.runtime.store.get(job_id, checkpoints=False).execution_history)

    def close(self) -> None:
        from longhaul.worker import set_runtime

        self.runtime.stop_embedded_worker()
        set_runtime(None)
        self.runtime.store.close()


class SeedDesign(Harness):
    name = "seed design (history JSON rewritten)"

    def open(self, root: Path) -> None:
        self.seed = SeedStore(root / "seed.db")

    def run(self, job_id: str, steps: int, texts: list[tuple[str, str]]) -> list[float]:
        history: list[dict[str, str]] = []

        def step(index: int) -> None:
            assistant, tool = texts[index]
            history.append({"role": "assistant", "content": assistant})
            history.append({"role": "tool", "content": tool, "tool_call_id": f"call-{index}"})
            self.seed.record_checkpoint(job_id, index, history, f"after step {index}",
                                        [{"tool_name": "shell", "arguments": {"command": f"echo {index}"},
                                          "success": True, "output": "ok"}])

        return _timed_steps(steps, step)

    def load(self, job_id: str) -> int:
        (raw,) = self.seed.conn.execute(
            "SELECT execution_history_json FROM task_records WHERE task_id = ?", (job_id,)).fetchone()
        return len(orjson.loads(raw))

    def close(self) -> None:
        self.seed.close()


class LangGraphSqlite(Harness):
    name = "LangGraph + SqliteSaver"

    def open(self, root: Path) -> None:
        try:
            from langchain_core.messages import AIMessage, ToolMessage
            from langgraph.checkpoint.sqlite import SqliteSaver
            from langgraph.graph import END, START, MessagesState, StateGraph
        except ImportError:
            raise Skipped(INSTALL_HINT) from None

        # SqliteSaver guards its one connection with a lock, so sharing it with the graph's threads is safe.
        self.conn = sqlite3.connect(root / "langgraph.db", check_same_thread=False)
        self.conn.execute("PRAGMA synchronous = NORMAL")
        saver = SqliteSaver(self.conn)
        saver.setup()  # creates the tables and sets journal_mode=WAL
        self.ticks: list[int] = []
        self.texts: list[tuple[str, str]] = []

        class AgentState(MessagesState):
            steps: int

        # No annotations: LangGraph evaluates them, and this module's are strings naming local classes.
        def agent(state):  # type: ignore[no-untyped-def]
            self.ticks.append(time.perf_counter_ns())
            index = len(state["messages"]) // 2 + 1
            assistant, tool = self.texts[index]
            return {"messages": [AIMessage(content=assistant),
                                 ToolMessage(content=tool, tool_call_id=f"call-{index}")]}

        def more(state):  # type: ignore[no-untyped-def]
            return "agent" if len(state["messages"]) < 2 * state["steps"] else END

        builder = StateGraph(AgentState)
        builder.add_node("agent", agent)
        builder.add_edge(START, "agent")
        builder.add_conditional_edges("agent", more, ["agent", END])
        self.graph = builder.compile(checkpointer=saver)

    def _config(self, job_id: str, steps: int = 0) -> dict[str, Any]:
        return {"configurable": {"thread_id": job_id}, "recursion_limit": steps + 10}

    def run(self, job_id: str, steps: int, texts: list[tuple[str, str]]) -> list[float]:
        self.texts, self.ticks = texts, []
        self.graph.invoke({"messages": [], "steps": steps}, self._config(job_id, steps), durability="sync")
        ended = time.perf_counter_ns()
        if len(self.ticks) != steps:
            raise RuntimeError(f"LangGraph ran {len(self.ticks)} steps, not {steps}")
        # Step i: from node i's entry to node i+1's (its checkpoint lies between); the last ends at the return.
        marks = self.ticks + [ended]
        return [(later - earlier) / 1e6 for earlier, later in pairwise(marks)]

    def load(self, job_id: str) -> int:
        return len(self.graph.get_state(self._config(job_id)).values["messages"])

    def close(self) -> None:
        self.conn.close()


def _sqlite_normal_sync_factory() -> type[sqlite3.Connection]:
    class NormalSyncConnection(sqlite3.Connection):
        """A sqlite3 connection with ``synchronous=NORMAL``, as every other peer runs (DBOS sets no pragma)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.execute("PRAGMA synchronous = NORMAL")

    return NormalSyncConnection


class DbosSqlite(Harness):
    name = "DBOS steps on SQLite"

    def open(self, root: Path) -> None:
        try:
            from dbos import DBOS, SetWorkflowID
        except ImportError:
            raise Skipped(INSTALL_HINT) from None

        path = root / "dbos.db"
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA journal_mode = WAL")  # persistent: every later connection uses WAL
        self.texts: list[tuple[str, str]] = []
        self.samples: list[float] = []

        @DBOS.step()
        def agent_step(index: int) -> list[dict[str, str]]:
            assistant, tool = self.texts[index]
            return [{"role": "assistant", "content": assistant},
                    {"role": "tool", "content": tool, "tool_call_id": f"call-{index}"}]

        @DBOS.workflow()
        def agent(steps: int) -> int:
            messages: list[dict[str, str]] = []
            for index in range(1, steps + 1):
                started = time.perf_counter_ns()
                messages.extend(agent_step(index))
                self.samples.append((time.perf_counter_ns() - started) / 1e6)
            return len(messages)

        self.DBOS, self.SetWorkflowID, self.agent = DBOS, SetWorkflowID, agent
        try:
            DBOS(config={
                "name": "longhaul-bench",
                "system_database_url": f"sqlite:///{path}",
                "db_engine_kwargs": {"connect_args": {"factory": _sqlite_normal_sync_factory()}},
                "log_level": "WARNING",
            })
            DBOS.launch()
        except Exception as exc:
            self.close()
            raise Skipped(f"DBOS could not launch on SQLite: {type(exc).__name__}: {exc}") from None

    def run(self, job_id: str, steps: int, texts: list[tuple[str, str]]) -> list[float]:
        self.texts, self.samples = texts, []
        with self.SetWorkflowID(job_id):
            self.agent(steps)
        return self.samples

    def load(self, job_id: str) -> int:
        return sum(len(step["output"]) for step in self.DBOS.list_workflow_steps(job_id))

    def close(self) -> None:
        self.DBOS.destroy(destroy_registry=True)


class PeeweeNaive(Harness):
    name = "Peewee append-only, naive"

    def open(self, root: Path) -> None:
        self.db = peewee.SqliteDatabase(str(root / "peewee.db"), pragmas=PRAGMAS)

        class Message(peewee.Model):
            task_id = peewee.CharField(index=False)
            position = peewee.IntegerField()
            role = peewee.CharField()
            content = peewee.TextField()
            tool_call_id = peewee.CharField(null=True)

            class Meta:
                database = self.db
                indexes = ((("task_id", "position"), True),)

        class Checkpoint(peewee.Model):
            task_id = peewee.CharField(index=False)
            step_index = peewee.IntegerField()
            note = peewee.TextField(null=True)
            items = peewee.TextField()
            created_at = peewee.FloatField()

            class Meta:
                database = self.db
                indexes = ((("task_id", "step_index"), True),)

        self.Message, self.Checkpoint = Message, Checkpoint
        self.db.connect()
        self.db.create_tables([Message, Checkpoint])

    def run(self, job_id: str, steps: int, texts: list[tuple[str, str]]) -> list[float]:
        Message, Checkpoint = self.Message, self.Checkpoint

        def step(index: int) -> None:
            assistant, tool = texts[index]
            with self.db.atomic():
                Message.create(task_id=job_id, position=2 * index - 2, role="assistant", content=assistant)
                Message.create(task_id=job_id, position=2 * index - 1, role="tool", content=tool,
                               tool_call_id=f"call-{index}")
                Checkpoint.create(task_id=job_id, step_index=index, note=f"after step {index}",
                                  items=items_json(index), created_at=time.time())

        return _timed_steps(steps, step)

    def load(self, job_id: str) -> int:
        Message = self.Message
        rows = Message.select().where(Message.task_id == job_id).order_by(Message.position)
        return len([{"role": m.role, "content": m.content, "tool_call_id": m.tool_call_id} for m in rows])

    def close(self) -> None:
        self.db.close()


RAW_SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    id INTEGER PRIMARY KEY, task_id TEXT NOT NULL, position INTEGER NOT NULL, role TEXT NOT NULL,
    content TEXT NOT NULL, tool_call_id TEXT, UNIQUE (task_id, position)
);
CREATE TABLE IF NOT EXISTS checkpoint (
    id INTEGER PRIMARY KEY, task_id TEXT NOT NULL, step_index INTEGER NOT NULL, note TEXT,
    items TEXT NOT NULL, created_at REAL NOT NULL, UNIQUE (task_id, step_index)
);
"""


class RawSqlite(Harness):
    name = "raw sqlite3 append-only (floor)"

    def open(self, root: Path) -> None:
        self.conn = sqlite3.connect(root / "raw.db", isolation_level=None)
        for pragma, value in PRAGMAS.items():
            self.conn.execute(f"PRAGMA {pragma} = {value}")
        self.conn.executescript(RAW_SCHEMA)

    def run(self, job_id: str, steps: int, texts: list[tuple[str, str]]) -> list[float]:
        conn = self.conn

        def step(index: int) -> None:
            assistant, tool = texts[index]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO message (task_id, position, role, content, tool_call_id) VALUES (?, ?, ?, ?, ?)",
                [(job_id, 2 * index - 2, "assistant", assistant, None),
                 (job_id, 2 * index - 1, "tool", tool, f"call-{index}")])
            conn.execute("INSERT INTO checkpoint (task_id, step_index, note, items, created_at) VALUES (?, ?, ?, ?, ?)",
                         (job_id, index, f"after step {index}", items_json(index), time.time()))
            conn.execute("COMMIT")

        return _timed_steps(steps, step)

    def load(self, job_id: str) -> int:
        rows = self.conn.execute(
            "SELECT role, content, tool_call_id FROM message WHERE task_id = ? ORDER BY position", (job_id,))
        return len([{"role": role, "content": content, "tool_call_id": call} for role, content, call in rows])

    def close(self) -> None:
        self.conn.close()


#: Table order; the first row is the reference for every speed-up.
HARNESSES: tuple[type[Harness], ...] = (
    LonghaulStore, LonghaulInline, SeedDesign, LangGraphSqlite, DbosSqlite, PeeweeNaive, RawSqlite,
)

# -- measuring -------------------------------------------------------------------


@dataclass
class Row:
    name: str
    skipped: Optional[str] = None
    ms_per_step: dict[int, float] = field(default_factory=dict)  # N -> mean ms per step
    median_ms_per_step: dict[int, float] = field(default_factory=dict)  # N -> median ms per step (JSON only)
    load_ms: Optional[float] = None  # mean ms to load the long job's latest state
    median_load_ms: Optional[float] = None
    load_messages: Optional[int] = None
    speed_up: dict[str, float] = field(default_factory=dict)  # longhaul's, over this peer


def _timed_load_ms(harness: Harness, job_id: str) -> float:
    started = time.perf_counter_ns()
    harness.load(job_id)
    return (time.perf_counter_ns() - started) / 1e6


def measure(harnesses: list[Harness], root: Path, plan: Plan, texts: list[tuple[str, str]]) -> list[Row]:
    """Run the job on every harness, taking turns, so load from elsewhere on the machine hits all alike."""
    rows = {harness.name: Row(harness.name) for harness in harnesses}
    running: list[Harness] = []
    try:
        for harness in harnesses:
            try:
                harness.open(root)
            except Skipped as skip:
                rows[harness.name].skipped = str(skip)
                continue
            running.append(harness)
            harness.run("warm-up", WARM_UP_STEPS, texts)
            harness.load("warm-up")
        short, long = plan.step_counts
        samples: dict[str, dict[int, list[float]]] = {harness.name: {short: [], long: []} for harness in running}
        for run in range(plan.short_runs):
            for harness in running:
                gc.collect()
                samples[harness.name][short] += harness.run(f"short-{run}", short, texts)
        for harness in running:
            gc.collect()
            samples[harness.name][long] = harness.run("long", long, texts)
            row = rows[harness.name]
            row.load_messages = harness.load("long")
            if row.load_messages < 2 * long:  # a broken harness, not a slow one
                raise RuntimeError(f"{harness.name}: loaded {row.load_messages} messages after {long} steps")
        loads_ms: dict[str, list[float]] = {harness.name: [] for harness in running}
        for _ in range(plan.loads):
            for harness in running:
                loads_ms[harness.name].append(_timed_load_ms(harness, "long"))
    finally:
        for harness in running:
            harness.close()
    for harness in running:
        row = rows[harness.name]
        for n, costs in samples[harness.name].items():
            row.ms_per_step[n], row.median_ms_per_step[n] = statistics.fmean(costs), statistics.median(costs)
        row.load_ms, row.median_load_ms = statistics.fmean(loads_ms[row.name]), statistics.median(loads_ms[row.name])
    return list(rows.values())
    try:
        harness.run("warm-up", WARM_UP_STEPS, texts)
        harness.load("warm-up")
        short, long = plan.step_counts
        samples: list[float] = []
        for run in range(plan.short_runs):
            gc.collect()
            samples += harness.run(f"short-{run}", short, texts)
        gc.collect()
        for n, costs in ((short, samples), (long, harness.run("long", long, texts))):
            row.ms_per_step[n], row.median_ms_per_step[n] = statistics.fmean(costs), statistics.median(costs)
        row.load_messages = harness.load("long")
        if row.load_messages < 2 * long:  # a broken harness, not a slow one
            raise RuntimeError(f"{harness.name}: loaded {row.load_messages} messages after {long} steps")
        loads_ms = []
        for _ in range(plan.loads):
            started = time.perf_counter_ns()
            harness.load("long")
            loads_ms.append((time.perf_counter_ns() - started) / 1e6)
        row.load_ms, row.median_load_ms = statistics.fmean(loads_ms), statistics.median(loads_ms)
    finally:
        harness.close()
    return row


def add_speed_ups(rows: list[Row], plan: Plan) -> None:
    """Each peer's figure over longhaul's `record_checkpoint` figure: > 1 means longhaul is faster."""
    ours = rows[0]
    for row in rows[1:]:
        if row.skipped is None:
            row.speed_up = {f"N={n}": row.ms_per_step[n] / ours.ms_per_step[n] for n in plan.step_counts}
            row.speed_up["load"] = row.load_ms / ours.load_ms  # type: ignore[operator]


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version}
    for package in ("longhaul", "peewee", "langgraph", "langgraph-checkpoint-sqlite", "langgraph-checkpoint",
                    "langchain-core", "dbos", "sqlalchemy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def run(plan: Plan) -> dict[str, Any]:
    """Run every harness in one temporary folder; returns the figures as plain data."""
    texts = [("", "")] + [step_texts(step) for step in range(1, max(plan.step_counts) + 1)]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="longhaul-peers-") as root:
        rows = measure([harness() for harness in HARNESSES], Path(root), plan, texts)
    add_speed_ups(rows, plan)
    return {
        "job": {"step_counts": list(plan.step_counts), "messages_per_step": 2, "message_bytes": MESSAGE_BYTES,
                "short_runs": plan.short_runs, "loads": plan.loads},
        "versions": versions(),
        "elapsed_s": time.monotonic() - started,
        "peers": [{"name": row.name, "skipped": row.skipped,
                   "ms_per_step": {str(n): ms for n, ms in row.ms_per_step.items()},
                   "median_ms_per_step": {str(n): ms for n, ms in row.median_ms_per_step.items()},
                   "load_ms": row.load_ms, "median_load_ms": row.median_load_ms,
                   "load_messages": row.load_messages, "speed_up": row.speed_up}
                  for row in rows],
    }


# -- report ----------------------------------------------------------------------


def print_table(result: dict[str, Any]) -> None:
    short, long = result["job"]["step_counts"]
    print(f"agent job: N steps, each appending 2 messages of ~{MESSAGE_BYTES} B and 1 checkpoint; "
          f"SQLite WAL, synchronous=NORMAL; N={short} run {result['job']['short_runs']}x, N={long:,} once")
    print()
    headers = ("peer", f"ms/step N={short}", f"ms/step N={long:,}", f"load ms @{long:,}",
               f"speed-up N={short}", f"N={long:,}", "load")
    width = max(len(peer["name"]) for peer in result["peers"])
    widths = (width,) + tuple(len(h) for h in headers[1:])
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))))
    for peer in result["peers"]:
        if peer["skipped"]:
            print(f"{peer['name']:<{width}}  skipped: {peer['skipped']}")
            continue
        speed = peer["speed_up"]
        cells = [f"{peer['ms_per_step'][str(short)]:.3f}", f"{peer['ms_per_step'][str(long)]:.3f}",
                 f"{peer['load_ms']:.2f}"]
        cells += [f"{speed[key]:.1f}x" for key in (f"N={short}", f"N={long}", "load")] if speed else ["-"] * 3
        print("  ".join([f"{peer['name']:<{width}}"] + [c.rjust(w) for c, w in zip(cells, widths[1:], strict=True)]))
    print()
    print("speed-up = the peer's figure / longhaul record_checkpoint's (first row), both from this run; "
          "> 1x: longhaul is faster")
    print("run_inline row: the whole loop (scripted provider's own ~200 B messages, a tool call, traces, lease)")
    print("versions: " + ", ".join(f"{name} {version}" for name, version in result["versions"].items()))
    print(f"total time: {result['elapsed_s']:.0f} s")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    bench_main(__doc__, lambda quick: run(QUICK if quick else FULL), print_table,
               quick_help="N = 10 and 100, fewer repeats; for CI smoke runs", argv=argv)


if __name__ == "__main__":
    main()
