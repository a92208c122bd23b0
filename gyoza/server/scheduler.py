"""Placement of pending runs on agents.

The scheduler is a pure in-memory model: the pending queue in priority order and each
agent's capacity and reservations. It does no I/O; the run controller feeds it changes
and carries out the placements :meth:`Scheduler.place` returns. Placement is event-driven:
the controller calls ``place()`` when a run is created, an attempt ends, an agent joins or
reports capacity — never from a polling loop.

A run holds its declared resources from assignment to its end: CPU, RAM and, on each GPU
it gets, ``vram_mb`` of VRAM. VRAM is a budget per GPU: two runs share a GPU only while
their VRAM fits. An agent is never over-committed.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from datetime import datetime

from gyoza.models.resources import Constraints


@dataclass
class GpuSlot:
    """One GPU of an agent with what is reserved on it."""

    index: int
    uuid: str = ""
    name: str = ""
    vram_total_mb: int = 0
    vram_free_reported_mb: int | None = None
    healthy: bool = True
    health_reason: str = ""
    vram_reserved_mb: int = 0
    run_count: int = 0

    @property
    def vram_available_mb(self) -> int:
        """VRAM a new run may reserve: the unreserved budget, never more than the device
        says is free (other processes may hold VRAM too)."""
        available = self.vram_total_mb - self.vram_reserved_mb
        if self.vram_free_reported_mb is not None:
            available = min(available, self.vram_free_reported_mb)
        return max(available, 0)


@dataclass(frozen=True)
class Reservation:
    """Resources one attempt holds on an agent."""

    run_id: str
    attempt: int
    cpu: float
    ram_mb: int
    vram_mb: int
    gpu_ids: tuple[int, ...]


@dataclass
class AgentSlot:
    """An agent as the scheduler sees it."""

    name: str
    cpu: float = 0.0
    ram_mb: int = 0
    gpus: dict[int, GpuSlot] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)
    connected: bool = True
    draining: bool = False
    #: CPU cores reserved by the runs on this agent (kept as runs come and go).
    cpu_reserved: float = 0.0
    #: Memory reserved by the runs on this agent.
    ram_reserved_mb: int = 0

    @property
    def accepts_work(self) -> bool:
        """True when new runs may be placed here."""
        return self.connected and not self.draining


@dataclass(frozen=True)
class Placement:
    """A decision of the scheduler: run this attempt on that agent with these GPUs."""

    run_id: str
    attempt: int
    agent: str
    gpu_ids: tuple[int, ...]
    gpu_uuids: tuple[str, ...]


@dataclass
class _Pending:
    run_id: str
    attempt: int
    priority: int
    created_at: datetime
    constraints: Constraints
    avoid: frozenset[str] = frozenset()

    @property
    def key(self) -> tuple[int, datetime, str]:
        # Higher priority first, then first in, first out.
        return (-self.priority, self.created_at, self.run_id)


class Scheduler:
    """Pending queue and agent reservations; decides placements."""

    def __init__(self) -> None:
        self._queue: list[tuple[tuple[int, datetime, str], _Pending]] = []
        self._pending: dict[str, _Pending] = {}
        self.agents: dict[str, AgentSlot] = {}
        # run id -> agent name, for every reservation
        self._holder: dict[str, str] = {}

    # ------------------------------------------------------------------
    # Queue
    # ------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Number of runs waiting for placement."""
        return len(self._pending)

    def pending_ids(self) -> list[str]:
        """Pending run ids in placement order."""
        return [p.run_id for _, p in self._queue]

    def enqueue(
        self,
        run_id: str,
        attempt: int,
        priority: int,
        created_at: datetime,
        constraints: Constraints,
        avoid: frozenset[str] = frozenset(),
    ) -> None:
        """Add (or replace) a pending run."""
        self.dequeue(run_id)
        entry = _Pending(run_id, attempt, priority, created_at, constraints, avoid)
        self._pending[run_id] = entry
        bisect.insort(self._queue, (entry.key, entry), key=lambda item: item[0])

    def dequeue(self, run_id: str) -> bool:
        """Remove a pending run; False when it was not queued."""
        entry = self._pending.pop(run_id, None)
        if entry is None:
            return False
        index = bisect.bisect_left(self._queue, entry.key, key=lambda item: item[0])
        while self._queue[index][1] is not entry:
            index += 1
        del self._queue[index]
        return True

    def reprioritize(self, run_id: str, priority: int) -> None:
        """Change a pending run's priority, re-ordering the queue."""
        entry = self._pending.get(run_id)
        if entry is not None:
            self.enqueue(
                entry.run_id,
                entry.attempt,
                priority,
                entry.created_at,
                entry.constraints,
                entry.avoid,
            )

    # ------------------------------------------------------------------
    # Agents
    # ------------------------------------------------------------------
    def upsert_agent(
        self,
        name: str,
        *,
        cpu: float,
        ram_mb: int,
        gpus: list[GpuSlot],
        connected: bool = True,
        draining: bool | None = None,
    ) -> AgentSlot:
        """Add an agent or refresh its capacity, keeping its reservations."""
        slot = self.agents.get(name)
        if slot is None:
            slot = self.agents[name] = AgentSlot(name=name)
        slot.cpu = cpu
        slot.ram_mb = ram_mb
        slot.connected = connected
        if draining is not None:
            slot.draining = draining
        fresh: dict[int, GpuSlot] = {}
        for gpu in gpus:
            old = slot.gpus.get(gpu.index)
            gpu.vram_reserved_mb = old.vram_reserved_mb if old else 0
            gpu.run_count = old.run_count if old else 0
            fresh[gpu.index] = gpu
        # A GPU that disappeared but still has reservations stays, unhealthy, so that
        # what is reserved on it is not forgotten.
        for index, old in slot.gpus.items():
            if index not in fresh and old.run_count:
                old.healthy = False
                old.health_reason = "no longer reported by the agent"
                fresh[index] = old
        slot.gpus = fresh
        return slot

    def ensure_agent(self, name: str) -> AgentSlot:
        """The agent's slot, created disconnected and empty when unknown (for runs the
        store says an agent holds before that agent has reconnected)."""
        slot = self.agents.get(name)
        if slot is None:
            slot = self.agents[name] = AgentSlot(name=name, connected=False)
        return slot

    def set_connected(self, name: str, connected: bool) -> None:
        """Mark an agent connected or not; disconnected agents take no new runs."""
        if name in self.agents:
            self.agents[name].connected = connected

    def set_draining(self, name: str, draining: bool) -> None:
        """Mark an agent draining: it keeps its runs and takes no new ones."""
        if name in self.agents:
            self.agents[name].draining = draining

    # ------------------------------------------------------------------
    # Reservations
    # ------------------------------------------------------------------
    def holder(self, run_id: str) -> str | None:
        """Name of the agent holding a reservation for the run."""
        return self._holder.get(run_id)

    def reserve(
        self,
        agent: str,
        run_id: str,
        attempt: int,
        constraints: Constraints,
        gpu_ids: tuple[int, ...],
    ) -> Reservation:
        """Record that an attempt holds resources on an agent (replacing an older
        reservation of the same run)."""
        self.release(run_id)
        slot = self.ensure_agent(agent)
        reservation = Reservation(
            run_id=run_id,
            attempt=attempt,
            cpu=constraints.cpu,
            ram_mb=constraints.ram_mb,
            vram_mb=constraints.vram_mb,
            gpu_ids=gpu_ids,
        )
        slot.reservations[run_id] = reservation
        slot.cpu_reserved += reservation.cpu
        slot.ram_reserved_mb += reservation.ram_mb
        for index in gpu_ids:
            gpu = slot.gpus.get(index)
            if gpu is None:
                gpu = slot.gpus[index] = GpuSlot(
                    index=index, healthy=False, health_reason="not reported yet"
                )
            gpu.vram_reserved_mb += constraints.vram_mb
            gpu.run_count += 1
        self._holder[run_id] = agent
        return reservation

    def release(self, run_id: str) -> Reservation | None:
        """Free what a run holds; returns the released reservation, if any."""
        agent = self._holder.pop(run_id, None)
        if agent is None:
            return None
        slot = self.agents.get(agent)
        if slot is None:
            return None
        reservation = slot.reservations.pop(run_id, None)
        if reservation is None:
            return None
        slot.cpu_reserved = max(slot.cpu_reserved - reservation.cpu, 0.0)
        slot.ram_reserved_mb -= reservation.ram_mb
        for index in reservation.gpu_ids:
            gpu = slot.gpus.get(index)
            if gpu is not None:
                gpu.vram_reserved_mb -= reservation.vram_mb
                gpu.run_count -= 1
        return reservation

    # ------------------------------------------------------------------
    # Placement
    # ------------------------------------------------------------------
    def place(self) -> list[Placement]:
        """Place every pending run that fits, in priority order, best fit first.

        A run that fits nowhere stays queued and does not block the runs behind it. The
        chosen resources are reserved before this returns.
        """
        if not self._pending or not any(a.accepts_work for a in self.agents.values()):
            return []
        placements: list[Placement] = []
        # Shapes that found no room in this pass: a run needing as much or more of
        # everything cannot fit either, so it is skipped without searching.
        misses: list[Constraints] = []
        for _, entry in list(self._queue):
            need = entry.constraints
            if not entry.avoid and any(_covers(need, miss) for miss in misses):
                continue
            choice = self._best_fit(need, entry.avoid)
            if choice is None:
                if not entry.avoid:
                    misses.append(need)
                continue
            slot, gpu_ids = choice
            self.dequeue(entry.run_id)
            self.reserve(slot.name, entry.run_id, entry.attempt, need, gpu_ids)
            placements.append(
                Placement(
                    run_id=entry.run_id,
                    attempt=entry.attempt,
                    agent=slot.name,
                    gpu_ids=gpu_ids,
                    gpu_uuids=tuple(slot.gpus[i].uuid for i in gpu_ids),
                )
            )
        return placements

    def _best_fit(
        self, need: Constraints, avoid: frozenset[str]
    ) -> tuple[AgentSlot, tuple[int, ...]] | None:
        best: tuple[tuple[float, float, float, str], AgentSlot, tuple[int, ...]] | None = None
        for slot in self.agents.values():
            if not slot.accepts_work or slot.name in avoid:
                continue
            cpu_left = slot.cpu - slot.cpu_reserved - need.cpu
            ram_left = slot.ram_mb - slot.ram_reserved_mb - need.ram_mb
            if cpu_left < -1e-9 or ram_left < 0:
                continue
            gpu_ids = _pick_gpus(slot, need)
            if gpu_ids is None:
                continue
            vram_left = sum(slot.gpus[i].vram_available_mb - need.vram_mb for i in gpu_ids)
            # Best fit: the least room left over, GPUs first since they are scarcest.
            score = (float(vram_left), float(cpu_left), float(ram_left), slot.name)
            if best is None or score < best[0]:
                best = (score, slot, gpu_ids)
        return None if best is None else (best[1], best[2])


def _pick_gpus(slot: AgentSlot, need: Constraints) -> tuple[int, ...] | None:
    """The GPUs of an agent that fit the run best, or None when they do not fit."""
    count = need.gpus_needed
    if count == 0:
        return ()
    if need.gpu_id is not None:
        gpu = slot.gpus.get(need.gpu_id)
        if gpu is None or not gpu.healthy or gpu.vram_available_mb < need.vram_mb:
            return None
        return (gpu.index,)
    fitting = [g for g in slot.gpus.values() if g.healthy and g.vram_available_mb >= need.vram_mb]
    if len(fitting) < count:
        return None
    # Tightest GPUs first, so that large free GPUs stay free for large runs.
    fitting.sort(key=lambda g: (g.vram_available_mb, g.index))
    return tuple(sorted(g.index for g in fitting[:count]))


def _covers(need: Constraints, miss: Constraints) -> bool:
    """True when ``need`` asks at least as much as ``miss`` in every dimension."""
    return (
        need.gpu_id is None
        and miss.gpu_id is None
        and need.cpu >= miss.cpu
        and need.ram_mb >= miss.ram_mb
        and need.vram_mb >= miss.vram_mb
        and need.gpus_needed >= miss.gpus_needed
    )
