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
#: It is also the shortest run of a configured secret that is removed from text.
MIN_SECRET_CHARS = 8
#: Length of the aligned pieces a secret is searched by (any run of `MIN_SECRET_CHARS` holds one whole).
_PIECE_CHARS = 4


class _Secret:
    """A configured secret, and its aligned pieces: the cheap substring searches that find any run of it."""

    __slots__ = ("value", "pieces")

    def __init__(self, value: str) -> None:
        self.value = value
        # A run of >= 2 * _PIECE_CHARS - 1 characters of the value holds a whole piece starting at
        # a multiple of _PIECE_CHARS, so searching for these pieces misses no run of MIN_SECRET_CHARS.
        self.pieces = [(start, value[start:start + _PIECE_CHARS])
                       for start in range(0, len(value) - _PIECE_CHARS + 1, _PIECE_CHARS)]

    def appears_in(self, text: str) -> bool:
        for _start, piece in self.pieces:
            if piece in text:
                return True
        return False

    def runs_in(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of every run of at least `MIN_SECRET_CHARS` characters of the value in `text`."""
        runs = []
        value = self.value
        for offset, piece in self.pieces:
            at = text.find(piece)
            while at != -1:
                left, secret_left = at, offset
                while left > 0 and secret_left > 0 and text[left - 1] == value[secret_left - 1]:
                    left, secret_left = left - 1, secret_left - 1
                right, secret_right = at + len(piece), offset + len(piece)
                while right < len(text) and secret_right < len(value) and text[right] == value[secret_right]:
                    right, secret_right = right + 1, secret_right + 1
                if right - left >= MIN_SECRET_CHARS:
                    runs.append((left, right))
                at = text.find(piece, at + 1)
        return runs


#: The configured secrets.
_configured: tuple[_Secret, ...] = ()
_configured_lock = threading.Lock()


def register_secrets(values: Iterable[Optional[str]]) -> None:
    """Remove these values (and their whitespace-stripped forms) from everything redacted from now on.

    Not only whole: any run of `MIN_SECRET_CHARS` or more of their
    characters is removed too (a gateway that quotes half a key, a cut
    through one). Process-wide and additive: `load_settings` registers the
    API keys it reads. Values under `MIN_SECRET_CHARS` characters are ignored.
    """
    global _configured
    fresh = {form for value in values if value for form in (value, value.strip()) if len(form) >= MIN_SECRET_CHARS}
    with _configured_lock:
        known = {secret.value for secret in _configured}
        _configured = _configured + tuple(_Secret(value) for value in sorted(fresh - known))


def scrub_configured(text: str) -> str:
    """`text` with every run of a configured secret replaced by ``[redacted]`` (cheap when none occurs)."""
    if not _configured:
        return text
    runs = [run for secret in _configured if secret.appears_in(text) for run in secret.runs_in(text)]
    if not runs:
        return text
    pieces, kept_from = [], 0
    for start, end in sorted(runs):
        if end <= kept_from:
            continue
        if start >= kept_from:
            pieces.append(text[kept_from:start])
            pieces.append(REDACTED)
        kept_from = end
    pieces.append(text[kept_from:])
    return "".join(pieces)


def might_hold_secret(text: str) -> bool:
    """False when `redact` would change nothing in `text`, or in any value whose JSON text is `text`."""
    for secret in _configured:
        if secret.appears_in(text):
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
