"""App modules: a user's agent, tool and provider reach the CLI and every worker process.

The app module is written into a folder of its own, as a user's project
would hold it; every process here is a real one started in that folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from longhaul.models import TaskStatus, TaskStore
from longhaul.worker.testing import WorkerProcess, free_port, wait_until

LONGHAUL = [sys.executable, "-c", "from longhaul.worker.cli import main; main()"]

APP_MODULE = '''
"""A user's app: one tool, one provider, one agent that uses both."""
import longhaul
from pydantic import BaseModel, ConfigDict


class ShoutArguments(BaseModel):
    text: str


@longhaul.tool()
def shout(args: ShoutArguments, ctx: longhaul.ToolContext) -> str:
    """Say the text in capitals."""
    return args.text.upper() + "!"


class EchoProvider:
    """Asks for `shout` once per round, then answers with what it heard and the instructions it saw."""

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        rounds: int = 1

    def next_turn(self, ctx: longhaul.StepContext) -> longhaul.AssistantTurn:
        rounds = ctx.options.get("rounds", 1)
        if ctx.step_index <= rounds:
            call = longhaul.ToolCall(id=f"c{ctx.step_index}", name="shout",
                                     arguments={"text": f"round {ctx.step_index}"})
            return longhaul.AssistantTurn(f"round {ctx.step_index}", [call])
        heard = [m.content for m in ctx.history if m.role == "tool"]
        told = [m.content for m in ctx.history if m.role == "system"]
        return longhaul.AssistantTurn(f"heard={heard} told={told}")


longhaul.register_provider("echo", EchoProvider)

helper = longhaul.Agent(name="helper", instructions="Answer loudly.", provider="echo", model="echo-1",
                        tools=["shout"], options={"rounds": 2})
