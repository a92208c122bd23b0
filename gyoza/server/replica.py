"""A server replica on a shared PostgreSQL database: the leader, or a follower.

Several ``gyoza server`` processes may share one PostgreSQL database. One of them, the
*leader*, holds the leadership lease (:mod:`gyoza.server.store.leadership`) and runs
the whole control plane (:class:`~gyoza.server.app.ControlPlane`), with every write
fenced by its term. The others are *followers*: they serve health and reflection
themselves and forward every other call, the agents' streams included, to the leader
(:mod:`gyoza.server.forward`). Clients and agents may therefore call any replica.

A replica's life is a loop::

    acquire the lease? ── yes ──▶ lead: ControlPlane(fenced) until the lease is lost
          │ no                      (renewal failed, or a write was fenced out) or stop
          ▼
    follow: forward to the holder's address until the lease can be taken, or stop

Leading ends without waiting for anything when the lease is lost: the plane ends its
agents' streams (they reconnect, to whichever replica, and the new leader reconciles
them) and stops. On a clean stop the leader releases the lease, so that another replica
takes over at once; after a ``kill -9`` the others see its lease connection gone from
the database and take over at once too; a replica that is paused or cut off loses the
lease when it expires, and can commit nothing from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import time

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gyoza.metrics_endpoint import MetricsEndpoint
from gyoza.server import metrics
from gyoza.server.app import SERVICE_NAMES, ControlPlane, add_peer_port, grpc_options
from gyoza.server.app import server_credentials as tls_server_credentials
from gyoza.server.config import ServerConfig, split_listen
from gyoza.server.forward import Forwarder
from gyoza.server.logs import log_event
from gyoza.server.reflection import enable_reflection
from gyoza.server.store.leadership import Leader, Leadership
from gyoza.server.store.schema import upgrade

log = logging.getLogger("gyoza.server.replica")

_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def default_replica_id() -> str:
    """``<hostname>-<pid>-<random>``: unique per process, readable in ListAgents."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def is_replicated(config: ServerConfig) -> bool:
    """Whether *config* runs as a replica (PostgreSQL) rather than alone (SQLite)."""
    return config.database_url.startswith(("postgresql", "postgres"))


