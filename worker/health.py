"""`longhaul health`: whether this host's workers can work, for a supervisor's health check.

Healthy means the task store opens (at a schema this code can run) and
answers, and the Redis broker, when one is configured, answers PING, each
within a few seconds. It is what a Docker ``HEALTHCHECK``, a Kubernetes
probe or a load balancer can run: exit 0 when healthy, else 1 with one line
per failed check (passwords in URLs shown as ``***``).
"""

from __future__ import annotations

from dataclasses import dataclass

from longhaul.models import LonghaulError, TaskStore
from longhaul.models.db import redact_url
from longhaul.models.redact import redact_text

from .settings import Settings

#: How long each check may take, in seconds (a health check that hangs is a failed one).
CHECK_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class HealthCheck:
    """One dependency, and whether it answered."""

    name: str
    ok: bool
    detail: str


def check_health(settings: Settings, *, timeout_s: float = CHECK_TIMEOUT_S) -> list[HealthCheck]:
    """Check the store and (if configured) the broker; never raises."""
    checks = [_check_store(settings, timeout_s)]
    if settings.redis_url is not None:
        checks.append(_check_broker(settings.redis_url, timeout_s))
    return checks


def _failure(exc: Exception) -> str:
    return redact_text(f"{type(exc).__name__}: {exc}".strip())


def _check_store(settings: Settings, timeout_s: float) -> HealthCheck:
    where = redact_url(settings.database_url)
    try:
        store = TaskStore(settings.database_url, busy_timeout_ms=int(timeout_s * 1000), pool_size=1)
        try:
            version = store.schema_version()
        finally:
            store.close_all()
    except LonghaulError as exc:  # already names the variable and the problem
        return HealthCheck("store", False, redact_text(str(exc)))
    except Exception as exc:  # any failure is the answer, not a crash
        return HealthCheck("store", False, f"LONGHAUL_DATABASE_URL {where}: {_failure(exc)}")
    return HealthCheck("store", True, f"{where} (schema {version})")


def _check_broker(url: str, timeout_s: float) -> HealthCheck:
    import redis

    where = redact_url(url)
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # any failure is the answer, not a crash
        return HealthCheck("broker", False, f"LONGHAUL_REDIS_URL {where}: {_failure(exc)}")
    return HealthCheck("broker", True, where)