'''

#: What the agent answers when its tool and provider ran as defined.
EXPECTED_ANSWER = "heard=['ROUND 1!', 'ROUND 2!'] told=['Answer loudly.']"


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """A user's project folder holding the app module `myapp` (and nothing on PYTHONPATH points there)."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "myapp.py").write_text(APP_MODULE)
    (folder / "broken.py").write_text("raise ValueError('settings missing: SECRET_THING')\n")
    return folder


@pytest.fixture
def run_cli(app_dir: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*LONGHAUL, *args], env=env, cwd=app_dir, capture_output=True, text=True, timeout=120)

    return run


def shown(run_cli: Callable[..., Any], task_id: str, env: dict[str, str]) -> Optional[dict[str, Any]]:
    result = run_cli("show", task_id, "--json", env=env)
    return json.loads(result.stdout) if result.returncode == 0 else None


# -- embedded -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["--app", "LONGHAUL_APP"])
def test_an_agent_with_a_custom_tool_and_provider_runs_embedded_from_an_app_module(how, run_cli, cli_env, db_url):
    app = ["--app", "myapp"] if how == "--app" else []
    env = {**cli_env, "LONGHAUL_APP": "myapp"} if how == "LONGHAUL_APP" else cli_env

    result = run_cli("run", *app, "--agent", "helper", "--task-id", "emb", "--json", "shout for me", env=env)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["final_response"] == EXPECTED_ANSWER
    details = shown(run_cli, "emb", env)
    assert details is not None
    assert details["agent"]["name"] == "helper" and len(details["agent"]["version"]) == 12
    assert details["provider"] == "echo" and details["model"] == "echo-1"
    listed = run_cli("tasks", env=env)
    assert f"helper@{details['agent']['version']}" in listed.stdout, listed.stdout


def test_an_app_module_that_fails_to_import_is_one_line_naming_it_and_exit_code_2(run_cli, cli_env):
    for module, problem in [("nosuch", "ModuleNotFoundError: No module named 'nosuch'"),
                            ("broken", "ValueError: settings missing: SECRET_THING")]:
        for args, env in [(("tasks", "--app", module), cli_env), (("tasks",), {**cli_env, "LONGHAUL_APP": module})]:
            result = run_cli(*args, env=env)
            assert result.returncode == 2, (module, result.stderr)
            assert result.stderr.strip() == (f"error: app module {module!r} (--app / LONGHAUL_APP) cannot be "
                                             f"imported: {problem}"), result.stderr


def test_a_process_without_the_app_refuses_its_agent_provider_and_tool_storing_nothing(run_cli, cli_env, db_url):
    for args, named in [(("--agent", "helper"), "agent 'helper'"), (("--provider", "echo"), "provider 'echo'"),
                        (("--tool", "shout"), "tool 'shout'")]:
        result = run_cli("run", *args, "hello", env=cli_env)
        assert result.returncode == 2, result.stderr
        assert named in result.stderr.replace("unknown ", "") and "LONGHAUL_APP" in result.stderr, result.stderr
    with TaskStore(db_url) as store:
        assert store.count_tasks() == 0


# -- real Redis workers -----------------------------------------------------------------------------


WORKER_COMMANDS = {
    "dramatiq with LONGHAUL_APP": ([sys.executable, "-m", "dramatiq", "longhaul.worker.actors", "--processes", "2",
                                    "--threads", "2"], True),
    "longhaul worker --app": ([*LONGHAUL, "worker", "--app", "myapp", "--processes", "2", "--threads", "2"], False),
    "longhaul worker with LONGHAUL_APP": ([*LONGHAUL, "worker", "--processes", "2", "--threads", "2"], True),
}


@pytest.fixture
def start_app_worker(worker_env: dict[str, str], app_dir: Path, tmp_path: Path):
    started: list[WorkerProcess] = []

    def start(argv: list[str], env: dict[str, str]) -> WorkerProcess:
        worker = WorkerProcess(env, processes=2, threads=2, log_path=tmp_path / f"app-worker-{len(started)}.log",
                               cwd=app_dir, argv=argv)
        started.append(worker.start())
        return worker

    yield start
    for worker in started:
        worker.kill()


@pytest.mark.redis
@pytest.mark.parametrize("command", list(WORKER_COMMANDS))
def test_an_agent_from_an_app_module_runs_on_real_redis_workers(command, start_app_worker, run_cli, worker_env,
                                                                db_url):
    argv, app_in_env = WORKER_COMMANDS[command]
    worker = start_app_worker(argv, {**worker_env, "LONGHAUL_APP": "myapp"} if app_in_env else worker_env)
    task_ids = [f"redis-{i}" for i in range(4)]  # several, so both worker processes take some
    for task_id in task_ids:
        sent = run_cli("enqueue", "--app", "myapp", "--agent", "helper", "--task-id", task_id, "shout", env=worker_env)
        assert sent.returncode == 0, sent.stderr

    with TaskStore(db_url) as store:
        try:
            wait_until(lambda: all(store.summary(t).status.is_terminal for t in task_ids), timeout_s=60,
                       what="the workers to finish every task")
        except AssertionError:
            raise AssertionError(worker.log()) from None
        records = [store.get(t) for t in task_ids]
    for record in records:
        assert record.status is TaskStatus.COMPLETED, (record.last_error, worker.log())
        assert record.final_response == EXPECTED_ANSWER
    assert "Traceback" not in worker.log()


@pytest.mark.redis
def test_a_worker_without_the_app_fails_the_task_with_one_line_naming_longhaul_app(start_app_worker, run_cli,
                                                                                     worker_env, db_url):
    worker = start_app_worker([sys.executable, "-m", "dramatiq", "longhaul.worker.actors", "--processes", "1",
                               "--threads", "1"], worker_env)
    sent = run_cli("enqueue", "--app", "myapp", "--agent", "helper", "--task-id", "orphan", "shout", env=worker_env)
    assert sent.returncode == 0, sent.stderr

    with TaskStore(db_url) as store:
        wait_until(lambda: store.summary("orphan").status.is_terminal, timeout_s=60, what="the task to end")
        record = store.get("orphan")
    assert record.status is TaskStatus.FAILED
    assert record.last_error is not None and "\n" not in record.last_error
    assert record.last_error.startswith("this worker lacks it: provider: unknown provider 'echo'")
    assert "LONGHAUL_APP" in record.last_error and "--app" in record.last_error
    assert "Traceback" not in worker.log()


def test_a_worker_whose_app_module_fails_to_import_exits_2_with_one_line(app_dir, cli_env):
    env = {**cli_env, "LONGHAUL_APP": "broken", "LONGHAUL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}

    dramatiq = subprocess.run([sys.executable, "-m", "dramatiq", "longhaul.worker.actors", "--processes", "1",
                               "--threads", "1"], env=env, cwd=app_dir, capture_output=True, text=True, timeout=120)

    logged = dramatiq.stdout + dramatiq.stderr
    assert dramatiq.returncode == 2, logged
    assert ("cannot start a longhaul worker: app module 'broken' (--app / LONGHAUL_APP) cannot be imported: "
            "ValueError: settings missing: SECRET_THING") in logged
    assert "Traceback" not in logged


def test_app_module_names_are_split_on_commas_and_imported_once(app_dir: Path, tmp_path: Path):
    (app_dir / "counted.py").write_text(textwrap.dedent(f"""
        with open({str(tmp_path / 'imports.log')!r}, "a") as log:
            log.write("imported\\n")
    """))
    script = ("from longhaul.worker.apps import import_apps, parse_app_modules; "
              "print(import_apps(parse_app_modules(' counted, myapp,,counted ')))")
    result = subprocess.run([sys.executable, "-c", script], cwd=app_dir, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['counted', 'myapp']"
    assert (tmp_path / "imports.log").read_text() == "imported\n"
