"""The Python client of a gyoza server: typed calls returning domain objects.

See :class:`Client`; errors are in :mod:`gyoza.client.errors`.
"""

from __future__ import annotations

from gyoza.client.agents import Agent, AgentGpu, AgentRun, AgentState
from gyoza.client.calls import ApiCalls
from gyoza.client.client import DEFAULT_SERVER, Client, Page, RunFilter, open_channel
from gyoza.client.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    GyozaClientError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from gyoza.client.streams import AttemptEvent, LogLine, RunChange, TopicEvent

__all__ = [
    "DEFAULT_SERVER",
    "Agent",
    "AgentGpu",
    "AgentRun",
    "AgentState",
    "AlreadyExistsError",
    "ApiCalls",
    "AttemptEvent",
    "Client",
    "FailedPreconditionError",
    "GyozaClientError",
    "InvalidArgumentError",
    "LogLine",
    "NotFoundError",
    "Page",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RunChange",
    "RunFilter",
    "TopicEvent",
    "UnauthenticatedError",
    "UnavailableError",
    "open_channel",
]
