"""All configuration, read once from the environment (``LONGHAUL_*``)."""

from __future__ import annotations

import socket
from typing import Optional

from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from models import DEFAULT_DATABASE_URL, InvalidInput


class SettingsError(InvalidInput):
    """An environment variable holds a value longhaul cannot use."""


class Settings(BaseSettings):
    """Every knob, with its environment variable and default."""

    model_config = SettingsConfigDict(env_prefix="LONGHAUL_", extra="ignore", frozen=True, populate_by_name=True)

    # Where tasks live: sqlite:///path (default), a plain path, or postgresql://...
    database_url: str = DEFAULT_DATABASE_URL
    # Redis broker URL (LONGHAUL_REDIS_URL or REDIS_URL); unset = embedded in-process broker.
    redis_url: Optional[str] = Field(default=None, validation_alias=AliasChoices("LONGHAUL_REDIS_URL", "REDIS_URL"))
    # The Dramatiq queue longhaul's actor consumes.
    queue_name: str = Field(default="longhaul", min_length=1)
    # How long a claimed task stays leased without a checkpoint or heartbeat.
    lease_s: float = Field(default=30.0, gt=0)
    # How often a worker renews the leases of the tasks it runs (default: lease_s / 3).
    heartbeat_interval_s: Optional[float] = Field(default=None, gt=0)
    # How often each worker process looks for interrupted tasks to resume.
    recovery_interval_s: float = Field(default=5.0, gt=0)
    # A queued task whose message has not arrived this long after it was due is re-sent.
    redelivery_grace_s: float = Field(default=300.0, ge=0)
    # A task resumed more often than this is marked failed (a poison task).
    max_recoveries: int = Field(default=20, ge=0)
    # Dramatiq retries of transient errors (provider 429/5xx, database unavailable).
    max_retries: int = Field(default=8, ge=0)
    min_backoff_ms: int = Field(default=1_000, ge=1)
    max_backoff_ms: int = Field(default=300_000, ge=1)
    # Per-delivery time limit when a task sets none; long-horizon tasks need hours.
    default_time_limit_s: float = Field(default=24 * 3600, gt=0)
    # The host name recorded on leases (override to simulate hosts, or to pin a pod name).
    worker_host: str = Field(default_factory=socket.gethostname, min_length=1)
    # SQLite busy timeout: how long a writer queues behind another.
    sqlite_busy_timeout_ms: int = Field(default=30_000, ge=0)
    # Provider and model used when a task names none.
    default_provider: str = "scripted"
    default_model: str = "scripted-v1"

    @property
    def heartbeat_every_s(self) -> float:
        return self.heartbeat_interval_s or self.lease_s / 3


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; a bad value names its variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            var = "LONGHAUL_" + field.upper() if not field.startswith("LONGHAUL_") else field
            problems.append(f"{var}: {err['msg']} (got {err.get('input')!r})")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None
