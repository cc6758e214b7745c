"""Small helpers the HTTP providers share: error mapping, redaction, JSON, tool-call arguments.

Every provider error message is built here, so one place guarantees that
no API key or Authorization header reaches `last_error`, a trace or a log.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Optional
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
from pydantic import SecretStr, ValidationError

from longhaul.models import InvalidArguments, ToolCall
from longhaul.models.redact import register_secrets, scrub_configured

from ..errors import PermanentProviderError, ProviderError, TransientProviderError
from ..settings import Settings, load_settings

#: Statuses a later attempt can get past: rate limits, timeouts, overload, server errors.
TRANSIENT_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})
#: How much of a provider's error body an error message quotes, in characters.
MAX_QUOTED_CHARS = 500

_BEARER = re.compile(r"(?i)\b(bearer)\s+\S+")


class SettingsProvider:
    """Base of providers configured by `Settings`: the ones handed in, else the environment's on first use."""

    takes_settings = True

    def __init__(self, *, settings: Optional[Settings] = None) -> None:
        self._settings = settings
        self._client: Optional[httpx.Client] = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings()
        return self._settings


def secret_values(*secrets: Optional[SecretStr]) -> list[str]:
    """The plain values of the configured secrets (empty ones left out), registered with `models.redact`."""
    values = [value for secret in secrets if secret is not None and (value := secret.get_secret_value())]
    register_secrets(values)
    return values


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` without the given secret values, any run of 8 characters of a registered one, or ``Bearer <token>``."""
    for secret in secrets:
        text = text.replace(secret, "[redacted]")
    return _BEARER.sub(r"\1 [redacted]", scrub_configured(text))


def json_body(body: Any) -> tuple[bytes, dict[str, str]]:
    """`body` as a JSON request: the encoded bytes and their content type (pass as ``content=``, ``headers=``).

    orjson instead of httpx's ``json=`` (the standard library's encoder):
    the request carries the whole history every turn, and encoding it was
    about 2% of a worker's CPU with a thousand tasks in flight. What orjson
    cannot encode (an integer past 64 bits) goes through the standard
    library's, as ``json=`` did.
    """
    try:
        encoded = orjson.dumps(body)
    except orjson.JSONEncodeError:
        encoded = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    return encoded, {"Content-Type": "application/json"}


def display_url(url: str) -> str:
    """`url` without user info or query string: what error messages may show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def provider_message(body: bytes, secrets: Iterable[str] = ()) -> str:
    """The human part of an error body: ``{"error": {"message": ...}}`` and its variants, else the text.

    Redacted (`secrets` and ``Bearer`` tokens) before it is cut to
    `MAX_QUOTED_CHARS`: a cut through a key would leave a piece of it.
    """
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return redact(text, secrets)[:MAX_QUOTED_CHARS] or "(empty body)"
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or error.get("msg") or json.dumps(error)
        code = error.get("code") or error.get("type")
        text = f"{message} ({code})" if code and str(code) not in str(message) else str(message)
    elif isinstance(error, str):
        text = error
    return redact(text, secrets)[:MAX_QUOTED_CHARS]


def status_error(provider: str, response: httpx.Response, body: bytes, *, secrets: Iterable[str],
                 hints: dict[int, str]) -> ProviderError:
    """The error for a non-2xx answer: transient for 429/5xx and the like, else permanent.

    The message names the provider, the status, the URL (without user info)
    and the provider's own error message, redacted; never a request header.
    """
    status = response.status_code
    where = display_url(str(response.request.url))
    message = provider_message(body, secrets)
    text = f"{provider}: HTTP {status} {response.reason_phrase} from {where}: {message}"
    if status in TRANSIENT_STATUSES or status >= 500:
        retry_after = response.headers.get("retry-after")
        suffix = f" (retry-after {retry_after} s)" if retry_after else ""
        return TransientProviderError(f"{text}; retrying later{suffix}", status_code=status)
    if 300 <= status < 400:
        location = display_url(response.headers.get("location", "")) or "(no location)"
        hint = f"the endpoint redirects to {location}; set the base URL to where it points"
    else:
        hint = hints.get(status, "the request was rejected as sent; retrying would fail the same way")
    return PermanentProviderError(f"{text}; {hint}", status_code=status)


def transport_error(provider: str, url: str, exc: Exception, *, secrets: Iterable[str]) -> ProviderError:
    """A lost connection or a timeout: worth retrying from the latest checkpoint.

    A URL httpx cannot use at all (bad syntax, not http/https) is permanent.
    """
    detail = redact(f"{type(exc).__name__}: {exc}", secrets)
    if isinstance(exc, (httpx.InvalidURL, httpx.UnsupportedProtocol)):
        return PermanentProviderError(f"{provider}: the base URL {display_url(url)!r} is not usable ({detail}); "
                                      "check the provider's base URL setting")
    what = "timed out" if isinstance(exc, httpx.TimeoutException) else "could not be reached"
    return TransientProviderError(f"{provider}: {display_url(url)} {what} ({detail}); retrying later")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_arguments(raw: Any) -> tuple[dict[str, Any], Optional[str]]:
    """Tool-call arguments as a dict, or ``({}, problem)`` when they are not a JSON object.

    Accepts a dict, a JSON object string, an empty string (no arguments)
    and a JSON string holding a JSON object (some models encode twice).
    """
    value = raw
    for _ in range(2):
        if not isinstance(value, str):
            break
        if not value.strip():
            return {}, None
        try:
            value = json.loads(value, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            return {}, f"the arguments are not valid JSON ({exc})"
    if not isinstance(value, dict):
        return {}, f"the arguments must be a JSON object, got {type(value).__name__}"
    return value, None


def make_tool_call(call_id: str, name: Any, raw_arguments: Any) -> ToolCall:
    """A `ToolCall` that never raises: bad arguments go in its `invalid_arguments`, which the runner reports.

    The model then sees a failed tool result naming the problem (and can try
    again) instead of the task crashing on its malformed JSON.
    """
    name = name if isinstance(name, str) and name.strip() else "(no tool name)"
    arguments, problem = parse_arguments(raw_arguments)
    if problem is None:
        try:
            return ToolCall(id=call_id[:200], name=name[:200], arguments=arguments)
        except ValidationError as exc:
            problem = f"the arguments are not plain JSON values ({exc.errors()[0]['msg']})"
    raw_text = raw_arguments if isinstance(raw_arguments, str) else json.dumps(raw_arguments, default=str)
    return ToolCall(id=call_id[:200], name=name[:200],
                    invalid_arguments=InvalidArguments(problem=problem, raw=raw_text[:MAX_QUOTED_CHARS]))


def raw_arguments_of(call: ToolCall) -> str:
    """The arguments as the model sent them: the JSON text to replay in the history."""
    if call.invalid_arguments is not None:
        return call.invalid_arguments.raw
    return json.dumps(call.arguments, ensure_ascii=False)


def price_usd(prices: dict[str, tuple[float, float]], model: str, input_tokens: int, output_tokens: int) -> float:
    """What the tokens cost at `prices` (USD per million input/output tokens); 0 for an unlisted model."""
    price = prices.get(model)
    if price is None:
        return 0.0
    return (input_tokens * price[0] + output_tokens * price[1]) / 1_000_000


def int_field(data: Any, *path: str) -> int:
    """A non-negative int at `path` in nested dicts, 0 when absent or not a number."""
    for key in path:
        if not isinstance(data, dict):
            return 0
        data = data.get(key)
    return data if isinstance(data, int) and data >= 0 else 0
