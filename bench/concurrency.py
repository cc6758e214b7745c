"""How many agent tasks one worker host holds in flight while each waits on a slow model.

A loopback OpenAI-compatible server (its own process, plain asyncio) answers
every chat request after a fixed latency L: a task's first five requests get
one ``list_files`` tool call each, the sixth a final answer, so a task is six
model turns. N tasks are enqueued on real Redis while the worker host
(``longhaul worker`` with the given arguments, default ``--concurrency
1000``) is paused (SIGSTOP), then the host resumes and runs them against
that server: admission from a full queue is measured alone.

Printed per run: the most tasks in flight at once, how long after the
resume all N were in flight (or done) and that as tasks admitted per
second, the enqueue rate, the makespan (resume to last finish; the ideal is
6 x L), failed tasks, the worker host's CPU per model
turn (ms) and on average (cores), its largest worker process (RSS, MB), and
the most database connections one of its processes held (PostgreSQL: its
TCP connections to the server's port; SQLite: open descriptors of the
database file). The peers' connections are counted from
``pg_stat_activity``.

Next to it, in the same invocation, the **plain-asyncio ceiling**: one
process, one event loop, one shared ``httpx.AsyncClient``, and each turn's
checkpoint (the assistant message, the tool result, a checkpoint row) written
in one transaction, on 10 psycopg connections for PostgreSQL or one
sqlite3 connection (WAL, synchronous=NORMAL) for SQLite. It does the same
model and store work as longhaul with nothing else, so its CPU per turn is
the floor that longhaul's is judged against (``ratio`` column).

And next to both, **DBOS** (an optional peer, as in ``bench/peers.py``:
its row says "skipped" without ``pip install -e '.[bench]'``): N DBOS async
workflows of six ``@DBOS.step`` model calls on the same backend, one
process.

Nothing asserts on the figures; they are printed for a reader to judge.

    python bench/concurrency.py                                  # N=1,000, L=10 s, SQLite and PostgreSQL
    python bench/concurrency.py --tasks 1000 --latency-s 1 --backend postgres
    python bench/concurrency.py --worker-args "--processes 4 --threads 250"   # the layout of issue 16's table
    python bench/concurrency.py --quick                          # N=20, L=0.2 s, SQLite: about 30 s
    python bench/concurrency.py --backend sqlite --kill-after-s 3  # SIGKILL the host with all N in flight, restart
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shlex
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import psutil

from longhaul.worker.testing import PostgresServer, RedisServer, free_port, wait_until

#: Model turns per task: this many tool calls, then the final answer.
TOOL_TURNS = 5
TURNS_PER_TASK = TOOL_TURNS + 1
#: How often the sampler reads the store and the worker processes.
SAMPLE_INTERVAL_S = 0.25
#: The sampling period until all tasks are in flight (admission).
ADMISSION_SAMPLE_INTERVAL_S = 0.05


# -- the slow model: an OpenAI-compatible server on loopback -------------------------------------


def _completion(request: dict[str, Any]) -> tuple[bytes, str]:
    """The answer to one chat request (body, content type): a tool call until TOOL_TURNS results are in."""
    done = sum(1 for message in request.get("messages", []) if message.get("role") == "tool")
    usage = {"prompt_tokens": 50 + 20 * done, "completion_tokens": 12, "total_tokens": 62 + 20 * done}
    if done < TOOL_TURNS:
        call = {"id": f"call_{done}", "type": "function",
                "function": {"name": "list_files", "arguments": json.dumps({"path": "."})}}
        message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [call]}
        finish = "tool_calls"
    else:
        message, finish = {"role": "assistant", "content": f"done after {done} tool calls"}, "stop"
    if not request.get("stream"):
        body = {"id": "cmpl", "object": "chat.completion", "model": request.get("model", "fake"),
                "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage}
        return json.dumps(body).encode(), "application/json"
    delta: dict[str, Any] = {"role": "assistant"}
    if message.get("content"):
        delta["content"] = message["content"]
    if message.get("tool_calls"):
        delta["tool_calls"] = [{"index": 0, **message["tool_calls"][0]}]
    events = [{"choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]},
              {"choices": [], "usage": usage}]
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n", "text/event-stream"


#: The server's own record of first turns (requests with no assistant message yet), read by `SlowModel.first_turns`:
#: the distinct prompts asked (a retried request counts once) and when the latest new one arrived.
_first_prompts: set[str] = set()
_first_turn_at = [0.0]


async def _serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, latency_s: float) -> None:
    """HTTP/1.1 with keep-alive: each request answered `latency_s` after it arrived; ``GET /first-turns`` at once."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
            length = int(next((v for k, v in headers.items() if k.strip().lower() == "content-length"), "0"))
            request = json.loads(await reader.readexactly(length)) if length else {}
            if lines[0].startswith("GET /first-turns"):
                seen = {"count": len(_first_prompts), "last_at": _first_turn_at[0]}
                body, content_type = json.dumps(seen).encode(), "application/json"
            else:
                messages = request.get("messages", [])
                prompt = next((str(m.get("content")) for m in messages if m.get("role") == "user"), "")
                if prompt not in _first_prompts and not any(m.get("role") == "assistant" for m in messages):
                    _first_prompts.add(prompt)  # a task's first model request (CLOCK_MONOTONIC: system-wide)
                    _first_turn_at[0] = time.monotonic()
                await asyncio.sleep(latency_s)
                body, content_type = _completion(request)
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: keep-alive\r\n\r\n".encode() + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _serve(port: int, latency_s: float) -> None:
    server = await asyncio.start_server(lambda r, w: _serve_connection(r, w, latency_s), "127.0.0.1", port,
                                        backlog=4096)
    async with server:
        await server.serve_forever()


