"""Size limits on the JSON documents the server accepts (inputs, outputs, payloads).

gRPC already refuses a message over the server's message size limit. Inside a message,
one JSON document (a run's inputs, the outputs of an attempt, an event payload) is also
bounded, so that one run cannot bloat the store and every watcher that reads it.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from gyoza.server.errors import ApiError

PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
"""ErrorInfo reason of a refused document."""


def json_size(value: Any) -> int:
    """Bytes of *value* as compact UTF-8 JSON."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode())


def check_json_size(field: str, value: Any, limit: int) -> None:
    """Refuse *value* when its JSON is longer than *limit* bytes.

    Raises
    ------
    ApiError
        RESOURCE_EXHAUSTED, reason ``PAYLOAD_TOO_LARGE``, naming the field, its size
        and the limit.
    """
    size = json_size(value)
    if size > limit:
        raise ApiError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            PAYLOAD_TOO_LARGE,
            f"{field} is {size} bytes as JSON; the limit is {limit} bytes",
            {"field": field, "size_bytes": str(size), "limit_bytes": str(limit)},
        )
