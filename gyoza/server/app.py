"""``gyoza server``: wiring of the control plane, and its life from start to SIGTERM.

The wiring, in order::

    Store.open(url)            applies migrations
    build_core(store)          hub, scheduler, sessions, controller (gyoza.server.bootstrap);
                               controller.start() rebuilds the queue
    servicers                  DefinitionService, OpRunService, AgentService (+ health,
                               reflection v1 and v1alpha), behind the interceptors: call
                               context (request id, access log, latency), errors, auth

On SIGTERM (or SIGINT) the server reports NOT_SERVING, stops taking calls, ends the
watch and subscription streams, lets in-flight calls finish within the shutdown grace,
then stops the controller and closes the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gyoza.api.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    definition_service_pb2,
    definition_service_pb2_grpc,
    op_run_service_pb2,
    op_run_service_pb2_grpc,
)
from gyoza.metrics_endpoint import MetricsEndpoint
from gyoza.server import metrics
from gyoza.server.agent_leases import AgentLeaseRecorder
from gyoza.server.auth import AuthInterceptor, AuthPolicy
from gyoza.server.bootstrap import build_core
from gyoza.server.calls import CallInterceptor
from gyoza.server.config import ConfigError, ServerConfig, split_listen
from gyoza.server.control import RunController
from gyoza.server.errors import ApiError, DecodeInterceptor, ErrorInterceptor
from gyoza.server.hub import Hub
from gyoza.server.logs import configure_logging, log_event
from gyoza.server.reflection import enable_reflection
from gyoza.server.retention import Retention
from gyoza.server.run_gauge import RunStateGauge
from gyoza.server.run_log import RunLifecycleLog
from gyoza.server.services.agent_service import AgentServiceServicer
from gyoza.server.services.definition_service import DefinitionServiceServicer
from gyoza.server.services.op_run_service import OpRunServiceServicer
from gyoza.server.sessions import SessionRegistry
from gyoza.server.store.leadership import Leadership
from gyoza.server.store.protocol import RunStore
from gyoza.server.store.store import Store
from gyoza.server.workers import die_with_supervisor, run_supervisor

log = logging.getLogger("gyoza.server")

SERVICE_NAMES = (
    definition_service_pb2.DESCRIPTOR.services_by_name["DefinitionService"].full_name,
    op_run_service_pb2.DESCRIPTOR.services_by_name["OpRunService"].full_name,
    agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
)
"""The gyoza services, as health and reflection name them."""


def grpc_options(config: ServerConfig) -> list[tuple[str, Any]]:
    """Channel options of the server: message size limits, no port sharing.

    grpc sets ``SO_REUSEPORT`` by default on Linux; it is turned off unless
    ``GYOZA_REUSE_PORT=1``, which the ``--workers`` supervisor gives its replicas so that
    they share one port (:mod:`gyoza.server.workers`).
    """
    reuse_port = os.environ.get("GYOZA_REUSE_PORT", "").strip() == "1"
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Two servers must not silently share one port.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        # Agents keep one stream open for hours: let them ping to keep it alive.
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured files (mTLS with a client CA); None: plaintext."""
    if config.tls is None:
        return None
    key = config.tls.key.read_bytes()
    cert = config.tls.cert.read_bytes()
    client_ca = config.tls.client_ca.read_bytes() if config.tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class Built:
    """A gRPC server with every service added, not started yet.

    Attributes
    ----------
    server : grpc.aio.Server
        The server, its port bound.
    port : int
        The port bound (the one asked for, or the one picked for port 0).
    health : health.aio.HealthServicer
        The health service, to set SERVING and NOT_SERVING.
    """

    def __init__(self, server: grpc.aio.Server, port: int, health_servicer: Any) -> None:
        self.server = server
        self.port = port
        self.health = health_servicer
        self.peer_port: int | None = None


