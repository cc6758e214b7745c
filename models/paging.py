"""Keyset paging of task listings: opaque cursors that name a position in an order, never an offset.

A page ``ORDER BY <time> DESC, id DESC`` continues after the last row shown
with ``WHERE (<time>, id) < (t, id)``: the database seeks the listing index
(`task(updated_at, id)`, `task(created_at, id)`, schema 5) to that row and
reads `limit` entries, so page 1,000 costs what page 1 costs, and rows
added or deleted meanwhile never shift a page (an offset skips or repeats
them). Ties in the time are broken by the row id, which is unique, so no
row is skipped or shown twice.

A cursor is ``<payload>.<check>``: the URL-safe base64 of the order and the
row's exact key, and a keyed hash of it. The hash is no secret (anyone can
read the payload); it only makes an edited, truncated or foreign cursor a
clear `InvalidCursor` instead of a wrong page.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Optional

import orjson

from .errors import InvalidCursor
from .schemas import TaskSummary

#: The orders a listing can page through: the cursor remembers which.
ORDERS = ("updated", "created")
_CHECK_KEY = b"longhaul task listing cursor v1"
_CHECK_BYTES = 8


@dataclass(frozen=True)
class Position:
    """Where a page ends: the order, the last row's time column (epoch s, exact) and its row id."""

    order_by: str
    time_s: float
    row_id: int


@dataclass(frozen=True)
class TaskPage:
    """One page of a task listing: the tasks, and each one's cursor (``after=`` it continues past it)."""

    tasks: list[TaskSummary]
    cursors: list[str]

    def next_cursor(self, limit: int) -> Optional[str]:
        """The cursor of the next page, or None when this page (of at most `limit`) is the last one."""
        return self.cursors[-1] if self.cursors and len(self.tasks) >= limit else None


def encode_cursor(position: Position) -> str:
    """The opaque cursor for `position` (ASCII, URL- and shell-safe)."""
    payload = orjson.dumps([position.order_by, position.time_s, position.row_id])
    return f"{_b64(payload)}.{_b64(_check(payload))}"


def decode_cursor(cursor: str, *, order_by: str) -> Position:
    """The position a cursor names; `InvalidCursor` if it was altered, is not a cursor, or is for another order."""
    text = cursor.strip()
    try:
        payload_text, check_text = text.split(".")
        payload = _unb64(payload_text)
        if _unb64(check_text) != _check(payload):
            raise ValueError("check")
        order, time_s, row_id = orjson.loads(payload)
        if order not in ORDERS or not isinstance(time_s, (int, float)) or isinstance(row_id, bool) \
                or not isinstance(row_id, int):
            raise ValueError("fields")
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise InvalidCursor(cursor, "not a cursor a task listing gave out (edited, cut short or made up)") from None
    if order != order_by:
        raise InvalidCursor(cursor, f"it pages the {order!r} order, not {order_by!r}: give the same --order-by")
    return Position(order_by=order, time_s=float(time_s), row_id=row_id)


def _check(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, key=_CHECK_KEY, digest_size=_CHECK_BYTES).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text or not text.isascii():
        raise ValueError("empty or not ASCII")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


__all__ = ["ORDERS", "Position", "TaskPage", "decode_cursor", "encode_cursor"]
