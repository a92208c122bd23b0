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

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gyoza.server.scheduler import AgentSlot

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

REPLICA_LEADER = Gauge(
    "gyoza_replica_leader",
    "1 while this replica leads (runs the core) on a shared PostgreSQL database, else 0.",
)

REPLICA_TERM = Gauge(
    "gyoza_replica_term", "The leadership term this replica last led under (0: never)."
)

REPLICA_FORWARDED_OPEN = Gauge(
    "gyoza_replica_forwarded_open_calls",
    "Calls a follower replica is forwarding to the leader now, by method (Connect: the "
    "agents whose streams this replica holds).",
    ["method"],
)

REPLICA_FORWARDED_CALLS = Gauge(
    "gyoza_replica_forwarded_calls",
    "Calls this replica forwarded to a leader since it last became a follower.",
)

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


RUN_QUEUE_WAIT_SECONDS = Histogram(
    "gyoza_run_queue_wait_seconds",
    "Time an attempt waited from its creation until it was assigned to an agent, by "
    "definition (empty for ad-hoc runs).",
    ["definition"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0),
)
"""Observed by :mod:`gyoza.server.run_log`."""

RUN_DURATION_SECONDS = Histogram(
    "gyoza_run_duration_seconds",
    "Time an attempt ran, from its start to its end, by definition (empty for ad-hoc "
    "runs) and the state it ended in.",
    ["definition", "state"],
    buckets=(0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0),
)
"""Observed by :mod:`gyoza.server.run_log`."""


class AgentCollector(Collector):
    """Per-agent capacity and reservation gauges, read from the scheduler when scraped.

    ``gyoza_agent_cpu``, ``gyoza_agent_cpu_reserved``, ``gyoza_agent_ram_mb``,
    ``gyoza_agent_ram_reserved_mb`` (labelled by ``agent``), ``gyoza_agent_gpu_vram_mb``,
    ``gyoza_agent_gpu_vram_reserved_mb`` (by ``agent`` and ``gpu``, the index), and
    ``gyoza_agent_accepting`` (1 when connected and not draining). Agents that left stay
    until the server restarts, with ``gyoza_agent_accepting`` 0.

    Parameters
    ----------
    agents : Callable[[], Iterable[AgentSlot]]
        The scheduler's agents, at the time of the scrape.
    """

    def __init__(self, agents: Callable[[], Iterable[AgentSlot]]) -> None:
        self._agents = agents

    def collect(self) -> Iterator[Metric]:
        cpu = GaugeMetricFamily("gyoza_agent_cpu", "CPU cores an agent offers.", labels=["agent"])
        cpu_reserved = GaugeMetricFamily(
            "gyoza_agent_cpu_reserved", "CPU cores reserved by runs on an agent.", labels=["agent"]
        )
        ram = GaugeMetricFamily(
            "gyoza_agent_ram_mb", "Memory (MiB) an agent offers.", labels=["agent"]
        )
        ram_reserved = GaugeMetricFamily(
            "gyoza_agent_ram_reserved_mb",
            "Memory (MiB) reserved by runs on an agent.",
            labels=["agent"],
        )
        vram = GaugeMetricFamily(
            "gyoza_agent_gpu_vram_mb", "VRAM (MiB) of a GPU of an agent.", labels=["agent", "gpu"]
        )
        vram_reserved = GaugeMetricFamily(
            "gyoza_agent_gpu_vram_reserved_mb",
            "VRAM (MiB) reserved by runs on a GPU of an agent.",
            labels=["agent", "gpu"],
        )
        accepting = GaugeMetricFamily(
            "gyoza_agent_accepting",
            "1 when an agent is connected and not draining: new runs may be placed on it.",
            labels=["agent"],
        )
        for slot in list(self._agents()):
            cpu.add_metric([slot.name], slot.cpu)
            cpu_reserved.add_metric([slot.name], slot.cpu_reserved)
            ram.add_metric([slot.name], slot.ram_mb)
            ram_reserved.add_metric([slot.name], slot.ram_reserved_mb)
            accepting.add_metric([slot.name], 1.0 if slot.accepts_work else 0.0)
            for gpu in list(slot.gpus.values()):
                vram.add_metric([slot.name, str(gpu.index)], gpu.vram_total_mb)
                vram_reserved.add_metric([slot.name, str(gpu.index)], gpu.vram_reserved_mb)
        yield from (cpu, cpu_reserved, ram, ram_reserved, vram, vram_reserved, accepting)


_agent_collector: list[AgentCollector] = []


def watch_agents(agents: Callable[[], Iterable[AgentSlot]]) -> None:
    """Export the per-agent gauges of :class:`AgentCollector` from *agents* (the last
    server started in this process wins)."""
    if not _agent_collector:
        collector = AgentCollector(agents)
        REGISTRY.register(collector)
        _agent_collector.append(collector)
    _agent_collector[0]._agents = agents