class SlowModel:
    """The fake model server in a process of its own (its CPU is nobody's in the figures)."""

    def __init__(self, latency_s: float) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(self.port), str(latency_s)])

    def __enter__(self) -> SlowModel:
        import socket

        def listening() -> bool:
            with closing(socket.socket()) as probe:
                return probe.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, timeout_s=30, what="the fake model server")
        return self

    def first_turns(self) -> tuple[int, float]:
        """How many first model requests the server has seen, and when the latest arrived (`time.monotonic`)."""
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
        with opener.open(f"http://127.0.0.1:{self.port}/first-turns", timeout=10) as answer:
            seen = json.loads(answer.read())
        return seen["count"], seen["last_at"]

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


# -- one measured run ------------------------------------------------------------------------------


@dataclass
class Figures:
    """What one run measured (times in seconds, CPU in ms per model turn and cores on average)."""

    run: str
    tasks: int
    latency_s: float
    in_flight_max: int
    all_in_flight_after_s: Optional[float]  # from the last enqueue; None if never all at once
    makespan_s: float
    ideal_s: float
    failed: int
    unfinished: int
    cpu_ms_per_turn: float
    cpu_cores: float
    rss_mb_max: float
    db_connections_max: int
    enqueue_per_s: float
    admitted_per_s: Optional[float] = None  # tasks / seconds from the host's resume until all were in flight
    admission_cores: Optional[float] = None  # the host's CPU from its resume until all were in flight, in cores
    claims_began_s: Optional[tuple[float, float]] = None  # from the resume: the first and last claim's start
    first_requests_s: Optional[float] = None  # from the resume until the model had every task's first request
    locked_mentions: int = 0  # "database is locked" in the worker host's log (each a retried call)
    live_paused_mentions: int = 0  # "live output paused" in the log (followers missed events)
    ratio: Optional[float] = None  # cpu_ms_per_turn / the asyncio ceiling's, same backend
    kill: Optional[KillFigures] = None  # with --kill-after-s: the host SIGKILLed with all N in flight, restarted


@dataclass
class KillFigures:
    """The host SIGKILLed once all N were in flight (plus `after_s`), and a fresh host started at once."""

    after_s: float  # how long after all N were in flight the host was killed
    interrupted: int  # tasks unfinished at the kill
    resumed_after_s: Optional[float]  # restart to every interrupted task leased again (or finished); None: never
    stepped_after_s: Optional[float]  # restart to every interrupted task having stored a new step (or finished)
    steps_at_kill: int  # steps the interrupted tasks had stored when the host died
    repeated_steps: int  # tasks whose stored steps or messages differ from an uninterrupted task's: a step twice


