"""Scrub secrets (API keys, authorization headers, tokens) out of anything stored.

Trace payloads and error messages come from providers and tools, which see
request headers and URLs; none of that may reach the database.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

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


def might_hold_secret(text: str) -> bool:
    """False when `redact` would change nothing in `text`, or in any value whose JSON text is `text`."""
    folded = text.casefold()
    for marker in _SECRET_MARKERS:
        if marker in folded:
            return True
    return False


def redact_text(text: str) -> str:
    """`text` with secret-looking substrings replaced by ``[redacted]``."""
    if not might_hold_secret(text):
        return text
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
