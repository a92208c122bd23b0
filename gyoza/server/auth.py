"""Who may call what: client API keys and agent tokens, as bearer credentials.

Two kinds of credentials, never interchangeable:

- a client **API key** calls DefinitionService, OpRunService and the fleet views of
  AgentService (ListAgents, DrainAgent, UndrainAgent);
- an **agent token** opens ``AgentService.Connect`` and nothing else.

Both travel as ``authorization: Bearer <secret>`` metadata. A missing or unknown secret
is ``UNAUTHENTICATED``; a valid secret of the wrong kind is ``PERMISSION_DENIED``. Each
kind is enforced only when at least one secret of that kind is configured; with none
configured at all the server is open, and says so in its log at start. The health and
reflection services are always open, so probes and ``grpcurl`` work without a key.
"""

from __future__ import annotations

import contextvars
import enum
import hmac
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import grpc

from gyoza.server.errors import ApiError
from gyoza.server.handlers import Context, ScopedInterceptor

AUTHORIZATION_METADATA_KEY = "authorization"

CONNECT_METHOD = "/gyoza.api.v1.AgentService/Connect"
"""The only method an agent token opens."""

OPEN_SERVICE_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
"""Services anyone may call, with or without credentials."""


class Principal(enum.Enum):
    """The kind of caller an RPC runs for."""

    ANONYMOUS = "anonymous"
    CLIENT = "client"
    AGENT = "agent"


_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "gyoza_principal", default=Principal.ANONYMOUS
)


def current_principal() -> Principal:
    """The kind of caller of the RPC the calling task serves."""
    return _principal.get()


class _SecretSet:
    """Secrets of one kind, compared in constant time."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = tuple(s.encode() for s in secrets if s)

    @property
    def enforced(self) -> bool:
        return bool(self._secrets)

    def __contains__(self, secret: object) -> bool:
        if not isinstance(secret, str):
            return False
        given = secret.encode()
        # Compare with every secret, so the time taken says nothing about which matched.
        matched = False
        for known in self._secrets:
            matched |= hmac.compare_digest(given, known)
        return matched


class AuthPolicy:
    """Decides whether a call with given metadata may run a given method.

    Parameters
    ----------
    api_keys : Iterable[str]
        Client API keys; none means client methods are open.
    agent_tokens : Iterable[str]
        Agent tokens; none means ``AgentService.Connect`` is open.
    """

    def __init__(self, api_keys: Iterable[str] = (), agent_tokens: Iterable[str] = ()) -> None:
        self._api_keys = _SecretSet(api_keys)
        self._agent_tokens = _SecretSet(agent_tokens)

    @property
    def clients_open(self) -> bool:
        """True when no API key is configured: anyone may call the client methods."""
        return not self._api_keys.enforced

    @property
    def agents_open(self) -> bool:
        """True when no agent token is configured: anyone may connect as an agent."""
        return not self._agent_tokens.enforced

    def authorize(self, method: str, authorization: str | None) -> Principal:
        """The principal that may call *method*, or an error.

        Parameters
        ----------
        method : str
            Full method name, ``/package.Service/Method``.
        authorization : str | None
            The ``authorization`` metadata value, if any.

        Raises
        ------
        ApiError
            UNAUTHENTICATED (no credential, or not a known one) or PERMISSION_DENIED (a
            known credential of the other kind).
        """
        if method.startswith(OPEN_SERVICE_PREFIXES):
            return Principal.ANONYMOUS
        secret = _bearer(authorization)
        wants_agent = method == CONNECT_METHOD
        is_client = secret in self._api_keys
        is_agent = secret in self._agent_tokens
        if wants_agent:
            if is_agent:
                return Principal.AGENT
            if self.agents_open:
                return Principal.ANONYMOUS
            if is_client:
                raise ApiError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "AGENT_TOKEN_REQUIRED",
                    "a client API key cannot open an agent session; use an agent token",
                )
        else:
            if is_client:
                return Principal.CLIENT
            if self.clients_open:
                return Principal.ANONYMOUS
            if is_agent:
                raise ApiError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "API_KEY_REQUIRED",
                    f"an agent token cannot call {method}; use a client API key",
                )
        if secret is None:
            raise ApiError(
                grpc.StatusCode.UNAUTHENTICATED,
                "CREDENTIALS_MISSING",
                "missing credentials: send 'authorization: Bearer <key>' metadata",
            )
        raise ApiError(
            grpc.StatusCode.UNAUTHENTICATED, "CREDENTIALS_INVALID", "invalid credentials"
        )


def _bearer(authorization: str | None) -> str | None:
    """The secret of a ``Bearer <secret>`` header value, or ``None``."""
    if not authorization:
        return None
    scheme, _, secret = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        return None
    return secret.strip()


def _metadata_value(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for item_key, value in details.invocation_metadata or ():
        if item_key == key:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


class AuthInterceptor(ScopedInterceptor):
    """Refuses calls whose credentials :class:`AuthPolicy` does not accept.

    It must run inside :class:`~gyoza.server.errors.ErrorInterceptor`, which turns its
    refusal into the status.
    """

    def __init__(self, policy: AuthPolicy) -> None:
        self.policy = policy

        @asynccontextmanager
        async def scope(details: grpc.HandlerCallDetails, context: Context) -> AsyncIterator[None]:
            principal = policy.authorize(
                details.method, _metadata_value(details, AUTHORIZATION_METADATA_KEY)
            )
            _principal.set(principal)
            yield

        super().__init__(scope)
