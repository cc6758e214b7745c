"""Scrub secrets (API keys, authorization headers, tokens) out of anything stored.

Trace payloads and error messages come from providers and tools, which see
request headers and URLs; none of that may reach the database.

Two kinds of secret are removed: anything shaped like one (``Bearer ...``,
``sk-...``, ``api_key=...``), and the exact values this process was
configured with (`register_secrets`: the providers' API keys), whatever
their shape, so a 32-hex key a gateway echoes back is caught too. Text is
redacted before it is cut to a length, never after: a cut through a key
would leave a piece no pattern recognises.
"""

from __future__ import annotations

import logging
import re
import threading
from functools import lru_cache
from typing import Any, Iterable, Optional

REDACTED = "[redacted]"

#: Mapping keys whose values are secrets, whatever they hold.
_SECRET_KEY = re.compile(r"(api[-_]?key|authorization|auth[-_]?token|access[-_]?token|secret|password|"
                         r"cookie|x-api-key|bearer|credential)", re.IGNORECASE)

#: Secret-looking substrings inside free text.
_SECRET_TEXT = [
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 " + REDACTED),
    (re.compile(r"\b(sk|pk|rk)-(?:proj-|ant-)?[A-Za-z0-9_-]{16,}"), REDACTED),  # OpenAI/Anthropic-style keys
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"), REDACTED),  # GitHub tokens
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), REDACTED),  # Slack tokens
    (re.compile(r"(?i)((?:api[-_]?key|token|secret|password|access_token)\s*[=:]\s*)[\"']?[^\s\"'&,;]{4,}"),
     r"\1" + REDACTED),
]


#: A cheap first look: text (case-folded) holding none of these has nothing `_SECRET_TEXT` or
#: `_SECRET_KEY` would match, and almost no text holds one. Plain substring tests: a
#: case-insensitive alternation regex costs ~0.2 us per character, more than the step it traces.
_SECRET_MARKERS = (
    "token", "secret", "password", "bearer", "basic", "sk-", "pk-", "rk-", "ghp_", "gho_", "ghu_", "ghs_", "ghr_",
    "xox", "apikey", "api_key", "api-key", "authoriz", "cookie", "credential",
)


#: Configured secret values shorter than this are not registered: they would blank ordinary words.
MIN_SECRET_CHARS = 8

#: The configured secret values, longest first (a key containing another is replaced whole).
_configured: tuple[str, ...] = ()
_configured_lock = threading.Lock()


def register_secrets(values: Iterable[Optional[str]]) -> None:
    """Remove these exact values (and their whitespace-stripped forms) from everything redacted from now on.

    Process-wide and additive: `load_settings` registers the API keys it
    reads. Values under `MIN_SECRET_CHARS` characters are ignored.
    """
    global _configured
    fresh = {form for value in values if value for form in (value, value.strip()) if len(form) >= MIN_SECRET_CHARS}
    with _configured_lock:
        _configured = tuple(sorted(set(_configured) | fresh, key=len, reverse=True))


def scrub_configured(text: str) -> str:
    """`text` with every configured secret value replaced by ``[redacted]`` (cheap when none occurs)."""
    for secret in _configured:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def might_hold_secret(text: str) -> bool:
    """False when `redact` would change nothing in `text`, or in any value whose JSON text is `text`."""
    for secret in _configured:
        if secret in text:
            return True
    folded = text.casefold()
    for marker in _SECRET_MARKERS:
        if marker in folded:
            return True
    return False


def redact_text(text: str) -> str:
    """`text` with the configured secrets and secret-looking substrings replaced by ``[redacted]``."""
    if not might_hold_secret(text):
        return text
    text = scrub_configured(text)
    for pattern, replacement in _SECRET_TEXT:
        text = pattern.sub(replacement, text)
    return text


@lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    return _SECRET_KEY.search(key) is not None


def redact(value: Any) -> Any:
    """A copy of `value` (JSON-like) with secrets replaced, by key and by pattern."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: (REDACTED if isinstance(key, str) and is_secret_key(key) and item not in (None, "")
                      else redact(item))
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(item) for item in value]
    return value


class RedactingFormatter(logging.Formatter):
    """Formats a log record with another formatter, then redacts the whole line (message and traceback)."""

    def __init__(self, inner: Optional[logging.Formatter]) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(self.inner.format(record))


def redact_log_handlers(logger: Optional[logging.Logger] = None) -> None:
    """Make every handler of `logger` (default: the root logger) write redacted lines; safe to repeat."""
    for handler in (logger or logging.getLogger()).handlers:
        if not isinstance(handler.formatter, RedactingFormatter):
            handler.setFormatter(RedactingFormatter(handler.formatter))
