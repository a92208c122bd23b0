"""Serving the dashboard: uvicorn on an address, one client of the gyoza server.

``gyoza ui`` calls :func:`main_ui`; ``gyoza dev`` runs :func:`serve_ui` beside its own
server and agent in the same event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import uvicorn

from gyoza.client import Client
from gyoza.ui.app import create_app
from gyoza.ui.gateway import Gateway

__all__ = [
    "CHANNEL_OPTIONS",
    "DEFAULT_LISTEN",
    "UiAddressError",
    "main_ui",
    "parse_listen",
    "serve_ui",
]

#: Where the dashboard listens by default (local only: it acts with the UI's API key).
DEFAULT_LISTEN = "127.0.0.1:8080"
#: gRPC channel arguments of the dashboard's client: after a server restart the channel
#: tries again within a second or two (gRPC's default backoff grows to two minutes, and
#: calls fail at once meanwhile), so the pages recover as soon as the server is back.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


class UiAddressError(ValueError):
    """A ``--listen`` value that is not ``HOST:PORT``."""


@dataclass(frozen=True)
class Listen:
    """A host and port to serve on (port 0: one the system picks)."""

    host: str
    port: int


def parse_listen(text: str) -> Listen:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) as a :class:`Listen`.

    Raises
    ------
    UiAddressError
        When it is not ``HOST:PORT`` with a port from 0 to 65535.
    """
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UiAddressError(f"--listen must be HOST:PORT, not {text!r}")
    return Listen(host.strip("[]") or "127.0.0.1", int(port))


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: whoever runs the loop decides when to
    stop (``gyoza dev`` stops its server, agent and dashboard together)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(where: Listen) -> socket.socket:
    family = socket.AF_INET6 if ":" in where.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((where.host, where.port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


async def serve_ui(
    client: Client,
    listen: str = DEFAULT_LISTEN,
    *,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the dashboard over *client* until cancelled; *on_ready* gets its URL once
    it listens. The client is closed when it stops.

    Raises
    ------
    UiAddressError
        For a bad *listen*.
    OSError
        When the address cannot be bound.
    """
    where = parse_listen(listen)
    sock = _bind(where)
    app = create_app(Gateway(client))
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        # Open live feeds end at once on shutdown rather than holding it up.
        timeout_graceful_shutdown=1,
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise OSError(f"the dashboard did not start on {listen}")
            await asyncio.sleep(0.02)
        if on_ready is not None:
            on_ready(_url(where.host, sock.getsockname()[1]))
        # Shielded: being cancelled must let uvicorn shut down (below), not cancel it.
        await asyncio.shield(task)
    finally:
        if not task.done():
            server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)
        sock.close()


async def _serve_until_signal(client: Client, listen: str, on_ready: Callable[[str], None]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    serving = asyncio.create_task(serve_ui(client, listen, on_ready=on_ready))
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if not serving.done():
        serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving


def main_ui(
    *,
    server: str,
    listen: str,
    api_key: str | None = None,
    tls: bool = False,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    timeout: float = 30.0,
) -> None:
    """Run ``gyoza ui`` until SIGINT or SIGTERM.

    Raises
    ------
    SystemExit
        2 for a bad address or TLS options, 1 when the address cannot be bound.
    """
    try:
        parse_listen(listen)
        client = Client(
            server,
            api_key=api_key,
            tls=tls,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            timeout=timeout,
            channel_options=CHANNEL_OPTIONS,
        )
    except (ValueError, OSError) as error:
        print(f"gyoza ui: {error}", file=sys.stderr)
        raise SystemExit(2) from None

    def ready(url: str) -> None:
        print(f"gyoza ui: dashboard on {url} (server {server})", file=sys.stderr, flush=True)

    try:
        asyncio.run(_serve_until_signal(client, listen, ready))
    except KeyboardInterrupt:
        pass
    except OSError as error:
        print(f"gyoza ui: cannot listen on {listen}: {error}", file=sys.stderr)
        raise SystemExit(1) from None