def _join(host: str, port: int) -> str:
    if host in _WILDCARD_HOSTS:
        host = socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ReplicaNode:
    """Runs one replica until stopped: leading or following, as the lease decides.

    Parameters
    ----------
    config : ServerConfig
        Settings; ``database_url`` must be PostgreSQL.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.replica_id = config.replica_id or default_replica_id()
        self.config = dataclasses.replace(config, replica_id=self.replica_id)
        self.port = 0
        self.peer_port: int | None = None
        self.role = "starting"
        self._leadership: Leadership | None = None
        self._metrics: MetricsEndpoint | None = None
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()

    @property
    def address(self) -> str:
        """Where other replicas reach this one: the peer address if set, else listen."""
        if self.peer_port is not None and self.config.peer_listen is not None:
            return _join(split_listen(self.config.peer_listen)[0], self.peer_port)
        return _join(self.config.listen_host, self.port)

    async def wait_ready(self) -> None:
        """Until the replica serves (as leader or follower) for the first time."""
        await self._ready.wait()

    async def run(self, stop: asyncio.Event) -> None:
        """Lead or follow until *stop* is set."""
        config = self.config
        await asyncio.to_thread(_migrate, config.database_url)
        self._leadership = leadership = Leadership(
            config.database_url, self.replica_id, config.leader_lease_s
        )
        metrics.REPLICA_LEADER.set(0)
        if config.metrics_port is not None:
            self._metrics = MetricsEndpoint(config.listen_host, config.metrics_port)
        try:
            while not stop.is_set():
                holder = await self._try_acquire()
                if stop.is_set():
                    break
                if leadership.term:
                    await self._lead(stop)
                else:
                    await self._follow(stop, holder)
        finally:
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None
            await asyncio.to_thread(leadership.release)
            await asyncio.to_thread(leadership.close)

    # ------------------------------------------------------------------
    # Leading
    # ------------------------------------------------------------------
    async def _try_acquire(self) -> Leader | None:
        assert self._leadership is not None
        try:
            return await asyncio.to_thread(self._leadership.acquire, self._advertised())
        except Exception as error:  # the database is away: try again on the next turn
            log_event(log, logging.WARNING, "leadership lease unreachable", error=str(error))
            await asyncio.sleep(self._tick_s)
            return None

    def _advertised(self) -> str:
        """The address to advertise when taking the lease.

        Before the first bind of a port 0 (or of a peer port, which workers sharing
        one listening address need, since forwarding to the shared address could reach
        the follower itself) it is not known yet: "" until the leader's first renewal,
        right after it binds, and followers forward nothing to "".
        """
        if self.port:
            return self.address
        if self.config.peer_listen is not None or not split_listen(self.config.listen)[1]:
            return ""
        return _join(self.config.listen_host, self._listen_port)

    @property
    def _listen_port(self) -> int:
        return self.port or split_listen(self.config.listen)[1]

    @property
    def _tick_s(self) -> float:
        return max(0.05, min(1.0, self.config.leader_lease_s / 3))

    def _bound_config(self) -> ServerConfig:
        """The settings with the ports bound so far, so that every role serves on the
        same ports (port 0 picks them the first time only)."""
        config = self.config
        if self.port:
            host = config.listen_host
            config = dataclasses.replace(config, listen=_join_listen(host, self.port))
        if self.peer_port is not None and config.peer_listen is not None:
            host = split_listen(config.peer_listen)[0]
            config = dataclasses.replace(config, peer_listen=_join_listen(host, self.peer_port))
        return config

    async def _lead(self, stop: asyncio.Event) -> None:
        leadership = self._leadership
        assert leadership is not None
        term = leadership.term
        plane = ControlPlane(
            self._bound_config(),
            leadership=leadership,
            metrics_endpoint=self._metrics,
            replica_id=self.replica_id,
        )
        try:
            await plane.start()
        except BaseException:
            await asyncio.to_thread(leadership.release)
            raise
        self.port, self.peer_port = plane.port, plane.peer_port
        self.role = "leader"
        metrics.REPLICA_LEADER.set(1)
        metrics.REPLICA_TERM.set(term)
        log_event(
            log,
            logging.INFO,
            "replica leads",
            replica=self.replica_id,
            term=term,
            address=self.address,
        )
        self._ready.set()
        reason = "stopping"
        try:
            reason = await self._hold_lease(stop)
        finally:
            metrics.REPLICA_LEADER.set(0)
            if reason != "stopping":
                log_event(
                    log,
                    logging.WARNING,
                    "replica lost the leadership",
                    replica=self.replica_id,
                    term=term,
                    reason=reason,
                )
                leadership.lost()
            await plane.stop(grace=None if reason == "stopping" else 0.0)

    async def _hold_lease(self, stop: asyncio.Event) -> str:
        """Renew the lease until *stop* ("stopping") or until it is lost (the reason)."""
        leadership = self._leadership
        assert leadership is not None
        lease = self.config.leader_lease_s
        renewed_at = time.monotonic()
        # The first renewal comes at once: it advertises the address with its bound port.
        first = True
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while True:
                if not first:
                    await asyncio.wait({stopping}, timeout=self._tick_s)
                first = False
                if stop.is_set():
                    return "stopping"
                if not leadership.term:
                    return "a write was fenced out: another replica took over"
                started = time.monotonic()
                try:
                    held = await asyncio.to_thread(leadership.renew, self.address)
                except Exception as error:
                    # Keep leading while the lease may still be ours; stop before it
                    # can have expired (a third of it to spare).
                    if time.monotonic() - renewed_at > lease * 2 / 3:
                        return f"the lease could not be renewed: {error}"
                    continue
                if not held:
                    return "the lease was taken over"
                renewed_at = started
        finally:
            stopping.cancel()

    # ------------------------------------------------------------------
    # Following
    # ------------------------------------------------------------------
    async def _follow(self, stop: asyncio.Event, holder: Leader | None) -> None:
        config = self._bound_config()
        forwarder = Forwarder(
            replica_id=self.replica_id,
            credentials=_peer_credentials(config),
            max_message_bytes=config.max_message_bytes,
        )
        server = grpc.aio.server(options=grpc_options(config))
        server.add_generic_rpc_handlers((forwarder.handler(),))
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        enable_reflection((*SERVICE_NAMES, health.SERVICE_NAME), server)
        credentials = tls_server_credentials(config)
        if credentials is None:
            port = server.add_insecure_port(config.listen)
        else:
            port = server.add_secure_port(config.listen, credentials)
        if port == 0:
            raise RuntimeError(f"cannot listen on {config.listen}")
        peer_port = add_peer_port(server, config, credentials)
        await server.start()
        self.port, self.peer_port = port, peer_port
        self.role = "follower"
        log_event(
            log,
            logging.INFO,
            "server listening",
            address=_join_listen(config.listen_host, port),
            port=port,
            role="follower",
            replica=self.replica_id,
            peer_port=peer_port,
            metrics_port=None if self._metrics is None else self._metrics.port,
        )
        serving: bool | None = None
        target: str | None = None
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while True:
                live = (
                    holder is not None
                    and holder.live
                    and bool(holder.address)
                    and holder.holder != self.replica_id
                )
                wanted = holder.address if live and holder is not None else None
                if wanted != target:
                    target = wanted
                    forwarder.set_target(target)
                    log_event(
                        log,
                        logging.INFO,
                        "replica follows",
                        replica=self.replica_id,
                        leader=None if holder is None else holder.holder,
                        leader_address=target,
                        term=None if holder is None else holder.term,
                    )
                if live != serving:
                    serving = live
                    status = (
                        health_pb2.HealthCheckResponse.SERVING
                        if live
                        else health_pb2.HealthCheckResponse.NOT_SERVING
                    )
                    for name in ("", *SERVICE_NAMES):
                        await health_servicer.set(name, status)
                    if live:
                        self._ready.set()
                _export_forwarding(forwarder)
                await asyncio.wait({stopping}, timeout=self._tick_s)
                if stop.is_set():
                    break
                holder = await self._try_acquire()
                assert self._leadership is not None
                if self._leadership.term:
                    break  # this replica leads now
        finally:
            stopping.cancel()
            await health_servicer.enter_graceful_shutdown()
            forwarder.set_target(None)
            await server.stop(0 if not stop.is_set() else self.config.shutdown_grace_s)
            await forwarder.close()
            _export_forwarding(forwarder)


def _export_forwarding(forwarder: Forwarder) -> None:
    """Publish what the forwarder holds: its open calls by method, its call count."""
    open_calls = forwarder.open_calls
    for labels in list(_exported_methods):
        if labels not in open_calls:
            metrics.REPLICA_FORWARDED_OPEN.labels(method=labels).set(0)
    for method, count in open_calls.items():
        _exported_methods.add(method)
        metrics.REPLICA_FORWARDED_OPEN.labels(method=method).set(count)
    metrics.REPLICA_FORWARDED_CALLS.set(forwarder.forwarded_calls)


_exported_methods: set[str] = set()


def _join_listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_credentials(config: ServerConfig) -> grpc.ChannelCredentials | None:
    """How a follower reaches the leader: TLS trusting the replicas' own certificate
    when they serve TLS (replicas share one), plaintext otherwise."""
    if config.tls is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=config.tls.cert.read_bytes())


def _migrate(url: str) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from gyoza.server.store.engines import normalize_url

    engine = create_engine(normalize_url(url), poolclass=NullPool)
    try:
        upgrade(engine)
    finally:
        engine.dispose()


async def serve_replica(config: ServerConfig, stop: asyncio.Event) -> None:
    """Run one replica until *stop* is set."""
    node = ReplicaNode(config)
    with contextlib.suppress(asyncio.CancelledError):
        await node.run(stop)
