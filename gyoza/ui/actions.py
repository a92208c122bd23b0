"""How the dashboard's actions answer: JSON saying what happened, or the API's error.

An action succeeds with ``{"ok": true, "message", "url"?}``. It fails with ``{"ok":
false, "error", "code", "reason", "violations"}``: the gRPC status code name, the
``ErrorInfo`` reason and the ``BadRequest`` field violations exactly as the server
gave them (a violation's field ``inputs.steps`` is keyed ``inputs.steps``).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from starlette.requests import Request
from starlette.responses import JSONResponse

from gyoza.client import Agent, Client, GyozaClientError
from gyoza.ui.gateway import Gateway

__all__ = ["FormError", "done", "guarded", "undrain", "undrain_available"]

_HEADER = "x-gyoza-ui"
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

Action = Callable[[Request, Mapping[str, str]], Awaitable[JSONResponse]]


class FormError(ValueError):
    """A form field the dashboard itself cannot read (before asking the server)."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


def done(message: str, url: str | None = None) -> JSONResponse:
    """A successful action's answer; *url* is where the page should go next."""
    body: dict[str, Any] = {"ok": True, "message": message}
    if url:
        body["url"] = url
    return JSONResponse(body)


def failed(error: GyozaClientError) -> JSONResponse:
    """A refused action's answer: the API's error as it came."""
    return JSONResponse(
        {
            "ok": False,
            "error": str(error),
            "code": error.code.name,
            "reason": error.reason,
            "violations": {v.field: v.description for v in error.violations},
        },
        status_code=_HTTP_STATUS.get(error.code, 502),
    )


async def guarded(request: Request, action: Action) -> JSONResponse:
    """Run *action* with the request's form, answering JSON whatever happens.

    A request without the ``X-Gyoza-UI`` header is refused with 403: plain cross-site
    forms cannot set it.
    """
    if request.headers.get(_HEADER) != "1":
        return JSONResponse(
            {"ok": False, "error": "actions need the X-Gyoza-UI: 1 header", "code": "FORBIDDEN"},
            status_code=403,
        )
    # The pages send URL-encoded bodies; parsed here, so no multipart parser is needed.
    body = (await request.body()).decode("utf-8", errors="replace")
    form = dict(urllib.parse.parse_qsl(body, keep_blank_values=True))
    try:
        return await action(request, form)
    except FormError as error:
        return JSONResponse(
            {
                "ok": False,
                "error": str(error),
                "code": "INVALID_ARGUMENT",
                "reason": None,
                "violations": {error.field: error.description},
            },
            status_code=400,
        )
    except GyozaClientError as error:
        return failed(error)


# ----------------------------------------------------------------------------------------
# Undrain: where the API's UndrainAgent plugs in
# ----------------------------------------------------------------------------------------


def undrain_available(client: Client) -> bool:
    """Whether this client can undrain an agent (``Client.undrain_agent`` exists).

    The pages offer the Undrain button only then; nothing else needs to change when the
    client gains the call.
    """
    return callable(getattr(client, "undrain_agent", None))


async def undrain(gateway: Gateway, name: str) -> Agent:
    """Undrain an agent through ``Client.undrain_agent``.

    Raises
    ------
    GyozaClientError
        ``UNIMPLEMENTED`` while the client has no such call; the API's error otherwise.
    """
    method = getattr(gateway.client, "undrain_agent", None)
    if not callable(method):
        raise GyozaClientError(
            grpc.StatusCode.UNIMPLEMENTED, "this gyoza version cannot undrain an agent"
        )
    agent: Agent = await gateway.call(method, name)
    return agent
