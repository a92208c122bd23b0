"""The Prometheus ``/metrics`` HTTP endpoint that the server and the agent both serve."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server

__all__ = ["MetricsEndpoint"]


class MetricsEndpoint:
    """The ``/metrics`` HTTP endpoint, served from a background thread.

    Parameters
    ----------
    host : str
        Address to bind.
    port : int
        Port to bind; ``0`` picks a free one (see :attr:`port`).
    """

    def __init__(self, host: str, port: int) -> None:
        server, thread = start_http_server(port, addr=host)
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread

    @property
    def port(self) -> int:
        """The port actually bound."""
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