class StatusCounts:
    """Reads how many tasks are in each status, straight from the database (not through longhaul)."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.postgres = db_url.startswith("postgresql://")
        self._conn: Any = None

    def __call__(self) -> dict[str, int]:
        rows = self._connection().execute('SELECT "status", COUNT(*) FROM "task" GROUP BY "status"').fetchall()
        return {status: count for status, count in rows}

    def _connection(self) -> Any:
        if self._conn is None:
            if self.postgres:
                import psycopg

                self._conn = psycopg.connect(self.db_url, autocommit=True)
            else:
                path = self.db_url.removeprefix("sqlite:///")
                self._conn = sqlite3.connect(path, timeout=30, check_same_thread=False)  # read by the sampler
        return self._conn

    def progress(self) -> dict[str, tuple[str, Optional[str], int, int]]:
        """task id -> (status, lease token, stored steps, execution messages), read straight from the table."""
        rows = self._connection().execute('SELECT "task_id", "status", "lease_token", "checkpoint_count", '
                                          '"execution_count" FROM "task"').fetchall()
        return {task_id: (status, token, steps, messages) for task_id, status, token, steps, messages in rows}

    def claim_times(self, prefix: str) -> list[float]:
        """When each task whose id starts with `prefix` was first claimed (its ``started_at``, Unix time), sorted."""
        mark = "%s" if self.postgres else "?"
        sql = (f'SELECT "started_at" FROM "task" WHERE "task_id" LIKE {mark} AND "started_at" IS NOT NULL '
               'ORDER BY "started_at"')
        rows = self._connection().execute(sql, (prefix + "%",)).fetchall()
        return [started_at for (started_at,) in rows]

    def connections(self, database: str) -> int:
        """PostgreSQL backends serving `database`, this reader's own connection left out."""
        assert self.postgres
        (count,) = self._connection().execute("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = %s "
                                      "AND pid <> pg_backend_pid()", (database,)).fetchone()
        return int(count)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _cpu_s(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


class HostSampler(threading.Thread):
    """Samples a process tree every SAMPLE_INTERVAL_S: CPU, largest RSS, database connections, task counts."""

    def __init__(self, root: psutil.Process, counts: StatusCounts, *, db_file: Optional[str],
                 pg_port: Optional[int]) -> None:
        super().__init__(daemon=True)
        self.root, self.counts, self.db_file, self.pg_port = root, counts, db_file, pg_port
        self._connections_counted_at = float("-inf")
        self.stop = threading.Event()
        self.in_flight_max = self.rss_max = self.connections_max = 0
        self.cpu_seen: dict[int, float] = {}  # pid -> last CPU seconds (children that exit keep their share)
        self.latest: dict[str, int] = {}
        self.all_in_flight_at: Optional[float] = None
        self.cpu_at_all_in: Optional[float] = None  # the tree's CPU seconds when all were first in flight
        self.total = 0

    def run(self) -> None:
        # Finer until all are in flight: admission takes a few seconds, and its end is what "all in" reports.
        while not self.stop.wait(ADMISSION_SAMPLE_INTERVAL_S if self.all_in_flight_at is None else SAMPLE_INTERVAL_S):
            self.sample()

    def sample(self) -> None:
        processes = _tree(self.root)
        for process in processes:
            try:
                times = process.cpu_times()
                self.cpu_seen[process.pid] = times.user + times.system
                self.rss_max = max(self.rss_max, process.memory_info().rss)
            except psutil.NoSuchProcess:
                continue
        if time.monotonic() - self._connections_counted_at >= SAMPLE_INTERVAL_S:  # a walk of every descriptor
            self._connections_counted_at = time.monotonic()
            self.connections_max = max(self.connections_max, self.connections_per_process(processes))
        self.latest = self.counts()
        running = self.latest.get("running", 0)
        self.in_flight_max = max(self.in_flight_max, running)
        started = sum(n for status, n in self.latest.items() if status != "queued")
        if self.total and self.all_in_flight_at is None and started >= self.total:
            self.all_in_flight_at = time.monotonic()
            self.cpu_at_all_in = self.cpu_s()

    def connections_per_process(self, processes: list[psutil.Process]) -> int:
        """The most database connections one process of the host holds: TCP connections to PostgreSQL's
        port, or open descriptors of the SQLite file."""
        most = 0
        for process in processes:
            try:
                if self.pg_port is not None:
                    held = sum(1 for c in process.net_connections(kind="tcp")
                               if c.raddr and c.raddr.port == self.pg_port)
                else:
                    held = sum(1 for f in process.open_files() if f.path == self.db_file)
            except psutil.NoSuchProcess:
                continue
            most = max(most, held)
        return most

    def cpu_s(self) -> float:
        return sum(self.cpu_seen.values())


def _worker_env(db_url: str, redis_url: str, model: SlowModel, workdir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LONGHAUL_")}
    env.update(LONGHAUL_DATABASE_URL=db_url, LONGHAUL_REDIS_URL=redis_url, LONGHAUL_OPENAI_BASE_URL=model.base_url,
               LONGHAUL_DEFAULT_PROVIDER="openai", LONGHAUL_DEFAULT_MODEL="fake-slow",
               LONGHAUL_WORKSPACE_ROOT=str(workdir / "workspaces"), LONGHAUL_LOG_LEVEL="WARNING")
    return env


def _threads_in(worker_args: list[str]) -> int:
    """The thread count `worker_args` asks for (``--threads N``), for the connection pool size."""
    return int(worker_args[worker_args.index("--threads") + 1]) if "--threads" in worker_args else 4


def run_longhaul(*, backend: str, db_url: str, redis: RedisServer, tasks: int, latency_s: float,
                 worker_args: list[str], workdir: Path, pg_database: Optional[str],
                 kill_after_s: Optional[float] = None) -> Figures:
    """Start a `longhaul worker` host, enqueue `tasks` tasks at once, and measure until all finish.

    With `kill_after_s`, the host is SIGKILLed that long after all tasks
    are in flight and a fresh host is started at once (`_kill_and_restart`).
    """
    from longhaul.worker import Runtime, api, load_settings, set_runtime

    with SlowModel(latency_s) as model:
        env = _worker_env(db_url, redis.url, model, workdir)
        longhaul_cli = [sys.executable, "-c", "from longhaul.worker.cli import main; main()"]
        subprocess.run([*longhaul_cli, "migrate"], env=env, check=True, capture_output=True, timeout=120)
        log = open(workdir / f"worker-{backend}.log", "wb")

        def start_host() -> subprocess.Popen[bytes]:
            return subprocess.Popen([*longhaul_cli, "worker", *worker_args], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)

        host = start_host()
        kill: Optional[KillFigures] = None
        client = Runtime(load_settings(database_url=db_url, redis_url=redis.url))
        set_runtime(client)
        counts = StatusCounts(db_url)
        try:
            # A warm-up task proves the host is up (its processes booted, connected, consuming).
            warm = api.enqueue("warm up", provider="openai", model="fake-slow", task_id="warm-up")
            wait_until(lambda: client.store.summary(warm).status.is_terminal, timeout_s=120 + 10 * latency_s,
                       what="the warm-up task")
            sampler = HostSampler(psutil.Process(host.pid), counts,
                                  db_file=None if pg_database else db_url.removeprefix("sqlite:///"),
                                  pg_port=urlsplit(db_url).port if pg_database else None)
            sampler.sample()
            cpu_before = sampler.cpu_s()
            sampler.total = tasks + 1  # the warm-up task counts as started
            sampler.start()
            # The host is paused (SIGSTOP) while the tasks are enqueued, so that all N wait in the queue when
            # it resumes: admission (queue to in flight) is then measured alone, not bounded by the enqueue rate.
            os.killpg(host.pid, signal.SIGSTOP)
            first_enqueue = time.monotonic()
            try:
                for i in range(tasks):
                    api.enqueue(f"bench task {i}", provider="openai", model="fake-slow", task_id=f"bench-{i:05d}")
            finally:
                last_enqueue, resumed_wall = time.monotonic(), time.time()
                os.killpg(host.pid, signal.SIGCONT)
            deadline = last_enqueue + 60 + 20 * TURNS_PER_TASK * latency_s
            if kill_after_s is not None:
                host, kill = _kill_and_restart(host, start_host, sampler, counts, after_s=kill_after_s,
                                               deadline=deadline)
            while time.monotonic() < deadline:
                finished = sum(n for status, n in sampler.latest.items() if status not in ("queued", "running"))
                if finished >= tasks + 1:
                    break
                time.sleep(SAMPLE_INTERVAL_S)
            finished_at = time.monotonic()
            sampler.stop.set()
            sampler.join()
            sampler.sample()
            cpu_s = sampler.cpu_s() - cpu_before
            final = sampler.latest
            claimed = counts.claim_times("bench-")  # the store's own clock: finer than the sampler's
            first_turns, last_first_turn_at = model.first_turns()  # the warm-up task's included
            if kill is not None:
                kill.repeated_steps = _repeated_steps(counts.progress(), reference="warm-up")
        finally:
            set_runtime(None)
            client.broker.close()
            counts.close()
            try:
                os.killpg(host.pid, signal.SIGTERM)
                host.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(host.pid, signal.SIGKILL)
                host.wait()
            log.close()
    host_log = (workdir / f"worker-{backend}.log").read_text(errors="replace")
    locked, live_paused = host_log.count("database is locked"), host_log.count("live output paused")
    makespan_s = finished_at - last_enqueue  # from the moment all N are queued and the host resumes
    return Figures(
        run=f"longhaul worker {' '.join(worker_args)}", tasks=tasks, latency_s=latency_s,
        in_flight_max=sampler.in_flight_max,
        all_in_flight_after_s=(None if sampler.all_in_flight_at is None
                               else max(0.0, sampler.all_in_flight_at - last_enqueue)),
        makespan_s=makespan_s, ideal_s=TURNS_PER_TASK * latency_s, failed=final.get("failed", 0),
        unfinished=final.get("queued", 0) + final.get("running", 0),
        cpu_ms_per_turn=1000 * cpu_s / (tasks * TURNS_PER_TASK), cpu_cores=cpu_s / makespan_s,
        rss_mb_max=sampler.rss_max / 2**20, db_connections_max=sampler.connections_max,
        enqueue_per_s=tasks / max(last_enqueue - first_enqueue, 1e-9),
        locked_mentions=locked, live_paused_mentions=live_paused,
        admitted_per_s=(None if sampler.all_in_flight_at is None
                        else tasks / max(sampler.all_in_flight_at - last_enqueue, ADMISSION_SAMPLE_INTERVAL_S)),
        admission_cores=(None if sampler.cpu_at_all_in is None or sampler.all_in_flight_at is None
                         else (sampler.cpu_at_all_in - cpu_before) / max(sampler.all_in_flight_at - last_enqueue,
                                                                         ADMISSION_SAMPLE_INTERVAL_S)),
        claims_began_s=None if len(claimed) < tasks else (claimed[0] - resumed_wall, claimed[-1] - resumed_wall),
        first_requests_s=(last_first_turn_at - last_enqueue if first_turns >= tasks + 1 and kill is None else None),
        kill=kill,
    )


#: How often the kill-restart measure reads every task's progress, in seconds.
PROGRESS_INTERVAL_S = 0.1


def _kill_and_restart(host: subprocess.Popen[bytes], start_host: Any, sampler: HostSampler, counts: StatusCounts,
                      *, after_s: float, deadline: float) -> tuple[subprocess.Popen[bytes], KillFigures]:
    """SIGKILL the whole host `after_s` after all tasks are in flight, start a fresh one, time the resume.

    The store says what happened: a task resumed once the new host holds
    its lease (a token other than the one it had at the kill) or it
    finished; it stepped once it stored a step after the kill (or finished).
    """
    while sampler.all_in_flight_at is None and time.monotonic() < deadline:
        time.sleep(PROGRESS_INTERVAL_S)
    time.sleep(after_s)
    os.killpg(host.pid, signal.SIGKILL)
    host.wait()
    at_kill = {task_id: row for task_id, row in counts.progress().items() if row[0] in ("queued", "running")}
    host = start_host()
    restarted = time.monotonic()
    sampler.root = psutil.Process(host.pid)  # the dead host's CPU stays counted (`cpu_seen`)
    resumed_after_s = stepped_after_s = None
    while (resumed_after_s is None or stepped_after_s is None) and time.monotonic() < deadline:
        now = counts.progress()
        pending = [(now[task_id], old) for task_id, old in at_kill.items()
                   if now[task_id][0] in ("queued", "running")]
        if resumed_after_s is None and all(row[1] is not None and row[1] != old[1] for row, old in pending):
            resumed_after_s = time.monotonic() - restarted
        if stepped_after_s is None and all(row[2] > old[2] for row, old in pending):
            stepped_after_s = time.monotonic() - restarted
        time.sleep(PROGRESS_INTERVAL_S)
    return host, KillFigures(after_s=after_s, interrupted=len(at_kill), resumed_after_s=resumed_after_s,
                             stepped_after_s=stepped_after_s, steps_at_kill=sum(row[2] for row in at_kill.values()),
                             repeated_steps=0)


def _repeated_steps(progress: dict[str, tuple[str, Optional[str], int, int]], *, reference: str) -> int:
    """Completed tasks whose stored steps or messages differ from `reference`'s (a task never interrupted).

    Steps are unique per task in the store, so a step run twice shows as a
    task with more messages than an uninterrupted one, or fewer steps.
    """
    _status, _token, steps, messages = progress[reference]
    return sum(1 for task_id, row in progress.items()
               if task_id != reference and row[0] == "completed" and (row[2], row[3]) != (steps, messages))


# -- the ceiling: plain asyncio doing the same model and store work --------------------------------

#: PostgreSQL connections the ceiling writes through.
CEILING_CONNECTIONS = 10
#: HTTP clients the ceiling spreads its tasks over (as many as longhaul's `http_clients.MAX_SHARDS`).
CEILING_CLIENTS = 16
CEILING_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS ceiling_message (task TEXT, position INTEGER, role TEXT, content TEXT)",
    "CREATE TABLE IF NOT EXISTS ceiling_checkpoint (task TEXT, step INTEGER, note TEXT, PRIMARY KEY (task, step))",
]


async def _ceiling(db_url: str, base_url: str, tasks: int) -> dict[str, Any]:
    import httpx

    postgres = db_url.startswith("postgresql://")
    if postgres:
        import psycopg

        # Ten connections handed out through a queue: the smallest pool there is.
        pool: asyncio.Queue[Any] = asyncio.Queue()
        for _ in range(CEILING_CONNECTIONS):
            pool.put_nowait(await psycopg.AsyncConnection.connect(db_url, autocommit=True))
        conn = pool.get_nowait()
        for statement in CEILING_SCHEMA:
            await conn.execute(statement)
        pool.put_nowait(conn)
    else:
        lite = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
        lite.execute("PRAGMA journal_mode=WAL")
        lite.execute("PRAGMA synchronous=NORMAL")
        for statement in CEILING_SCHEMA:
            lite.execute(statement)
    in_flight = in_flight_max = 0

    async def checkpoint(task: str, step: int, messages: list[tuple[int, str, str]]) -> None:
        rows = [(task, position, role, content) for position, role, content in messages]
        if postgres:
            conn = await pool.get()
            try:
                async with conn.transaction(), conn.cursor() as cursor:
                    await cursor.executemany("INSERT INTO ceiling_message VALUES (%s, %s, %s, %s)", rows)
                    await cursor.execute("INSERT INTO ceiling_checkpoint VALUES (%s, %s, %s)", (task, step, "ok"))
            finally:
                pool.put_nowait(conn)
        else:
            lite.execute("BEGIN IMMEDIATE")
            lite.executemany("INSERT INTO ceiling_message VALUES (?, ?, ?, ?)", rows)
            lite.execute("INSERT INTO ceiling_checkpoint VALUES (?, ?, ?)", (task, step, "ok"))
            lite.execute("COMMIT")

    async def one_task(clients: list[httpx.AsyncClient], index: int) -> None:
        client = clients[index % len(clients)]
        nonlocal in_flight, in_flight_max
        task = f"ceiling-{index:05d}"
        history: list[dict[str, Any]] = [{"role": "user", "content": f"bench task {index}"}]
        in_flight += 1
        in_flight_max = max(in_flight_max, in_flight)
        for step in range(1, TURNS_PER_TASK + 1):
            response = await client.post("/chat/completions", json={"model": "fake-slow", "messages": history})
            message = response.json()["choices"][0]["message"]
            new = [(len(history), "assistant", message.get("content") or "")]
            history.append({"role": "assistant", "content": message.get("content"),
                            **({"tool_calls": message["tool_calls"]} if message.get("tool_calls") else {})})
            for call in message.get("tool_calls") or []:
                history.append({"role": "tool", "tool_call_id": call["id"], "content": "[]"})
                new.append((len(history) - 1, "tool", "[]"))
            await checkpoint(task, step, new)
        in_flight -= 1

    # Sharded like longhaul's (worker/providers/http_clients.py): httpcore's pool scans every connection it
    # holds on each request, so one client with a thousand in flight is O(n) per request.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=tasks)
    context = httpx.create_ssl_context()
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits,
                                                                     verify=context))
                   for _ in range(CEILING_CLIENTS)]
        before = resource.getrusage(resource.RUSAGE_SELF)  # imports and connections are off the clock
        started = time.monotonic()
        await asyncio.gather(*(one_task(clients, i) for i in range(tasks)))
        makespan_s = time.monotonic() - started
    if postgres:
        while not pool.empty():
            await pool.get_nowait().close()
    else:
        lite.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
    return {"makespan_s": makespan_s, "cpu_s": cpu_s, "in_flight_max": in_flight_max,
            "rss_mb_max": usage.ru_maxrss / 1024, "db_connections_max": CEILING_CONNECTIONS if postgres else 1}


