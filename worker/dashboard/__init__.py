"""`longhaul dashboard`: a web page an operator can leave open (the optional ``longhaul[dashboard]`` extra).

`serve` checks where it may listen (`security.check_bind`), then runs the
Starlette app of `app.create_app` under uvicorn. The token is
`LONGHAUL_DASHBOARD_TOKEN`; on loopback without one, a random token is
made for this run and the URL to open (with it) is printed once.
"""

from __future__ import annotations

import secrets
from typing import Callable, Optional

from ..errors import SettingsError
from .security import check_bind, is_loopback

__all__ = ["check_bind", "dashboard_token", "is_loopback", "serve"]


def dashboard_token(configured: Optional[str], host: str) -> tuple[str, bool]:
    """(the token to require, whether it was made for this run); `SettingsError` beyond loopback without one."""
    check_bind(host, configured)
    if configured:
        return configured, False
    return secrets.token_urlsafe(24), True


def serve(*, host: str, port: int, announce: Callable[[str], None]) -> None:
    """Serve the dashboard until interrupted; `announce` is told the URL to open."""
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise SettingsError(f"the dashboard needs its extra: pip install 'longhaul[dashboard]' ({exc})") from None
    from ..runtime import get_runtime

    settings = get_runtime().settings
    configured = settings.dashboard_token.get_secret_value() if settings.dashboard_token else None
    token, made = dashboard_token(configured, host)
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{port}/"
    announce(f"longhaul dashboard at {url}?token={token}" if made else
             f"longhaul dashboard at {url} (open it once with ?token=<LONGHAUL_DASHBOARD_TOKEN>)")
    uvicorn.run(create_app(token=token), host=host, port=port, log_level="warning", server_header=False)
