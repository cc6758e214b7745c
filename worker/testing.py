"""Real parts for tests and benchmarks: a throwaway Redis and PostgreSQL, worker processes, ledgers.

Used by longhaul's own test suite and `bench/`; useful to anyone testing
tasks built on longhaul against real processes rather than mocks.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, TypeVar

T = TypeVar("T")

#: True under CI: a missing real server is then a failure, not a skip.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


class FakeClock:
    """A clock (seconds since the epoch) that moves only when a test moves it.

    Pass it as ``TaskStore(url, clock=FakeClock())``: leases expire when the
    test says so, not after a sleep.
    """

    def __init__(self, start_s: float = 1_700_000_000.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> float:
        self.now_s += seconds
        return self.now_s


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def missing_prerequisite(reason: str) -> NoReturn:
    """Skip the test where `reason` (a tool or privilege it needs) is missing locally; in CI, fail it.

    CI (``CI=true``) must provide everything the suite needs (`.ci/run` installs it), so a
    prerequisite missing there is a broken CI set-up, never a silently skipped test.
    """
    import pytest

    if IN_CI:
        pytest.fail(f"{reason}; .ci/run must provide it")
    pytest.skip(reason)


def wait_until(predicate: Callable[[], T], *, timeout_s: float, what: str, poll_s: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy; `AssertionError` naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def ledger_counts(path: Path) -> Counter[str]:
    """How often each ledger line (``<task_id> step <i>``) was written."""
    if not path.exists():
        return Counter()
    return Counter(line for line in path.read_text().splitlines() if line)


def wait_for_go(go: Path, index: int, *, timeout_s: float = 30) -> None:
    """In a child of `run_released_together`: say ``ready-<index>``, then wait for ``go``."""
    (go.parent / f"ready-{index}").touch()
    deadline = time.monotonic() + timeout_s
    while not go.exists():
        if time.monotonic() > deadline:
            sys.exit(f"no go signal within {timeout_s:.0f} s")
        time.sleep(0.005)


def run_released_together(scripts: list[list[str]], *, workdir: Path, timeout_s: float) -> list[str]:
    """Run Python scripts (``python -c script args...``) in child processes released at one moment.

    Each script must touch ``ready-<i>`` in `workdir` once set up, then wait
    for ``go`` there: contention starts when every child is ready. Returns
    each child's stdout; a child that fails raises `AssertionError` with its
    stderr.
    """
    children = [subprocess.Popen([sys.executable, "-c", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for argv in scripts]
    try:
        def ready() -> bool:
            exited = [child for child in children if child.poll() is not None]
            assert not exited, [child.communicate()[1] for child in exited]
            return all((workdir / f"ready-{i}").exists() for i in range(len(children)))

        wait_until(ready, timeout_s=60, what="every child process to be ready")
        (workdir / "go").touch()
        outputs = []
        for child in children:
            stdout, stderr = child.communicate(timeout=timeout_s)
            assert child.returncode == 0, stderr
            outputs.append(stdout)
        return outputs
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


class RedisServer:
    """A redis-server on a free loopback port, without persistence."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self.pings, timeout_s=10, what="redis-server to answer PING")
        return self

    def pings(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart_empty(self) -> None:
        """Lose every queued message, as a crashed broker without persistence does."""
        self.stop()
        self.start()


class PostgresServer:
    """A throwaway PostgreSQL cluster: ``initdb`` into a temp dir, ``pg_ctl start`` on a free loopback port.

    Trust authentication on 127.0.0.1 and on the Unix socket, which lives in
    the cluster's own temp dir; durability settings are off (tests kill
    workers, never the database). PostgreSQL refuses to run as root, so as
    root the cluster belongs to the ``postgres`` user (else ``nobody``).
    `stop` shuts it down and deletes the folder.
    """

    #: Where Debian's `postgresql` package puts the server binaries (not on PATH).
    DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"

    def __init__(self, *, max_connections: int = 200) -> None:
        """Pick a port and a temp dir (``$TMPDIR/longhaul-pg-*``); `start` creates the cluster there."""
        self.port = free_port()
        self.max_connections = max_connections
        self.bin_dir = self.find_bin_dir()
        if self.bin_dir is None:
            raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
        self.root = Path(tempfile.mkdtemp(prefix="longhaul-pg-"))
        self.data_dir = self.root / "data"
        self.log_path = self.root / "server.log"
        self._user = self._run_as()
        self._version_num: Optional[int] = None

    @classmethod
    def find_bin_dir(cls) -> Optional[Path]:
        """The folder holding ``initdb`` and ``pg_ctl``: on PATH, else Debian's newest, else None."""
        on_path = shutil.which("initdb")
        if on_path and shutil.which("pg_ctl"):
            return Path(on_path).parent
        for found in sorted(glob.glob(cls.DEBIAN_BIN_GLOB), key=lambda p: int(Path(p).parent.name)
                            if Path(p).parent.name.isdigit() else 0, reverse=True):
            if (Path(found) / "initdb").exists():
                return Path(found)
        return None

    @staticmethod
    def _run_as() -> Optional[pwd.struct_passwd]:
        if os.geteuid() != 0:
            return None
        for name in ("postgres", "nobody"):
            try:
                return pwd.getpwnam(name)
            except KeyError:
                continue
        raise RuntimeError("running as root, and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")

    def _run(self, *argv: str) -> None:
        assert self.bin_dir is not None
        user = self._user
        done = subprocess.run(
            [str(self.bin_dir / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=120,
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
            user=user.pw_uid if user else None, group=user.pw_gid if user else None,
            extra_groups=[] if user else None, cwd=self.root,
        )
        if done.returncode != 0:
            log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()}\n{log}")

    @property
    def url(self) -> str:
        """The URL of the ``postgres`` maintenance database."""
        return self.url_for("postgres")

    def url_for(self, database: str, *, schema: Optional[str] = None) -> str:
        """A URL of `database`; with `schema`, connections put that schema first on their search path."""
        url = f"postgresql://postgres@127.0.0.1:{self.port}/{database}"
        return url if schema is None else f"{url}?options=-csearch_path%3D{schema}"

    def start(self) -> PostgresServer:
        """Create the cluster and start the server; on failure nothing is left running or on disk."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> PostgresServer:
        if self._user is not None:
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
                  "--locale=C", "--no-sync")
        return self.start_server()

    def start_server(self) -> PostgresServer:
        """Start the server of the existing cluster (after `stop_server`) and wait until it answers."""
        options = " ".join([
            f"-p {self.port}", f"-k {self.root}", "-c listen_addresses=127.0.0.1",
            f"-c max_connections={self.max_connections}", "-c shared_buffers=64MB",
            # Throwaway data: skip durability, which only costs the tests time.
            "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
        ])
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-o", options, "-w",
                  "-t", "60", "start")
        wait_until(self.answers, timeout_s=30, what="PostgreSQL to accept connections")
        return self

    def stop_server(self, *, mode: str = "fast") -> None:
        """Shut the server down, keeping the cluster: ``fast`` ends every session, as an operator's restart does."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, *, mode: str = "fast") -> None:
        """``pg_ctl restart -m fast`` in two halves: every open connection dies, the data stays."""
        self.stop_server(mode=mode)
        self.start_server()

    def answers(self) -> bool:
        try:
            self.execute("SELECT 1")
            return True
        except Exception:
            return False

    def execute(self, sql: str, *, database: str = "postgres") -> Any:
        """Run one statement in autocommit (CREATE/DROP DATABASE cannot run in a transaction); its first row."""
        import psycopg

        with psycopg.connect(self.url_for(database), autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(sql.encode())
            return cursor.fetchone() if cursor.description else None

    def create_database(self, name: str, *, template: Optional[str] = None) -> str:
        """Create a database (a copy of `template`, if given) and return its URL."""
        copy = f' TEMPLATE "{template}"' if template else ""
        if copy and self.version_num() >= 150000:
            # A file copy beats PostgreSQL 15's default WAL_LOG strategy 3x for small databases.
            copy += " STRATEGY FILE_COPY"
        self.execute(f'CREATE DATABASE "{name}"{copy}')
        return self.url_for(name)

    def version_num(self) -> int:
        """The server's version as a number (150018 for 15.18)."""
        if self._version_num is None:
            self._version_num = int(self.execute("SHOW server_version_num")[0])
        return self._version_num

    def create_schema(self, database: str, schema: str) -> str:
        """Create an empty schema in `database` and return a URL whose connections work in it.

        A fresh schema is a fresh store at a fraction of a database's cost
        (no catalog copy, no checkpoint): what per-test isolation wants.
        """
        self.execute(f'CREATE SCHEMA "{schema}"', database=database)
        return self.url_for(database, schema=schema)

    def drop_schema(self, database: str, schema: str) -> None:
        self.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE', database=database)

    def stop(self) -> None:
        if self.data_dir.exists() and (self.data_dir / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
            except RuntimeError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


class RoundTrips:
    """Counts the round trips a psycopg 3 connection makes to its server, from libpq's trace of the wire.

    A round trip is the client sending messages, then reading the server's
    answer: each turn from frontend (``F``) to backend (``B``) messages in
    the trace counts one. Statements sent together in pipeline mode and
    answered together count once; a statement sent and waited for alone
    counts once. Use it around calls on one connection::

        with RoundTrips(conn) as trips:
            ...
        trips.count
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.count = 0
        self._file: Any = None

    def __enter__(self) -> RoundTrips:
        from psycopg import pq

        self._file = tempfile.TemporaryFile("w+")
        self.conn.pgconn.trace(self._file.fileno())
        self.conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.conn.pgconn.untrace()  # flushes libpq's buffered trace into the file
        self._file.seek(0)
        directions = [line[:1] for line in self._file.read().splitlines() if line[:1] in ("F", "B")]
        self._file.close()
        self.count = sum(1 for sent, then in itertools.pairwise(directions) if sent == "F" and then == "B")


class WorkerProcess:
    """``dramatiq longhaul.worker.actors`` in its own process group, killable as a whole."""

    def __init__(self, env: dict[str, str], *, processes: int, threads: int, log_path: Path,
                 cwd: Optional[Path] = None, argv: Optional[list[str]] = None) -> None:
        self.env = env
        self.processes = processes
        self.threads = threads
        self.log_path = log_path
        self.cwd = cwd
        #: The command to start instead of ``dramatiq longhaul.worker.actors`` (e.g. ``longhaul worker``).
        self.argv = argv
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.started_at = 0.0  # time.monotonic() at start

    def start(self) -> WorkerProcess:
        with open(self.log_path, "ab") as log:
            self.started_at = time.monotonic()
            argv = self.argv or [sys.executable, "-m", "dramatiq", "longhaul.worker.actors",
                                 "--processes", str(self.processes), "--threads", str(self.threads)]
            self.proc = subprocess.Popen(argv, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def kill(self) -> None:
        """SIGKILL the whole process group: the main process and its worker processes."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            self.proc = None

    def terminate(self, *, timeout_s: float = 60) -> int:
        """SIGTERM, as a deploy does; waits for the graceful exit and returns its code."""
        assert self.proc is not None, "worker not running"
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout_s)
        self.proc = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