def run_ceiling(*, db_url: str, tasks: int, latency_s: float) -> Figures:
    """The plain-asyncio ceiling in a process of its own (its own CPU and RSS figures)."""
    with SlowModel(latency_s) as model:
        done = subprocess.run([sys.executable, __file__, "--ceiling", db_url, model.base_url, str(tasks)],
                              capture_output=True, text=True, timeout=600 + 20 * latency_s, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    return _in_process_figures("plain asyncio ceiling (1 process)", measured, tasks=tasks, latency_s=latency_s,
                               db_connections_max=measured["db_connections_max"])


def _in_process_figures(run: str, measured: dict[str, Any], *, tasks: int, latency_s: float,
                        db_connections_max: int) -> Figures:
    """The figures of a one-process peer from what it measured of itself (nothing queued: no admission)."""
    return Figures(
        run=run, tasks=tasks, latency_s=latency_s,
        in_flight_max=measured["in_flight_max"], all_in_flight_after_s=None, makespan_s=measured["makespan_s"],
        ideal_s=TURNS_PER_TASK * latency_s, failed=0, unfinished=0,
        cpu_ms_per_turn=1000 * measured["cpu_s"] / (tasks * TURNS_PER_TASK),
        cpu_cores=measured["cpu_s"] / measured["makespan_s"], rss_mb_max=measured["rss_mb_max"],
        db_connections_max=db_connections_max, enqueue_per_s=float("nan"),
    )


# -- the peer: DBOS async workflows doing the same model work ----------------------------------------

#: What a missing peer prints instead of its row (as bench/peers.py does).
DBOS_INSTALL_HINT = "pip install -e '.[bench]'"


async def _dbos(db_url: str, base_url: str, tasks: int) -> dict[str, Any]:
    """N DBOS async workflows, each six `@DBOS.step` model calls whose answers DBOS records (its checkpoints)."""
    import httpx
    from dbos import DBOS

    clients: list[httpx.AsyncClient] = []
    in_flight = in_flight_max = 0

    @DBOS.step()
    async def model_turn(index: int, history: list[dict[str, Any]]) -> dict[str, Any]:
        response = await clients[index % len(clients)].post(
            "/chat/completions", json={"model": "fake-slow", "messages": history})
        return response.json()["choices"][0]["message"]  # type: ignore[no-any-return]

    @DBOS.workflow()
    async def agent(index: int) -> int:
        nonlocal in_flight, in_flight_max
        in_flight += 1
        in_flight_max = max(in_flight_max, in_flight)
        history: list[dict[str, Any]] = [{"role": "user", "content": f"bench task {index}"}]
        for _ in range(TURNS_PER_TASK):
            message = await model_turn(index, history)
            history.append({"role": "assistant", "content": message.get("content"),
                            **({"tool_calls": message["tool_calls"]} if message.get("tool_calls") else {})})
            for call in message.get("tool_calls") or []:
                history.append({"role": "tool", "tool_call_id": call["id"], "content": "[]"})
        in_flight -= 1
        return len(history)

    DBOS(config={"name": "longhaul-concurrency-bench", "system_database_url": db_url, "log_level": "WARNING"})
    DBOS.launch()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=tasks)
    context = httpx.create_ssl_context()
    clients.extend(httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits, verify=context)
                   for _ in range(CEILING_CLIENTS))
    try:
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.monotonic()
        handles = [await DBOS.start_workflow_async(agent, i) for i in range(tasks)]
        await asyncio.gather(*(handle.get_result() for handle in handles))
        makespan_s = time.monotonic() - started
        usage = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        for client in clients:
            await client.aclose()
        DBOS.destroy()
    cpu_s = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
    return {"makespan_s": makespan_s, "cpu_s": cpu_s, "in_flight_max": in_flight_max,
            "rss_mb_max": usage.ru_maxrss / 1024}