def build_server(
    config: ServerConfig,
    *,
    store: RunStore,
    controller: RunController,
    hub: Hub,
    sessions: SessionRegistry,
    leases: AgentLeaseRecorder | None = None,
) -> Built:
    """A gRPC server serving gyoza, health and reflection, bound to ``config.listen``.

    Raises
    ------
    RuntimeError
        When the address cannot be bound.
    """
    server = grpc.aio.server(
        interceptors=[
            CallInterceptor(),
            ErrorInterceptor(),
            AuthInterceptor(AuthPolicy(config.api_keys, config.agent_tokens)),
            DecodeInterceptor(),
        ],
        options=grpc_options(config),
    )
    definition_service_pb2_grpc.add_DefinitionServiceServicer_to_server(
        DefinitionServiceServicer(store), server
    )
    op_run_service_pb2_grpc.add_OpRunServiceServicer_to_server(
        OpRunServiceServicer(controller, store, hub, max_json_bytes=config.max_json_bytes),
        server,
    )
    agent_service_pb2_grpc.add_AgentServiceServicer_to_server(
        AgentServiceServicer(
            controller,
            sessions,
            settings=config.control,
            max_json_bytes=config.max_json_bytes,
            leases=leases,
            replica_id=config.replica_id,
        ),
        server,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((*SERVICE_NAMES, health.SERVICE_NAME), server)
    credentials = server_credentials(config)
    try:
        if credentials is None:
            port = server.add_insecure_port(config.listen)
        else:
            port = server.add_secure_port(config.listen, credentials)
    except RuntimeError as error:
        raise RuntimeError(f"cannot listen on {config.listen}: {error}") from error
    if port == 0:
        raise RuntimeError(f"cannot listen on {config.listen}")
    built = Built(server, port, health_servicer)
    built.peer_port = add_peer_port(server, config, credentials)
    return built


def add_peer_port(
    server: grpc.aio.Server, config: ServerConfig, credentials: grpc.ServerCredentials | None
) -> int | None:
    """Also serve on ``config.peer_listen`` (the address other replicas forward to), if
    set; its bound port, or None."""
    if config.peer_listen is None:
        return None
    try:
        if credentials is None:
            port = server.add_insecure_port(config.peer_listen)
        else:
            port = server.add_secure_port(config.peer_listen, credentials)
    except RuntimeError as error:
        raise RuntimeError(f"cannot listen on {config.peer_listen}: {error}") from error
    if port == 0:
        raise RuntimeError(f"cannot listen on {config.peer_listen}")
    return port


class ControlPlane:
    """The running server: store, hub, controller, sessions and the gRPC server.

    Use as an async context manager, or call :meth:`start` and :meth:`stop`.

    Parameters
    ----------
    config : ServerConfig
        Settings.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        leadership: Leadership | None = None,
        metrics_endpoint: MetricsEndpoint | None = None,
        replica_id: str = "",
    ) -> None:
        self.config = config
        self.port = 0
        self.peer_port: int | None = None
        # Set when this plane runs as the leader of replicas: every write is fenced by
        # its term, and agents that held runs get lease plus grace from the takeover.
        self._leadership = leadership
        # An endpoint given by the caller is the caller's to close.
        self._shared_metrics = metrics_endpoint
        self.replica_id = replica_id
        self._store: Store | None = None
        self._controller: RunController | None = None
        self._hub: Hub | None = None
        self._sessions: SessionRegistry | None = None
        self._leases: AgentLeaseRecorder | None = None
        self._built: Built | None = None
        self._metrics: MetricsEndpoint | None = None
        self._retention: Retention | None = None

    @property
    def address(self) -> str:
        """``host:port`` the server listens on."""
        host = split_listen(self.config.listen)[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def start(self) -> None:
        """Open the store, rebuild the controller's view, start serving."""
        config = self.config
        # Opening applies the migrations: blocking work, off the event loop.
        self._store = store = await asyncio.to_thread(Store.open, config.database_url)
        if self._leadership is not None:
            store.set_fence(self._leadership.check)
        try:
            core = build_core(
                store, settings=config.control, max_outputs_bytes=config.max_json_bytes
            )
            self._hub = hub = core.hub
            gauge = RunStateGauge(hub)
            RunLifecycleLog(hub)
            self._controller = controller = core.controller
            self._sessions = sessions = core.sessions
            scheduler = core.scheduler
            self._leases = leases = AgentLeaseRecorder(store, config.control.lease_timeout_s / 3)
            await sessions.load_drains()
            await controller.start()
            await gauge.seed(store)
            if config.retention is not None:
                self._retention = Retention(
                    store, controller, config.retention, interval_s=config.retention_interval_s
                )
                self._retention.start()
            # Read when scraped, from the objects that own the numbers.
            metrics.QUEUE_DEPTH.set_function(lambda: scheduler.queue_depth)
            metrics.RUNS_UNSCHEDULABLE.set_function(lambda: scheduler.unschedulable_count)
            metrics.AGENTS_HELD.set_function(lambda: 0 if scheduler.held_agent is None else 1)
            metrics.CONNECTED_AGENTS.set_function(lambda: len(sessions.sessions))
            metrics.watch_agents(lambda: scheduler.agents.values())
            self._built = built = build_server(
                config,
                store=store,
                controller=controller,
                hub=hub,
                sessions=sessions,
                leases=leases,
            )
            self.port = built.port
            self.peer_port = built.peer_port
            await built.server.start()
            for name in ("", *SERVICE_NAMES):
                await built.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            await controller.open_reconnect_windows(takeover=self._leadership is not None)
            if config.metrics_port is not None and self._shared_metrics is None:
                self._metrics = MetricsEndpoint(config.listen_host, config.metrics_port)
        except BaseException:
            await self._close_core()
            raise
        self._announce()

    def _announce(self) -> None:
        config = self.config
        log_event(
            log,
            logging.INFO,
            "server listening",
            address=self.address,
            port=self.port,
            database=_redacted(config.database_url),
            tls="mtls" if config.tls and config.tls.client_ca else "tls" if config.tls else "off",
            metrics_port=next(
                (m.port for m in (self._metrics, self._shared_metrics) if m is not None), None
            ),
            role="leader" if self._leadership else None,
            replica=self.replica_id or None,
        )
        policy = AuthPolicy(config.api_keys, config.agent_tokens)
        if policy.clients_open and policy.agents_open:
            log_event(
                log,
                logging.WARNING,
                "no API keys or agent tokens configured: the server is open to anyone who "
                "can reach it",
            )
        elif policy.clients_open:
            log_event(log, logging.WARNING, "no API keys configured: client methods are open")
        if policy.unbound_agent_tokens:
            log_event(
                log,
                logging.WARNING,
                "agent tokens not bound to agent names: whoever holds one may connect under "
                "any agent's name (write them PATTERN:TOKEN)",
                tokens=policy.unbound_agent_tokens,
            )
        elif policy.agents_open:
            log_event(
                log, logging.WARNING, "no agent tokens configured: anyone may connect as an agent"
            )

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, let in-flight ones finish within the grace (by default the
        configured one), close the store."""
        grace = self.config.shutdown_grace_s if grace is None else grace
        log_event(log, logging.INFO, "server stopping", grace_s=grace)
        if self._built is not None:
            built, self._built = self._built, None
            await built.health.enter_graceful_shutdown()
            stopping = asyncio.ensure_future(built.server.stop(grace))
            # New calls are refused from here on. End the streams that never finish by
            # themselves (watches, subscriptions, agent sessions), which would otherwise
            # hold the whole grace period; agents reconnect, to this server's successor.
            await asyncio.sleep(0)
            if self._hub is not None:
                self._hub.close()
            if self._sessions is not None:
                for session in list(self._sessions.sessions.values()):
                    session.end_with(
                        ApiError(
                            grpc.StatusCode.UNAVAILABLE,
                            "SERVER_SHUTTING_DOWN",
                            "the server is shutting down; reconnect",
                        )
                    )
            await stopping
        await self._close_core()
        log_event(log, logging.INFO, "server stopped")

    async def _close_core(self) -> None:
        if self._retention is not None:
            retention, self._retention = self._retention, None
            await retention.stop()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._controller is not None:
            controller, self._controller = self._controller, None
            await controller.stop()
        if self._leases is not None:
            leases, self._leases = self._leases, None
            await leases.close()
        if self._store is not None:
            store, self._store = self._store, None
            await store.close()

    async def __aenter__(self) -> ControlPlane:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _redacted(url: str) -> str:
    """*url* with its password hidden, for the log."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # a URL SQLAlchemy cannot parse is shown as given, minus nothing
        return url.split("@")[-1]


async def serve(config: ServerConfig, stop: asyncio.Event | None = None) -> None:
    """Run the server until *stop* is set, or until SIGTERM or SIGINT.

    Parameters
    ----------
    config : ServerConfig
        Settings.
    stop : asyncio.Event | None
        Set it to shut the server down; by default the signals do.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals
            pass
    try:
        if config.database_url.startswith("postgresql"):
            # Several replicas may share the database: lead or follow (replica.py).
            from gyoza.server.replica import serve_replica

            await serve_replica(config, stop)
        else:
            async with ControlPlane(config):
                await stop.wait()
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run *main* on uvloop (about a quarter less CPU per run lifecycle than asyncio's
    own loop in ``make bench``), or on asyncio's loop when ``GYOZA_EVENT_LOOP=asyncio``.
    """
    if os.environ.get("GYOZA_EVENT_LOOP", "uvloop") == "asyncio":
        asyncio.run(main)
        return
    import uvloop

    uvloop.run(main)


def main_server(
    *,
    listen: str | None = None,
    database: str | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    tls_client_ca: str | Path | None = None,
    api_keys: Iterable[str] | None = None,
    agent_tokens: Iterable[str] | None = None,
    metrics_port: int | None = None,
    log_level: str | None = None,
    log_format: str | None = None,
    shutdown_grace: float | None = None,
    api_keys_file: str | Path | None = None,
    agent_tokens_file: str | Path | None = None,
    retention: str | None = None,
    starvation_s: float | None = None,
    replica_id: str | None = None,
    peer_listen: str | None = None,
    leader_lease_s: float | None = None,
    workers: int | None = None,
) -> None:
    """Run ``gyoza server`` with the given flag values until SIGTERM; exit on failure.

    Each argument is a flag's value, ``None`` where the flag was not given (then its
    environment variable, then its default applies; see :mod:`gyoza.server.config`).
    """
    flags = {k: v for k, v in locals().items() if k != "workers"}
    try:
        config = ServerConfig.resolve(
            listen=listen,
            database=database,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            api_keys=api_keys,
            agent_tokens=agent_tokens,
            metrics_port=metrics_port,
            log_level=log_level,
            log_format=log_format,
            shutdown_grace=shutdown_grace,
            api_keys_file=api_keys_file,
            agent_tokens_file=agent_tokens_file,
            retention=retention,
            starvation=starvation_s,
            replica_id=replica_id,
            peer_listen=peer_listen,
            leader_lease_s=leader_lease_s,
            workers=workers,
        )
    except ConfigError as error:
        print(f"gyoza server: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(config.log_level, config.log_format)
    if config.workers is not None:
        raise SystemExit(run_supervisor(config, flags))
    die_with_supervisor()
    # The event loop hands every write to the store's writer thread and back: with the
    # default 5 ms GIL switch interval each hand-off can wait that long.
    sys.setswitchinterval(float(os.environ.get("GYOZA_SWITCH_INTERVAL_S", "0.0005")))
    try:
        run_event_loop(serve(config))
    except Exception as error:
        log_event(log, logging.CRITICAL, "server failed", exc_info=True, error=str(error))
        raise SystemExit(1) from None
