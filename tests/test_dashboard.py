"""The dashboard over HTTP (Starlette's test client, this test's store): token, CSRF, escaping, pages, actions.

The browser tests (tests/test_dashboard_browser.py) drive the same pages in
Chromium against real worker processes.
"""

from __future__ import annotations

import re

import pytest

from longhaul.models import ChatMessage, TaskSnapshot, TaskStatus
from longhaul.models.redact import register_secrets
from longhaul.worker.api import submit

pytest.importorskip("starlette", reason="the dashboard extra is not installed")
from starlette.testclient import TestClient  # noqa: E402

from longhaul.worker.dashboard import check_bind, dashboard_token  # noqa: E402
from longhaul.worker.dashboard.app import create_app  # noqa: E402
from longhaul.worker.errors import SettingsError  # noqa: E402

TOKEN = "t0ken-for-tests-0123456789"
SECRET = "sk-live-DashboardTestSecret42"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def runtime(make_runtime):
    return make_runtime()


@pytest.fixture
def client(runtime):
    with TestClient(create_app(token=TOKEN), base_url="http://127.0.0.1") as test_client:
        yield test_client


def store_answer(runtime, task_id: str, answer: str, *, thread_id: str = "thread-1") -> None:
    runtime.store.save_snapshot(TaskSnapshot(
        task_id=task_id, thread_id=thread_id, channel="api", provider="scripted", model="scripted-v1",
        status=TaskStatus.COMPLETED, final_response=answer,
        execution_history=[ChatMessage.user("say it"), ChatMessage.assistant(answer)],
        resumable_history=[ChatMessage.user("say it"), ChatMessage.assistant(answer)]))


@pytest.mark.parametrize("path", ["/", "/tasks/any", "/threads/any", "/fragments/tasks", "/static/htmx.min.js",
                                  "/tasks/any/actions/cancel"])
def test_every_page_answers_401_without_the_token(client, path):
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get(f"{path}?token=wrong").status_code == 401


def test_the_token_is_accepted_as_a_bearer_header_or_once_in_the_url_then_as_a_session_cookie(client):
    assert client.get("/", headers=BEARER).status_code == 200
    first = client.get(f"/?token={TOKEN}&status=queued", follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/?status=queued"  # the token leaves the URL
    cookie = first.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/").status_code == 200  # the session cookie now
    page = client.get("/").text
    assert TOKEN not in page


def test_a_model_answer_holding_script_shows_as_text_and_no_secret_is_rendered(runtime, client):
    register_secrets([SECRET])
    store_answer(runtime, "xss", f"<script>alert('pwned')</script> key={SECRET} <img src=x onerror=alert(1)>")

    for path in ("/tasks/xss", "/threads/thread-1", "/tasks/xss/fragment"):
        page = client.get(path, headers=BEARER)
        assert page.status_code == 200
        assert "<script>alert" not in page.text and "<img src=x" not in page.text
        assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in page.text
        assert SECRET not in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]


def test_an_agent_filter_finds_its_tasks_beyond_the_newest_rows_of_other_agents(runtime, client, monkeypatch):
    from longhaul.models import NewTask, TaskSpec
    from longhaul.worker.dashboard import app

    monkeypatch.setattr(app, "AGENT_SCAN_PAGE", 7)  # several pages, one partly matching
    runtime.store.create_task(task_id="oldest", thread_id="t-old", channel="api", provider="rare", model="m",
                              spec=TaskSpec(prompt="old"))
    runtime.store.create_tasks([NewTask(task_id=f"new-{i:02d}", thread_id=f"t-{i}", channel="api",
                                        provider="common", model="m", spec=TaskSpec(prompt="p"))
                                for i in range(app.LIST_LIMIT + 20)])

    page = client.get("/fragments/tasks?agent=rare", headers=BEARER)

    assert page.status_code == 200, page.text
    assert re.findall(r'data-task-id="([^"]+)"', page.text) == ["oldest"]


