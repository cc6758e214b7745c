"""The dashboard's pages: tasks, a task, a thread; fragments that htmx polls; the action POSTs.

Server-rendered with Jinja2 (autoescaped: model and tool text, which may
hold ``<script>``, always shows as text) and every shown text redacted
(`models.redact`), so no configured secret reaches a page. Live parts are
fragments htmx fetches again every `POLL_S` (the task list, a running
task's steps and trace); htmx is served from the package, nothing from a
CDN. Reads go through the public API and the store's reads; actions
through `actions.ACTIONS`.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from longhaul.models import TaskNotFound, TaskStatus
from longhaul.models.redact import redact, redact_text

from .. import admin
from ..errors import InvalidFilter
from ..runtime import get_runtime
from .actions import ACTIONS, perform
from .security import CSRF_FIELD, TokenGuard, csrf_ok, csrf_token

HERE = Path(__file__).parent
#: How often live fragments are fetched again, in seconds.
POLL_S = 1
#: Most tasks one list shows.
LIST_LIMIT = 200
#: Tasks read per page while an agent filter looks for `LIST_LIMIT` matches (the agent is in the spec, not a column).
AGENT_SCAN_PAGE = 500
#: Most trace events a task page shows (the latest).
TRACE_EVENTS_SHOWN = 300
#: Security headers of every page: no script but ours, no framing, no referrer (a token never leaks).
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                        trim_blocks=True, lstrip_blocks=True)
templates.filters["redact"] = lambda value: redact_text(value) if isinstance(value, str) else redact(value)
templates.filters["when"] = lambda value: value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    flash = request.session.pop("flash", None) if "session" in request.scope else None
    html = templates.get_template(name).render(request=request, csrf=csrf_token(request), csrf_field=CSRF_FIELD,
                                               flash=flash, poll_s=POLL_S, **context)
    return HTMLResponse(html, status_code=status_code, headers=HEADERS)


def _statuses() -> list[str]:
    """Every status the store knows (``waiting`` too, where threads have it)."""
    return [status.value for status in TaskStatus]


def _filters(request: Request) -> dict[str, Any]:
    params = request.query_params
    found: dict[str, Any] = {key: (params.get(key) or "").strip() for key in ("status", "agent", "thread", "since",
                                                                              "until")}
    if found["status"] and found["status"] not in _statuses():
        raise InvalidFilter(f"status: expected one of {', '.join(_statuses())}, got {found['status']!r}")
    for key in ("since", "until"):
        if found[key]:
            try:
                datetime.fromisoformat(found[key])
            except ValueError:
                raise InvalidFilter(f"{key}: expected a date and time such as 2026-01-31T12:00, "
                                f"got {found[key]!r}") from None
    return found


def _listed(filters: dict[str, Any]) -> list[admin.ListedTask]:
    """The newest `LIST_LIMIT` tasks matching the filters.

    The agent lives in each task's stored spec, not in a column, so an
    agent filter pages on through the store (keyset cursors) until it has
    `LIST_LIMIT` matches or the store has no more: never only the matches
    among the newest `LIST_LIMIT` rows.
    """
    query = dict(status=filters["status"] or None, thread_id=filters["thread"] or None,
                 since=datetime.fromisoformat(filters["since"]) if filters["since"] else None,
                 until=datetime.fromisoformat(filters["until"]) if filters["until"] else None)
    if not filters["agent"]:
        return admin.list_tasks(**query, limit=LIST_LIMIT)
    matches: list[admin.ListedTask] = []
    after: Optional[str] = None
    while len(matches) < LIST_LIMIT:
        page = admin.list_tasks(**query, limit=AGENT_SCAN_PAGE, after=after)
        matches.extend(row for row in page
                       if (row.agent.name if row.agent else row.summary.provider) == filters["agent"])
        if len(page) < AGENT_SCAN_PAGE:
            break
        after = page[-1].cursor
    return matches[:LIST_LIMIT]


def _tasks_context(request: Request) -> dict[str, Any]:
    filters = _filters(request)
    store = get_runtime().store
    return {"filters": filters, "statuses": _statuses(), "tasks": _listed(filters),
            "counts": {status: store.count_tasks(status) for status in _statuses()},
            "query": request.url.query}


def _task_list(template: str) -> Any:
    """The task list's page, or its fragment (what htmx fetches again), by `template`."""

    async def endpoint(request: Request) -> Response:
        try:
            return render(request, template, **_tasks_context(request))
        except InvalidFilter as exc:
            return PlainTextResponse(f"400: {exc}", status_code=400)

    return endpoint


