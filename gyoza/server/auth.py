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

An agent's identity is checked against the name in its Hello
(:func:`authorize_agent_name`):

- an agent token written ``PATTERN:TOKEN`` may only be used by agents whose name matches
  ``PATTERN`` (an exact name, or a shell-style pattern such as ``gpu-*``); a bare
  ``TOKEN`` is not bound to a name;
- with mutual TLS, the name must be the client certificate's common name or one of its
  subject alternative names;
- a Hello under the name of a connected agent replaces that session only when it comes
  with the same identity (the same token and the same certificate names).

A refusal is ``PERMISSION_DENIED`` and leaves the connected session as it was.
"""

from __future__ import annotations

import contextvars
import enum
import fnmatch
import hashlib
import hmac
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class AgentGrant:
    """What the agent token of a Connect call allows.

    Attributes
    ----------
    token_id : str
        A digest of the token (never the token), naming it in logs and identities.
    pattern : str | None
        The agent names the token may use (shell-style); ``None``: any name.
    """

    token_id: str
    pattern: str | None


_agent_grant: contextvars.ContextVar[AgentGrant | None] = contextvars.ContextVar(
    "gyoza_agent_grant", default=None
)


def current_principal() -> Principal:
    """The kind of caller of the RPC the calling task serves."""
    return _principal.get()


def parse_agent_token(entry: str) -> tuple[str | None, str]:
    """``PATTERN:TOKEN`` as ``(pattern, token)``; a bare ``TOKEN`` as ``(None, token)``.

    The pattern ends at the first ``:``, so a token that itself holds a ``:`` must be
    written with a pattern (``*:to:ken``).
    """
    pattern, sep, token = entry.partition(":")
    if not sep:
        return None, entry
    return pattern or None, token


def _token_id(token: str) -> str:
    return "tok_" + hashlib.sha256(token.encode()).hexdigest()[:12]


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
        grants: dict[str, str | None] = {}
        for entry in agent_tokens:
            pattern, token = parse_agent_token(entry)
            if token:
                grants[token] = pattern
        self._agent_tokens = _SecretSet(grants)
        self._grants = grants

    @property
    def unbound_agent_tokens(self) -> int:
        """How many agent tokens may be used under any agent name."""
        return sum(1 for pattern in self._grants.values() if pattern is None)

    def agent_grant(self, authorization: str | None) -> AgentGrant | None:
        """The grant of the agent token in *authorization*; ``None`` for none known."""
        secret = _bearer(authorization)
        if secret is None or secret not in self._agent_tokens:
            return None
        return AgentGrant(_token_id(secret), self._grants.get(secret))

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
            authorization = _metadata_value(details, AUTHORIZATION_METADATA_KEY)
            principal = policy.authorize(details.method, authorization)
            _principal.set(principal)
            if details.method == CONNECT_METHOD:
                _agent_grant.set(policy.agent_grant(authorization))
            yield

        super().__init__(scope)


def certificate_names(context: Context) -> tuple[str, ...]:
    """The client certificate's common name and subject alternative names (none
    without a client certificate)."""
    auth = context.auth_context() or {}
    names: list[str] = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(key, ()):
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            if text not in names:
                names.append(text)
    return tuple(names)


def authorize_agent_name(name: str, context: Any) -> str:
    """Check that the caller may connect as agent *name*; its identity.

    The identity names the token and the certificate the call proved (``""`` for an
    open server): a connected agent's session is replaced only by a Hello with the
    same identity.

    Raises
    ------
    ApiError
        PERMISSION_DENIED: ``AGENT_NAME_NOT_ALLOWED`` when the token is bound to other
        names, ``AGENT_CERTIFICATE_MISMATCH`` when the client certificate names
        another agent.
    """
    grant = _agent_grant.get()
    pattern = None if grant is None else grant.pattern
    if grant is not None and pattern is not None and not fnmatch.fnmatchcase(name, pattern):
        raise ApiError(
            grpc.StatusCode.PERMISSION_DENIED,
            "AGENT_NAME_NOT_ALLOWED",
            "this agent token may not be used under that agent name",
            {"token": grant.token_id},
        )
    certified = certificate_names(context)
    if certified and name not in certified:
        raise ApiError(
            grpc.StatusCode.PERMISSION_DENIED,
            "AGENT_CERTIFICATE_MISMATCH",
            "the agent name is not the client certificate's common name or one of its "
            "subject alternative names",
        )
    parts = []
    if grant is not None:
        parts.append(grant.token_id)
    if certified:
        parts.append("cert:" + ",".join(sorted(certified)))
    return "|".join(parts)