def run_dbos(*, db_url: str, tasks: int, latency_s: float, pg_database: Optional[str]) -> Figures:
    """DBOS in a process of its own; raises `Skipped` when dbos is not installed."""
    import importlib.util

    if importlib.util.find_spec("dbos") is None:
        raise Skipped(DBOS_INSTALL_HINT)
    counts = StatusCounts(db_url) if pg_database else None
    with SlowModel(latency_s) as model:
        peer = subprocess.Popen([sys.executable, __file__, "--dbos", db_url, model.base_url, str(tasks)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        connections_max = 0
        db_file = None if pg_database else db_url.removeprefix("sqlite:///")
        while peer.poll() is None:
            try:
                if counts is not None:
                    connections_max = max(connections_max, counts.connections(pg_database or ""))
                else:
                    held = sum(1 for f in psutil.Process(peer.pid).open_files() if f.path == db_file)
                    connections_max = max(connections_max, held)
            except Exception:  # the peer is starting or exiting; the next sample counts
                pass
            time.sleep(SAMPLE_INTERVAL_S)
        out, err = peer.communicate()
    if counts is not None:
        counts.close()
    if peer.returncode != 0:
        raise Skipped(f"DBOS run failed: {err.strip().splitlines()[-1] if err.strip() else peer.returncode}")
    measured = json.loads(out.strip().splitlines()[-1])
    return _in_process_figures("DBOS async workflows (1 process)", measured, tasks=tasks, latency_s=latency_s,
                               db_connections_max=connections_max)


class Skipped(Exception):
    """A peer that cannot run here (not installed, or it failed): its row says why."""


# -- the whole invocation --------------------------------------------------------------------------


def measure(*, backends: list[str], tasks: int, latency_s: float, worker_args: list[str], with_dbos: bool = True,
            with_ceiling: bool = True, skipped: Optional[list[str]] = None,
            kill_after_s: Optional[float] = None) -> list[Figures]:
    """Each backend's longhaul run, then the ceiling's and DBOS's; a peer that cannot run is noted in `skipped`."""
    results: list[Figures] = []
    skipped = [] if skipped is None else skipped
    with tempfile.TemporaryDirectory(prefix="longhaul-concurrency-") as tmp:
        workdir = Path(tmp)
        postgres: Optional[PostgresServer] = None
        try:
            for backend in backends:
                if backend == "postgres":
                    if postgres is None:
                        postgres = PostgresServer(max_connections=max(200, 4 * _threads_in(worker_args) + 50))
                        postgres.start()
                    urls = [postgres.create_database(f"bench_{name}") for name in ("longhaul", "ceiling", "dbos")]
                    pg_database: Optional[str] = "bench_longhaul"
                else:
                    urls = [f"sqlite:///{workdir / f'{name}.db'}" for name in ("longhaul", "ceiling", "dbos")]
                    pg_database = None
                (workdir / f"redis-{backend}").mkdir()
                redis = RedisServer(workdir / f"redis-{backend}").start()
                try:
                    ours = run_longhaul(backend=backend, db_url=urls[0], redis=redis, tasks=tasks,
                                        latency_s=latency_s, worker_args=worker_args, workdir=workdir,
                                        pg_database=pg_database, kill_after_s=kill_after_s)
                finally:
                    redis.stop()
                rows = [ours]
                ceiling: Optional[Figures] = None
                if with_ceiling:
                    ceiling = run_ceiling(db_url=urls[1], tasks=tasks, latency_s=latency_s)
                    ours.ratio = ours.cpu_ms_per_turn / ceiling.cpu_ms_per_turn
                    rows.append(ceiling)
                if with_dbos:
                    try:
                        peer = run_dbos(db_url=urls[2], tasks=tasks, latency_s=latency_s,
                                        pg_database="bench_dbos" if pg_database else None)
                        if ceiling is not None:
                            peer.ratio = peer.cpu_ms_per_turn / ceiling.cpu_ms_per_turn
                        rows.append(peer)
                    except Skipped as skip:
                        skipped.append(f"{backend}: DBOS async workflows skipped: {skip}")
                for figures in rows:
                    figures.run = f"{backend}: {figures.run}"
                results += rows
        finally:
            if postgres is not None:
                postgres.stop()
    return results


def print_table(results: list[Figures], skipped: list[str]) -> None:
    print(f"{'run':<58} {'N':>5} {'L s':>5} {'in flight':>9} {'all in':>7} {'makespan':>9} {'ideal':>6} "
          f"{'failed':>6} {'CPU ms/turn':>11} {'ratio':>6} {'cores':>6} {'RSS MB':>7} {'DB conns':>8} {'enq/s':>7} "
          f"{'admit/s':>8}")
    for f in results:
        all_in = ("-" if f.enqueue_per_s != f.enqueue_per_s  # NaN: an in-process peer, nothing queued
                  else "never" if f.all_in_flight_after_s is None else f"{f.all_in_flight_after_s:.1f}")
        ratio = "" if f.ratio is None else f"{f.ratio:.2f}x"
        failed = f"{f.failed}" + (f"+{f.unfinished}?" if f.unfinished else "")
        print(f"{f.run:<58} {f.tasks:>5} {f.latency_s:>5g} {f.in_flight_max:>9} {all_in:>7} {f.makespan_s:>8.1f}s "
              f"{f.ideal_s:>5.0f}s {failed:>6} {f.cpu_ms_per_turn:>11.2f} {ratio:>6} {f.cpu_cores:>6.2f} "
              f"{f.rss_mb_max:>7.0f} {f.db_connections_max:>8} {f.enqueue_per_s:>7.0f} "
              f"{'-' if f.admitted_per_s is None else f'{f.admitted_per_s:.0f}':>8}")
    for line in skipped:
        print(line)
    for f in results:
        if f.kill is not None:
            k = f.kill
            resumed = "never" if k.resumed_after_s is None else f"{k.resumed_after_s:.1f} s"
            stepped = "never" if k.stepped_after_s is None else f"{k.stepped_after_s:.1f} s"
            print(f"{f.run}: SIGKILL {k.after_s:g} s after all were in flight ({k.interrupted} unfinished, "
                  f"{k.steps_at_kill} steps stored): all resumed {resumed} after the restart, all stored a new step "
                  f"{stepped} after it; {k.repeated_steps} completed task(s) with a step stored twice or missing")
    for f in results:
        if f.claims_began_s is not None and f.admission_cores is not None:
            first, last = f.claims_began_s
            print(f"{f.run}: admission: the first claim began {first:.2f} s after the resume, the last "
                  f"{last:.2f} s after it (the store's claim times), all in flight {f.tasks / f.admitted_per_s:.2f} s "
                  f"after it, at {f.admission_cores:.2f} cores meanwhile"
                  + ("" if f.first_requests_s is None else
                     f"; the model had every task's first request {f.first_requests_s:.2f} s after it"))
    for f in results:
        if f.locked_mentions:
            print(f"{f.run}: {f.locked_mentions} log mentions of `database is locked` (each a retried call)")
        if f.live_paused_mentions:
            print(f"{f.run}: live output paused {f.live_paused_mentions} time(s) (Redis refused events)")
    print("The host is paused while the N tasks are enqueued: makespan and all in count from its resume; "
          "admit/s: N over all in.")
    print("all in: seconds from the last enqueue until every task was in flight or done; failed: +N? = unfinished "
          "at the deadline; ratio: CPU per turn over the asyncio ceiling's on the same backend.")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 tasks, L = 0.2 s, SQLite only (CI smoke run)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--latency-s", type=float, default=10.0, help="the fake model's answer time")
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--worker-args", default="--concurrency 1000",
                        help="arguments of `longhaul worker` (the host under test)")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "LATENCY_S"), help=argparse.SUPPRESS)
    parser.add_argument("--no-dbos", action="store_true", help="leave out the DBOS peer")
    parser.add_argument("--no-ceiling", action="store_true",
                        help="leave out the plain-asyncio ceiling (a quicker look at longhaul alone; no ratio column)")
    parser.add_argument("--kill-after-s", type=float, metavar="S",
                        help="SIGKILL the host S seconds after all tasks are in flight, start a fresh one, and "
                             "print how soon every interrupted task resumed and stored a new step")
    parser.add_argument("--ceiling", nargs=3, metavar=("DB_URL", "BASE_URL", "TASKS"), help=argparse.SUPPRESS)
    parser.add_argument("--dbos", nargs=3, metavar=("DB_URL", "BASE_URL", "TASKS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(int(args.serve[0]), float(args.serve[1])))
        return
    if args.ceiling:
        print(json.dumps(asyncio.run(_ceiling(args.ceiling[0], args.ceiling[1], int(args.ceiling[2])))))
        return
    if args.dbos:
        print(json.dumps(asyncio.run(_dbos(args.dbos[0], args.dbos[1], int(args.dbos[2])))))
        return
    if args.quick:
        args.tasks, args.latency_s, args.backend, args.worker_args = 20, 0.2, "sqlite", "--concurrency 20"
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    skipped: list[str] = []
    results = measure(backends=backends, tasks=args.tasks, latency_s=args.latency_s,
                      worker_args=shlex.split(args.worker_args), with_dbos=not args.no_dbos,
                      with_ceiling=not args.no_ceiling, skipped=skipped,
                      kill_after_s=args.kill_after_s)
    if args.json:
        print(json.dumps({"runs": [asdict(f) for f in results], "skipped": skipped}, indent=2))
    else:
        print_table(results, skipped)


if __name__ == "__main__":
    main()
