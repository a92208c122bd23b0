"""The client's view of the agents a server knows (``ListAgents``, ``DrainAgent``).

Agents are not part of the domain; this small read-only view flattens the API's
``Agent`` message (capacity, reservations per GPU, held runs) into what an operator
looks at.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from gyoza.api.v1 import agent_pb2
from gyoza.mapping import optional_timestamp_from_proto

__all__ = ["Agent", "AgentGpu", "AgentRun", "AgentState", "agent_from_proto"]


class AgentState(StrEnum):
    """Connection state of an agent as the server sees it."""

    CONNECTED = "CONNECTED"
    DRAINING = "DRAINING"
    LOST = "LOST"
    DISCONNECTED = "DISCONNECTED"
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True)
class AgentGpu:
    """One GPU of an agent, with what the runs on it reserve.

    Parameters
    ----------
    index : int
        Index on the agent (what a pinned ``gpu_id`` names).
    uuid, name : str
        NVML UUID and model name.
    vram_total_mb : int
        Total VRAM.
    vram_free_mb : int
        VRAM still free for new runs: total less what runs reserve. Falls back to the
        device's own reading when the server reports no reservation for the GPU.
    vram_reserved_mb : int
        VRAM reserved by runs.
    vram_device_free_mb : int
        Free VRAM as the device last reported it.
    run_count : int
        Runs holding this GPU.
    healthy : bool
        False when the GPU takes no runs; ``health_reason`` says why.
    """

    index: int
    uuid: str
    name: str
    vram_total_mb: int
    vram_free_mb: int
    vram_reserved_mb: int
    vram_device_free_mb: int
    run_count: int
    healthy: bool
    health_reason: str = ""


@dataclass(frozen=True)
class AgentRun:
    """An attempt an agent holds."""

    run_id: str
    attempt: int
    gpu_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Agent:
    """An agent known to the server.

    Parameters
    ----------
    name : str
        Unique name (its node).
    state : AgentState
        Connection state.
    cpu, ram_mb : float, int
        Whole capacity.
    cpu_reserved, ram_reserved_mb : float, int
        What its runs reserve.
    gpus : tuple[AgentGpu, ...]
        Its GPUs by index.
    runs : tuple[AgentRun, ...]
        Attempts it holds.
    labels : dict[str, str]
        Labels it declared.
    session_id, version : str
        Current stream session and agent software version.
    replica : str
        Id of the server replica holding its stream ("" when not known).
    connect_time, last_seen_time : datetime | None
        When its session began and when it was last heard from.
    """

    name: str
    state: AgentState
    cpu: float
    ram_mb: int
    cpu_reserved: float
    ram_reserved_mb: int
    gpus: tuple[AgentGpu, ...] = ()
    runs: tuple[AgentRun, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    session_id: str = ""
    version: str = ""
    replica: str = ""
    connect_time: datetime | None = None
    last_seen_time: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dictionary (times as ISO 8601)."""
        data = asdict(self)
        data["state"] = self.state.value
        for key in ("connect_time", "last_seen_time"):
            moment = getattr(self, key)
            data[key] = None if moment is None else moment.isoformat()
        data["gpus"] = [asdict(g) for g in self.gpus]
        data["runs"] = [{**asdict(r), "gpu_ids": list(r.gpu_ids)} for r in self.runs]
        return data


def agent_from_proto(message: agent_pb2.Agent) -> Agent:
    """Convert an API ``Agent`` message to the client's :class:`Agent` view."""
    reservations = {r.index: r for r in message.gpu_reservations}
    gpus: list[AgentGpu] = []
    for gpu in message.capacity.gpus:
        reservation = reservations.get(gpu.index)
        gpus.append(
            AgentGpu(
                index=gpu.index,
                uuid=gpu.uuid,
                name=gpu.name,
                vram_total_mb=gpu.vram_total_mb,
                vram_free_mb=(
                    reservation.vram_free_mb if reservation is not None else gpu.vram_free_mb
                ),
                vram_reserved_mb=reservation.vram_reserved_mb if reservation is not None else 0,
                vram_device_free_mb=gpu.vram_free_mb,
                run_count=reservation.run_count if reservation is not None else 0,
                healthy=gpu.healthy,
                health_reason=gpu.health_reason,
            )
        )
    return Agent(
        name=message.name,
        state=_state_from_proto(message.state),
        cpu=message.capacity.cpu,
        ram_mb=message.capacity.ram_mb,
        cpu_reserved=message.cpu_reserved,
        ram_reserved_mb=message.ram_reserved_mb,
        gpus=tuple(sorted(gpus, key=lambda g: g.index)),
        runs=tuple(AgentRun(r.run_id, r.attempt, tuple(r.gpu_ids)) for r in message.runs),
        labels=dict(message.labels),
        session_id=message.session_id,
        version=message.version,
        replica=message.replica,
        connect_time=optional_timestamp_from_proto(message, "connect_time"),
        last_seen_time=optional_timestamp_from_proto(message, "last_seen_time"),
    )


def _state_from_proto(value: agent_pb2.AgentState.ValueType) -> AgentState:
    try:
        name = agent_pb2.AgentState.Name(value).removeprefix("AGENT_STATE_")
    except ValueError:  # a state newer than this client
        return AgentState.UNKNOWN
    return AgentState.__members__.get(name, AgentState.UNKNOWN)