def _task_context(task_id: str) -> dict[str, Any]:
    store = get_runtime().store
    record = store.get(task_id)
    after = store.next_trace_sequence(task_id) - TRACE_EVENTS_SHOWN - 1
    events = store.traces(task_id, after_sequence=after)
    actions = [action for action in ACTIONS.values() if action.applies(record)]
    return {"task": record, "events": events, "actions": actions, "live": not record.status.is_terminal}


def _task_view(template: str) -> Any:
    """A task's page, or its body alone (what htmx fetches again while it runs), by `template`."""

    async def endpoint(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        try:
            return render(request, template, **_task_context(task_id))
        except TaskNotFound:
            return render(request, "missing.html", status_code=404, what=f"task {task_id}")

    return endpoint


async def thread_page(request: Request) -> Response:
    thread_id = request.path_params["thread_id"]
    store = get_runtime().store
    listed = admin.list_tasks(thread_id=thread_id, limit=LIST_LIMIT, order_by="created")
    if not listed:
        return render(request, "missing.html", status_code=404, what=f"thread {thread_id}")
    records = [store.get(row.summary.task_id, checkpoints=False) for row in reversed(listed)]  # oldest first
    return render(request, "thread.html", thread_id=thread_id, records=records)


def _action(request: Request) -> tuple[Optional[str], Any]:
    name = request.path_params["action"]
    return request.path_params["task_id"], ACTIONS.get(name)


async def confirm_page(request: Request) -> Response:
    task_id, action = _action(request)
    if action is None:
        return render(request, "missing.html", status_code=404, what=f"action {request.path_params['action']}")
    return render(request, "confirm.html", task_id=task_id, action=action,
                  question=action.confirm.format(task_id=task_id))


async def action_post(request: Request) -> Response:
    task_id, action = _action(request)
    if action is None:
        return render(request, "missing.html", status_code=404, what=f"action {request.path_params['action']}")
    form = await request.form()
    if not csrf_ok(request, form.get(CSRF_FIELD)):
        return PlainTextResponse("403: this form is stale or was not sent by the dashboard (CSRF token missing "
                                 "or wrong); reload the page and try again", status_code=403)
    fields = {name: str(form.get(name, "")) for name in action.fields}
    ok, message = perform(action.name, str(task_id), fields)
    if request.scope.get("longhaul.bearer"):
        return PlainTextResponse(message, status_code=200 if ok else 409)
    request.session["flash"] = {"ok": ok, "message": message}
    return RedirectResponse(f"/tasks/{task_id}", status_code=303)


def create_app(*, token: str) -> Starlette:
    """The dashboard as an ASGI app over the process's runtime (`runtime.get_runtime`), guarded by `token`."""
    routes = [
        Route("/", _task_list("tasks.html")),
        Route("/fragments/tasks", _task_list("_tasks_table.html")),
        Route("/tasks/{task_id:path}/fragment", _task_view("_task_body.html")),
        Route("/tasks/{task_id:path}/actions/{action}", confirm_page, methods=["GET"]),
        Route("/tasks/{task_id:path}/actions/{action}", action_post, methods=["POST"]),
        Route("/tasks/{task_id:path}", _task_view("task.html")),
        Route("/threads/{thread_id:path}", thread_page),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [
        # A fresh signing key per dashboard process: its sessions end when it stops.
        Middleware(SessionMiddleware, secret_key=secrets.token_urlsafe(32), session_cookie="longhaul_dashboard",
                   same_site="strict", https_only=False, max_age=12 * 3600),
        Middleware(TokenGuard, token=token),
    ]
    return Starlette(routes=routes, middleware=middleware)
