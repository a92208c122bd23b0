"""Opaque page tokens: a keyset cursor as base64url JSON, tied to its listing.

A token names the listing it came from and a fingerprint of that listing's filters, so
one used with other filters is refused instead of silently paging something else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from gyoza.server.store.records import RunFilter

MAX_TOKEN_LENGTH = 4096
"""Longer page tokens are refused unread (the server's own are far shorter)."""

MAX_POSITION_INT = 2**53
"""Integers in a cursor stay below this (every database column takes them)."""

MAX_KEY_LENGTH = 256
"""Strings in a cursor (run ids, names) are at most this long."""


def position_int(value: Any) -> int:
    """An integer cursor value, refused unless ``0 <= value < 2**53``.

    Raises
    ------
    ValueError
        For anything else: a driver would raise OverflowError for what no column holds.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_POSITION_INT:
        raise ValueError("invalid page token")
    return value


def position_str(value: Any) -> str:
    """A string cursor value: short and without NUL (which PostgreSQL refuses)."""
    if not isinstance(value, str) or len(value) > MAX_KEY_LENGTH or "\x00" in value:
        raise ValueError("invalid page token")
    return value


def encode_token(kind: str, fingerprint: str, position: list[Any]) -> str:
    """A token resuming listing *kind* (with filters *fingerprint*) after *position*."""
    raw = json.dumps({"k": kind, "f": fingerprint, "p": position}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_token(token: str, kind: str, fingerprint: str) -> list[Any] | None:
    """The position in *token*; ``None`` for the empty token (the first page).

    Raises
    ------
    ValueError
        When the token is malformed or belongs to another listing or other filters.
    """
    if not token:
        return None
    if len(token) > MAX_TOKEN_LENGTH:
        raise ValueError("invalid page token")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError) as exc:
        raise ValueError("invalid page token") from exc
    if not isinstance(data, dict) or not isinstance(data.get("p"), list):
        raise ValueError("invalid page token")
    if data.get("k") != kind or data.get("f") != fingerprint:
        raise ValueError("page token does not belong to this listing and its filters")
    position: list[Any] = data["p"]
    return position


def check_run_filter(f: RunFilter) -> None:
    """Refuse naive datetimes in a run filter (the store compares aware UTC times)."""
    for name in ("created_after", "created_before"):
        value = getattr(f, name)
        if value is not None and value.tzinfo is None:
            raise ValueError(f"RunFilter.{name} must be an aware datetime")


def run_filter_fingerprint(f: RunFilter) -> str:
    """A short digest of a run filter, kept in its page tokens."""
    described = json.dumps(
        [
            sorted(s.value for s in f.states),
            f.op_definition,
            f.image,
            None if f.created_after is None else f.created_after.isoformat(),
            None if f.created_before is None else f.created_before.isoformat(),
            f.oldest_first,
        ]
    )
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def runs_token(f: RunFilter, created_at: datetime, run_id: str) -> str:
    """The token of the runs page that continues after the run (*created_at*, *run_id*)."""
    return encode_token("runs", run_filter_fingerprint(f), [created_at.isoformat(), run_id])


def run_position(position: list[Any] | None) -> tuple[datetime, str] | None:
    """The (created_at, id) cursor of a runs page token."""
    if position is None:
        return None
    try:
        created_text, run_id = position
        created_at = datetime.fromisoformat(position_str(created_text))
        # In range once converted to UTC (year 1 at +05:00 is not, and drivers overflow).
        created_at = created_at.astimezone(UTC)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError("invalid page token") from exc
    if created_at.tzinfo is None:
        raise ValueError("invalid page token")
    return created_at, position_str(run_id)


def name_position(position: list[Any] | None) -> str | None:
    """The name cursor of a definitions page token."""
    if position is None:
        return None
    if len(position) != 1:
        raise ValueError("invalid page token")
    return position_str(position[0])


def version_position(position: list[Any] | None) -> int | None:
    """The version cursor of a definition-versions page token."""
    if position is None:
        return None
    if len(position) != 1:
        raise ValueError("invalid page token")
    return position_int(position[0])


def check_page_size(page_size: int) -> None:
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive integer (got {page_size!r})")
