"""The dashboard's guard: where it may listen, who may read it, and which POSTs it believes.

- `check_bind`: beyond loopback only with a configured token. The address
  is judged as written (parsed, never resolved): ``localhost`` and
  127.0.0.0/8 / ``::1`` are loopback, any other name or address is not.
- `TokenGuard`: every request needs the token, as ``Authorization: Bearer
  <token>`` or, for a browser, once as ``?token=<token>``: that request
  gets a session cookie (HttpOnly, SameSite=Strict) and is redirected to
  the same page without the token, so it leaves no trace in the history.
  Anything else answers 401.
- CSRF: a cookie session carries a random token that every form posts
  back (`csrf_token`); a POST without it is refused (403). A Bearer request
  needs none: a browser never adds that header by itself.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from typing import Any, Awaitable, Callable, Optional
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse

from ..errors import SettingsError

#: The session key that marks a browser session as signed in.
SIGNED_IN = "signed_in"
#: The session key of the session's CSRF token.
CSRF_KEY = "csrf"
#: The form field every POST carries.
CSRF_FIELD = "csrf_token"


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or name, as written) is this machine only; names other than localhost are not."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: Optional[str]) -> None:
    """`SettingsError` if the dashboard would listen beyond loopback without a token."""
    if not token and not is_loopback(host):
        raise SettingsError(f"LONGHAUL_DASHBOARD_TOKEN: required to listen on {host!r}, which is not loopback "
                            "(set a long random token, or use --host 127.0.0.1)")


def csrf_token(request: Request) -> str:
    """The session's CSRF token (made on first use); empty for a Bearer request (which needs none)."""
    if "session" not in request.scope or not request.session.get(SIGNED_IN):
        return ""
    token = request.session.get(CSRF_KEY)
    if not token:
        token = request.session[CSRF_KEY] = secrets.token_urlsafe(32)
    return str(token)


def csrf_ok(request: Request, posted: Any) -> bool:
    """Whether a POST may act: a Bearer request, or a session's with its CSRF token posted back."""
    if request.scope.get("longhaul.bearer"):
        return True
    expected = request.session.get(CSRF_KEY) if request.session.get(SIGNED_IN) else None
    return bool(expected) and isinstance(posted, str) and hmac.compare_digest(posted, str(expected))


class TokenGuard:
    """ASGI middleware: the token, or a 401 (inside Starlette's SessionMiddleware, which it reads)."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, token: str) -> None:
        self.app = app
        self.token = token.encode()

    def _matches(self, offered: str) -> bool:
        return hmac.compare_digest(offered.encode(), self.token)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        authorization = request.headers.get("authorization", "")
        if authorization.lower().startswith("bearer ") and self._matches(authorization[7:].strip()):
            scope["longhaul.bearer"] = True
            await self.app(scope, receive, send)
            return
        offered = request.query_params.get("token")
        if offered is not None and self._matches(offered):
            request.session.clear()
            request.session[SIGNED_IN] = True
            others = [(key, value) for key, value in request.query_params.multi_items() if key != "token"]
            target = request.url.path + ("?" + urlencode(others) if others else "")
            await RedirectResponse(target, status_code=303)(scope, receive, send)
            return
        if request.session.get(SIGNED_IN):
            await self.app(scope, receive, send)
            return
        await PlainTextResponse("401: this dashboard needs its token (Authorization: Bearer <token>, "
                                "or open it once with ?token=<token>)", status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
