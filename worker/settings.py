"""All configuration, read once from the environment (``LONGHAUL_*``)."""

from __future__ import annotations

import os
import re
import socket
from typing import Literal, Optional
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as SourceParseError

from longhaul.models import DEFAULT_DATABASE_URL
from longhaul.models.db import DEFAULT_POOL_SIZE
from longhaul.models.redact import register_secrets

from .apps import parse_app_modules
from .errors import SettingsError
from .fault_points import FAULT_POINTS
from .limits import MAX_CONCURRENCY

#: Worker threads per process when neither --threads nor --concurrency says.
DEFAULT_THREADS = 4
#: Tasks in flight one greenlet process is given before `--concurrency` spreads them over another core's.
TASKS_PER_PROCESS = 500


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, as a container's cpuset sets it), else the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return os.cpu_count() or 1


def processes_for(concurrency: Optional[int], *, cpus: Optional[int] = None) -> int:
    """Worker processes for `concurrency` tasks when --processes is not given: one per `TASKS_PER_PROCESS`.

    A process runs its tasks on one core (one interpreter lock; with
    greenlets, one OS thread), so a host with tasks for more than one
    process spreads them over its cores, at most one process per core.
    Without `concurrency` (4 per process), one.
    """
    if concurrency is None:
        return 1
    cpus = cpus if cpus is not None else usable_cpus()
    return max(1, min(cpus, -(-concurrency // TASKS_PER_PROCESS)))


def threads_per_process(*, processes: int, threads: Optional[int], concurrency: Optional[int]) -> int:
    """Worker threads each of `processes` runs: `threads` if given, else `concurrency` spread evenly, else 4."""
    if threads is not None:
        return threads
    if concurrency is not None:
        return max(1, -(-concurrency // processes))
    return DEFAULT_THREADS


#: The log levels `LONGHAUL_LOG_LEVEL` accepts (any case).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: The URL schemes a Redis URL may have (what redis-py accepts).
REDIS_URL_SCHEMES = ("redis", "rediss", "unix")


def log_level_from_env(default: str) -> str:
    """`LONGHAUL_LOG_LEVEL` as a level name (`default` when unset); `SettingsError` naming it otherwise.

    Read on its own, before the other settings: logging is set up before
    anything else is loaded.
    """
    raw = os.environ.get("LONGHAUL_LOG_LEVEL")
    if raw is None or not raw.strip():
        return default
    if raw.strip().upper() not in LOG_LEVELS:
        raise SettingsError(f"LONGHAUL_LOG_LEVEL: must be one of {', '.join(LOG_LEVELS)} (got {raw!r})")
    return raw.strip().upper()


class Settings(BaseSettings):
    """Every knob, with its environment variable and default."""

    model_config = SettingsConfigDict(env_prefix="LONGHAUL_", extra="ignore", frozen=True, populate_by_name=True)

    # Where tasks live: sqlite:///path (default, one host), a plain path, or postgresql://user:pass@host:5432/db.
    database_url: str = DEFAULT_DATABASE_URL
    # Database connections per process; a task borrows one only while it reads or writes, so 16 serve
    # a thousand tasks in flight (a thread waits for a free one at most 30 s).
    db_pool_size: int = Field(default=DEFAULT_POOL_SIZE, ge=1)
    # Tasks one `longhaul worker` host runs at once (`--concurrency`), over its --processes (default: one
    # per 500 tasks, at most one per core); unset: 4 per process (`--threads`). Tasks that mostly wait on
    # a model take 1,000 on two cores.
    concurrency: Optional[int] = Field(default=None, ge=1, le=MAX_CONCURRENCY)
    # What a `longhaul worker` process runs its tasks on: "greenlets" (gevent; the default: a task waiting
    # on its model costs no OS thread) or "threads" (one OS thread per task, no patched standard library).
    worker_pool: Literal["greenlets", "threads"] = "greenlets"
    # Redis broker URL (LONGHAUL_REDIS_URL or REDIS_URL); unset = embedded in-process broker.
    redis_url: Optional[str] = Field(default=None, validation_alias=AliasChoices("LONGHAUL_REDIS_URL", "REDIS_URL"))
    # Log level of the CLI and the worker processes: DEBUG, INFO, WARNING, ERROR or CRITICAL (default: the
    # CLI's WARNING, the workers' INFO).
    log_level: Optional[str] = None
    # The Dramatiq queue longhaul's actor consumes.
    queue_name: str = Field(default="longhaul", min_length=1)
    # How long a task's and a thread's live output (`longhaul follow`) stays in Redis after its last event.
    follow_retention_s: float = Field(default=7 * 86400.0, gt=0)
    # The most events kept per task's or thread's live stream (older ones are trimmed, approximately).
    follow_max_events: int = Field(default=100_000, ge=100)
    # How long a task stays leased without a checkpoint or heartbeat.
    lease_s: float = Field(default=30.0, gt=0)
    # How often a worker renews the leases of the tasks it runs (default: lease_s / 3).
    heartbeat_interval_s: Optional[float] = Field(default=None, gt=0)
    # How often each worker process looks for interrupted tasks to resume.
    recovery_interval_s: float = Field(default=5.0, gt=0)
    # A queued task whose message has not arrived this long after it was due is re-sent.
    redelivery_grace_s: float = Field(default=300.0, ge=0)
    # A Redis consumer silent this long is presumed dead: what it had fetched is requeued.
    broker_stale_consumer_s: float = Field(default=10.0, gt=0)
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
    # Write trace events (batched with each checkpoint); false turns tracing off.
    traces: bool = True
    # SQLite busy timeout: how long a writer queues behind another.
    sqlite_busy_timeout_ms: int = Field(default=30_000, ge=0)
    # App modules (comma-separated) imported by every CLI command and worker process: the user's agents,
    # tools and providers (`--app` on the CLI adds to it).
    app: str = ""
    # SQLite durability: normal survives process crashes (last commits may roll back on power loss); full syncs each.
    sqlite_synchronous: Literal["normal", "full"] = "normal"
    # Provider and model used when a task names none.
    default_provider: str = "scripted"
    default_model: str = "scripted-v1"

    # -- observing (worker/metrics.py; OpenTelemetry is configured by the standard OTEL_* variables) --
    # `longhaul worker` serves Prometheus metrics of its whole pool on this port (--metrics-port); unset = none.
    metrics_port: Optional[int] = Field(default=None, ge=1, le=65535)
    # The address the metrics endpoint binds (0.0.0.0 to let a Prometheus on another host scrape it).
    metrics_host: str = Field(default="127.0.0.1", min_length=1)
    # The dashboard's token (`longhaul dashboard`): required on every request; never printed.
    dashboard_token: Optional[SecretStr] = None

    # -- providers (worker/providers/) --
    # OpenAI-compatible chat-completions endpoint: OpenAI, Azure-style gateways, vLLM, Ollama, LiteLLM, OpenRouter.
    openai_base_url: str = Field(default="https://api.openai.com/v1", min_length=1)
    # Bearer token (LONGHAUL_OPENAI_API_KEY or OPENAI_API_KEY); a SecretStr, so it never prints. Unset = no header.
    openai_api_key: Optional[SecretStr] = Field(
        default=None, validation_alias=AliasChoices("LONGHAUL_OPENAI_API_KEY", "OPENAI_API_KEY"))
    # Seconds the endpoint may stay silent: connecting, or between two streamed chunks.
    openai_timeout_s: float = Field(default=120.0, gt=0)
    # Stream answers (SSE), so traces see content as it arrives; false = one JSON response.
    openai_stream: bool = True
    # Anthropic messages endpoint (the `anthropic` provider).
    anthropic_base_url: str = Field(default="https://api.anthropic.com", min_length=1)
    # x-api-key (LONGHAUL_ANTHROPIC_API_KEY or ANTHROPIC_API_KEY); never printed.
    anthropic_api_key: Optional[SecretStr] = Field(
        default=None, validation_alias=AliasChoices("LONGHAUL_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY"))
    # Seconds the Anthropic endpoint may take to answer.
    anthropic_timeout_s: float = Field(default=300.0, gt=0)
    # Anthropic requires a cap on each answer's output tokens.
    anthropic_max_tokens: int = Field(default=8192, ge=1)
    # USD per million tokens, {"model": [input, output]} as JSON; models not listed cost 0.
    model_prices_usd_per_mtok: dict[str, tuple[float, float]] = Field(default_factory=dict)

    # -- built-in tools (worker/tools/) --
    # Per-task workspaces of the file tools live at <workspace_root>/<task_id>.
    workspace_root: str = Field(default="state/workspaces", min_length=1)
    # Largest file write_file writes and read_file returns, in bytes.
    workspace_max_file_bytes: int = Field(default=1_000_000, ge=1)
    # Largest total size of one task's workspace, in bytes.
    workspace_max_bytes: int = Field(default=100_000_000, ge=1)
    # Seconds http_get may wait: connecting, or between two chunks of the response.
    http_get_timeout_s: float = Field(default=20.0, gt=0)
    # Largest response body http_get returns, in bytes (the rest is cut off, and said so).
    http_get_max_bytes: int = Field(default=1_000_000, ge=1)
    # Crash tests only: the named point (`fault_points.FAULT_POINTS`) where this process SIGKILLs itself.
    fault_at: Optional[str] = None
    # Let http_get reach loopback, private and link-local addresses (off: no SSRF into the host's network).
    http_get_allow_private: bool = False

    @field_validator("redis_url")
    @classmethod
    def _redis_url_has_a_scheme(cls, url: Optional[str]) -> Optional[str]:
        """Refuse a URL redis-py cannot use now, not with a traceback when the broker is built."""
        if url is None:
            return None
        try:
            parts = urlsplit(url)
            _ = parts.port  # a port that is not a number, or out of range, raises here
        except ValueError as exc:
            raise ValueError(f"not a valid URL ({exc})") from None
        if parts.scheme not in REDIS_URL_SCHEMES:
            raise ValueError("must be a URL such as redis://localhost:6379/0 (scheme redis, rediss or unix)")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("names no host (e.g. redis://localhost:6379/0)")
        return url

    @field_validator("fault_at")
    @classmethod
    def _fault_at_is_a_point(cls, point: Optional[str]) -> Optional[str]:
        if point is None or not point.strip():
            return None
        if point.strip() not in FAULT_POINTS:
            raise ValueError(f"must be one of {', '.join(FAULT_POINTS)} (a crash-test fault point)")
        return point.strip()

    @field_validator("log_level")
    @classmethod
    def _log_level_is_a_level(cls, level: Optional[str]) -> Optional[str]:
        if level is None or not level.strip():
            return None
        if level.strip().upper() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level.strip().upper()

    @property
    def app_modules(self) -> list[str]:
        """`app` as module names."""
        return parse_app_modules(self.app)

    @property
    def heartbeat_every_s(self) -> float:
        return self.heartbeat_interval_s or self.lease_s / 3


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; a bad value names its variable.

    The API keys read are registered with `models.redact`: from then on
    they are removed from every trace, error, log line and stored text.
    """
    try:
        settings = Settings(**overrides)
    except SourceParseError as exc:  # a JSON-valued variable (a dict or list setting) that is not JSON
        raise SettingsError("invalid configuration: " + _unparsable(str(exc))) from None
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            var = "LONGHAUL_" + field.upper() if not field.startswith("LONGHAUL_") else field
            msg = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"{var}: {msg} (got {err.get('input')!r})")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None
    register_secrets(secret.get_secret_value() for secret in (settings.openai_api_key, settings.anthropic_api_key,
                                                               settings.dashboard_token) if secret is not None)
    return settings


def _unparsable(problem: str) -> str:
    """pydantic-settings' "error parsing value for field ..." as ``VARIABLE: must be JSON (got ...)``."""
    found = re.search(r'field "([^"]+)"', problem)
    if found is None:
        return problem
    var = "LONGHAUL_" + found.group(1).upper()
    return f"{var}: must be JSON, e.g. {{\"gpt-4o\": [2.5, 10]}} (got {os.environ.get(var)!r})"
