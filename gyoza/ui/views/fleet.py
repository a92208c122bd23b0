"""The fleet page's values: an agent's bars for CPU, RAM and each GPU's VRAM, totals."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from gyoza.client import Agent, AgentState
from gyoza.models.timestamps import utc_now
from gyoza.ui.views.formatting import format_age, format_duration, format_mb, percent

__all__ = ["AgentView", "BarView", "FleetSummary", "GpuView", "agent_view", "fleet_summary"]

_AGENT_TONES = {
    AgentState.CONNECTED: "good",
    AgentState.DRAINING: "waiting",
    AgentState.LOST: "bad",
    AgentState.DISCONNECTED: "muted",
    AgentState.UNKNOWN: "muted",
}


@dataclass(frozen=True)
class BarView:
    """A reserved-of-total bar: ``label`` reads e.g. ``12 GB of 80 GB``."""

    used: float
    total: float
    label: str

    @property
    def percent(self) -> int:
        """Used share, 0-100."""
        return percent(self.used, self.total)

    @property
    def tone(self) -> str:
        """``calm`` below 70 %, ``busy`` to 90 %, ``full`` above."""
        if self.percent >= 90:
            return "full"
        return "busy" if self.percent >= 70 else "calm"


@dataclass(frozen=True)
class GpuView:
    """One GPU on the fleet page."""

    index: int
    name: str
    uuid: str
    vram: BarView
    free_mb: int
    healthy: bool
    health_reason: str
    run_ids: tuple[str, ...]

    @property
    def free_label(self) -> str:
        """Free VRAM for new runs."""
        return f"{format_mb(self.free_mb)} free"


@dataclass(frozen=True)
class AgentView:
    """One agent on the fleet page."""

    name: str
    state: str
    tone: str
    labels: dict[str, str]
    cpu: BarView
    ram: BarView
    gpus: tuple[GpuView, ...]
    run_ids: tuple[str, ...]
    version: str
    last_seen: str
    connected_for: str

    @property
    def other_run_ids(self) -> tuple[str, ...]:
        """Runs it holds on no GPU."""
        on_gpus = {run_id for gpu in self.gpus for run_id in gpu.run_ids}
        return tuple(r for r in self.run_ids if r not in on_gpus)

    @property
    def can_drain(self) -> bool:
        """Whether draining it means something: it is connected and not draining."""
        return self.state == AgentState.CONNECTED.value

    @property
    def can_undrain(self) -> bool:
        """Whether it is draining (undrain is offered where the API has it)."""
        return self.state == AgentState.DRAINING.value


def agent_view(agent: Agent, now: datetime | None = None) -> AgentView:
    """The fleet page's view of an agent: bars for CPU, RAM and each GPU's VRAM."""
    now = now or utc_now()
    gpus = []
    for gpu in agent.gpus:
        runs = tuple(r.run_id for r in agent.runs if gpu.index in r.gpu_ids)
        gpus.append(
            GpuView(
                index=gpu.index,
                name=gpu.name or "GPU",
                uuid=gpu.uuid,
                vram=BarView(
                    gpu.vram_reserved_mb,
                    gpu.vram_total_mb,
                    f"{format_mb(gpu.vram_reserved_mb)} of {format_mb(gpu.vram_total_mb)}",
                ),
                free_mb=gpu.vram_free_mb,
                healthy=gpu.healthy,
                health_reason=gpu.health_reason,
                run_ids=runs,
            )
        )
    return AgentView(
        name=agent.name,
        state=agent.state.value,
        tone=_AGENT_TONES.get(agent.state, "muted"),
        labels=dict(sorted(agent.labels.items())),
        cpu=BarView(agent.cpu_reserved, agent.cpu, f"{agent.cpu_reserved:g} of {agent.cpu:g}"),
        ram=BarView(
            agent.ram_reserved_mb,
            agent.ram_mb,
            f"{format_mb(agent.ram_reserved_mb)} of {format_mb(agent.ram_mb)}",
        ),
        gpus=tuple(gpus),
        run_ids=tuple(r.run_id for r in agent.runs),
        version=agent.version,
        last_seen=format_age(agent.last_seen_time, now),
        connected_for=(
            format_duration((now - agent.connect_time).total_seconds() * 1000)
            if agent.connect_time is not None
            else "—"
        ),
    )


@dataclass(frozen=True)
class FleetSummary:
    """The figures at the top of the fleet page."""

    agents: int
    agents_live: int
    gpus: int
    gpus_unhealthy: int
    gpus_busy: int
    vram: BarView
    running: int


def fleet_summary(agents: Sequence[AgentView]) -> FleetSummary:
    """Totals over the agents shown."""
    live = [a for a in agents if a.state in (AgentState.CONNECTED, AgentState.DRAINING)]
    gpus = [g for a in live for g in a.gpus]
    reserved = sum(g.vram.used for g in gpus)
    total = sum(g.vram.total for g in gpus)
    return FleetSummary(
        agents=len(agents),
        agents_live=len(live),
        gpus=len(gpus),
        gpus_unhealthy=sum(1 for g in gpus if not g.healthy),
        gpus_busy=sum(1 for g in gpus if g.run_ids),
        vram=BarView(reserved, total, f"{format_mb(reserved)} of {format_mb(total)}"),
        running=sum(len(a.run_ids) for a in live),
    )