def test_the_task_list_filters_by_status_agent_thread_and_time_and_counts_each_status(runtime, client):
    store_answer(runtime, "done-1", "ok", thread_id="thread-a")
    submit(runtime, "later", provider="scripted", task_id="queued-1", thread_id="thread-b")

    def listed(query: str) -> list[str]:
        page = client.get(f"/fragments/tasks?{query}", headers=BEARER)
        assert page.status_code == 200, page.text
        return re.findall(r'data-task-id="([^"]+)"', page.text)

    assert sorted(listed("")) == ["done-1", "queued-1"]
    assert listed("status=queued") == ["queued-1"]
    assert listed("thread=thread-a") == ["done-1"]
    assert sorted(listed("agent=scripted")) == ["done-1", "queued-1"] and listed("agent=other") == []
    assert listed("since=2999-01-01T00:00") == []
    page = client.get("/", headers=BEARER).text
    assert re.search(r'data-status="queued">queued <b>1</b>', page)
    assert re.search(r'data-status="completed">completed <b>1</b>', page)
    bad = client.get("/?since=yesterday", headers=BEARER)
    assert bad.status_code == 400 and "since:" in bad.text


def test_an_action_asks_for_confirmation_and_a_post_without_the_csrf_token_is_refused(runtime, client):
    submit(runtime, "to cancel", provider="scripted", task_id="victim")
    client.get(f"/?token={TOKEN}")  # a browser session

    confirm = client.get("/tasks/victim/actions/cancel")
    assert confirm.status_code == 200 and "Cancel task victim?" in confirm.text
    refused = client.post("/tasks/victim/actions/cancel", data={"csrf_token": "forged"})
    assert refused.status_code == 403
    assert runtime.store.summary("victim").status is TaskStatus.QUEUED

    csrf = re.search(r'name="csrf_token" value="([^"]+)"', confirm.text).group(1)
    done = client.post("/tasks/victim/actions/cancel", data={"csrf_token": csrf}, follow_redirects=True)
    assert done.status_code == 200 and "Cancel: cancelled" in done.text
    assert runtime.store.summary("victim").status is TaskStatus.CANCELLED


def test_resume_and_rerun_refuse_to_run_a_task_inside_the_dashboard_without_redis(runtime, client):
    store_answer(runtime, "finished", "ok")
    answer = client.post("/tasks/finished/actions/rerun", headers=BEARER)
    assert answer.status_code == 409 and "needs" in answer.text.lower()
    assert runtime.store.summary("finished").status is TaskStatus.COMPLETED


def test_unknown_tasks_threads_and_actions_are_404s(client):
    assert client.get("/tasks/nope", headers=BEARER).status_code == 404
    assert client.get("/threads/nope", headers=BEARER).status_code == 404
    assert client.get("/tasks/nope/actions/explode", headers=BEARER).status_code == 404


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.4", "example.org", "127.0.0.1.nip.io"])
def test_the_dashboard_refuses_to_listen_beyond_loopback_without_a_token(host):
    with pytest.raises(SettingsError, match="LONGHAUL_DASHBOARD_TOKEN"):
        check_bind(host, None)
    check_bind(host, "a-token")  # with one, it may


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"])
def test_on_loopback_without_a_token_one_is_made_for_the_run(host):
    token, made = dashboard_token(None, host)
    assert made and len(token) >= 24


def test_the_cli_refuses_a_public_bind_without_a_token_in_one_line(longhaul):
    result = longhaul("dashboard", "--host", "0.0.0.0", "--port", "8089")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: LONGHAUL_DASHBOARD_TOKEN: required to listen on '0.0.0.0'")


def test_a_waiting_task_offers_reply_approve_and_deny_with_their_fields(runtime, client):
    from longhaul.models import Claimant, Wait

    submit(runtime, "ask me", provider="scripted", task_id="asker")
    claim = runtime.leases.claim("asker", Claimant(owner="t", host="h", pid=1, pid_started_at=0.0), lease_s=30)
    runtime.store.wait_for_user("asker", Wait(kind="reply", question="which city?", step=1, call=0, tool="ask_user",
                                              since=0.0), lease_token=claim.token)
    client.get(f"/?token={TOKEN}")
    page = client.get("/tasks/asker/actions/reply")
    assert page.status_code == 200 and 'name="text"' in page.text
    assert 'name="reason"' in client.get("/tasks/asker/actions/deny").text
    refused = client.post("/tasks/asker/actions/reply", headers=BEARER, data={"text": "Lisbon"})
    assert refused.status_code == 409  # never run inside the dashboard without Redis
    assert runtime.store.summary("asker").status is TaskStatus.WAITING
