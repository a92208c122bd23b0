"""Prometheus metrics of the server, and the HTTP endpoint that exposes them.

The metric objects are module-level so that every part of the server updates the same
ones: the run controller (``EVENT_APPLY_SECONDS``), the RPC interceptor
(``RPC_DURATION_SECONDS``), the hub (``HUB_SUBSCRIBERS``, ``HUB_DROPPED_SUBSCRIBERS``) and
the run gauge (``RUNS_BY_STATE``, ``RUNS_FINISHED``). ``QUEUE_DEPTH``,
``RUNS_UNSCHEDULABLE``, ``AGENTS_HELD`` and ``CONNECTED_AGENTS`` are read from the scheduler and the session registry when scraped
(wired in :mod:`gyoza.server.app`). Their names are part of the operator's interface:
keep them stable.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RUNS_BY_STATE = Gauge(
    "gyoza_runs",
    "Active runs by state: PENDING, ASSIGNED, RUNNING, and FAILED waiting for a retry.",
    ["state"],
)
"""Labelled by ``state``; kept by :mod:`gyoza.server.run_gauge` from the hub's changes."""

RUNS_FINISHED = Counter(
    "gyoza_runs_finished", "Runs that reached a final state since start, by state.", ["state"]
)

QUEUE_DEPTH = Gauge("gyoza_queue_depth", "Runs waiting in the scheduler's queue.")

RUNS_UNSCHEDULABLE = Gauge(
    "gyoza_runs_unschedulable",
    "Pending runs that no connected agent could take even if it were idle "
    "(their pending reason is neither AGENTS_BUSY nor MAKING_ROOM).",
)

AGENTS_HELD = Gauge(
    "gyoza_agents_held",
    "Agents held for a run that waited past the starvation bound (0 or 1).",
)

CONNECTED_AGENTS = Gauge("gyoza_connected_agents", "Agents with a live stream session.")

EVENT_APPLY_SECONDS = Histogram(
    "gyoza_event_apply_seconds",
    "Time from receiving an agent report to its committed, published change.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

RPC_DURATION_SECONDS = Histogram(
    "gyoza_rpc_duration_seconds",
    "Duration of RPCs (streams: until they end), by method and status code.",
    ["method", "code"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
"""Labelled by ``method`` (``/gyoza.api.v1.OpRunService/CreateOpRun``) and ``code``."""

HUB_SUBSCRIBERS = Gauge(
    "gyoza_hub_subscribers", "Watchers subscribed to run changes and topic events."
)

HUB_DROPPED_SUBSCRIBERS = Counter(
    "gyoza_hub_dropped_subscribers", "Watchers dropped because they fell too far behind."
)


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
