"""The outermost scope of every call: request id, one access log line, latency metric.

The request id comes from the client's ``x-request-id`` metadata or is generated; it is
bound for the call's log lines and returned in the trailing metadata, so a client can
quote it. When the call ends, one ``rpc`` line records the method, the status code and
the duration, and ``gyoza_rpc_duration_seconds`` observes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import grpc.aio

from gyoza.server import metrics
from gyoza.server.handlers import Context, ScopedInterceptor
from gyoza.server.logs import (
    REQUEST_ID_METADATA_KEY,
    bind_request_id,
    choose_request_id,
    log_event,
)

log = logging.getLogger("gyoza.server.rpc")

_QUIET_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Probes and reflection are logged at DEBUG only; they would drown the rest."""

_durations: dict[tuple[str, str], Any] = {}
"""``gyoza_rpc_duration_seconds`` series by (method, code), looked up once each."""


def _observe(method: str, code: str, elapsed: float) -> None:
    series = _durations.get((method, code))
    if series is None:
        series = metrics.RPC_DURATION_SECONDS.labels(method=method, code=code)
        _durations[(method, code)] = series
    series.observe(elapsed)


def _given_request_id(details: grpc.HandlerCallDetails) -> str | None:
    for key, value in details.invocation_metadata or ():
        if key == REQUEST_ID_METADATA_KEY:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


@asynccontextmanager
async def _call_scope(details: grpc.HandlerCallDetails, context: Context) -> AsyncIterator[None]:
    request_id = choose_request_id(_given_request_id(details))
    # Each call runs in a task of its own, so the binding lasts exactly for this call.
    bind_request_id(request_id)
    context.set_trailing_metadata(((REQUEST_ID_METADATA_KEY, request_id),))
    # Read the peer now: touching the context after a cancelled call has ended can
    # crash grpc's core.
    peer = context.peer()
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        yield
    except grpc.aio.AbortError:
        code = context.code() or grpc.StatusCode.UNKNOWN
        raise
    except (asyncio.CancelledError, GeneratorExit):
        code = grpc.StatusCode.CANCELLED
        raise
    except BaseException:
        code = grpc.StatusCode.UNKNOWN
        raise
    finally:
        elapsed = time.perf_counter() - started
        method = details.method
        _observe(method, code.name, elapsed)
        quiet = method.startswith(_QUIET_PREFIXES) and code is grpc.StatusCode.OK
        log_event(
            log,
            logging.DEBUG if quiet else logging.INFO,
            "rpc",
            method=method,
            code=code.name,
            duration_ms=round(elapsed * 1000, 3),
            peer=peer,
        )


class CallInterceptor(ScopedInterceptor):
    """Gives every call its request id, its access log line and its latency sample.

    Must be the first (outermost) interceptor, so the others log with the request id.
    """

    def __init__(self) -> None:
        super().__init__(_call_scope)
