"""Placement of pending runs on agents.

The scheduler is a pure in-memory model: the pending queue in priority order and each
agent's capacity, labels and reservations. It does no I/O; the run controller feeds it
changes and carries out the placements :meth:`Scheduler.place` returns. Placement is
event-driven: the controller calls ``place()`` when a run is created, an attempt ends,
an agent joins or reports capacity, and at the one instant :attr:`Scheduler.wake_at`
names (when a waiting run crosses the starvation bound) — never from a polling loop.

Rules (docs/scheduling.md states them for users):

- A run holds its declared resources from assignment to its end: CPU, RAM and its GPUs.
  An agent is never over-committed.
- A run that states ``vram_mb`` reserves that much VRAM on each GPU it gets; runs share
  a GPU while their VRAM fits. A run that asks for GPUs without a VRAM figure holds each
  GPU it gets whole: nothing else is placed on it while it holds it.
- A run goes only to an agent whose labels match its selector.
- Higher priority first, first in first out within a priority, best fit. A run that does
  not fit yet does not block the runs behind it, with one bound: once the first waiting
  run that some agent could hold (if that agent's runs ended) has waited
  ``starvation_s``, the agent with the fewest runs in its way is held for it: nothing new
  is placed there until that run starts, so runs placed after it began to wait never
  postpone it. Other agents keep taking other runs.
- A run that is not placed in a pass carries a :class:`PendingReason`.

Cost of a pass. After a pass no queued run fits anywhere (but on a held agent), and room
on an agent only grows when a run is released or the agent changes. So a pass searches
all agents only for runs queued since the last pass, and for every other run only the
agents whose room grew since ("dirty" agents); runs of a shape already known not to fit
are skipped without searching. Reasons are worked out again only when the fleet itself
changed (an agent joined, left, drained or reported other capacity), once per distinct
shape of run. A pass after one run ends costs one walk of the queue, not pending runs
times agents.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from gyoza.models.resources import Constraints, PendingReason, PendingReasonCode
from gyoza.models.selectors import LabelSelector


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
    #: Runs holding this GPU whole (0 or 1): while one does, nothing else goes here.
    whole_count: int = 0

    def takes(self, need: Constraints) -> bool:
        """Whether a run with this need may be placed on this GPU now."""
        if not self.healthy:
            return False
        if need.holds_whole_gpu:
            return self.run_count == 0
        return self.whole_count == 0 and self.vram_available_mb >= need.vram_mb

    def could_take(self, need: Constraints) -> bool:
        """Whether the run could be placed here if nothing else held this GPU."""
        return self.healthy and (need.holds_whole_gpu or self.vram_total_mb >= need.vram_mb)

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
    #: True when the attempt holds its GPUs whole.
    whole_gpu: bool = False


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
    labels: dict[str, str] = field(default_factory=dict)
    #: CPU cores reserved by the runs on this agent (kept as runs come and go).
    cpu_reserved: float = 0.0
    #: Memory reserved by the runs on this agent.
    ram_reserved_mb: int = 0

    @property
    def accepts_work(self) -> bool:
        """True when new runs may be placed here."""
        return self.connected and not self.draining

    def could_hold(self, need: Constraints) -> bool:
        """Whether the run would fit here if this agent's current runs all ended."""
        if need.cpu > self.cpu + 1e-9 or need.ram_mb > self.ram_mb:
            return False
        count = need.gpus_needed
        if count == 0:
            return True
        if need.gpu_id is not None:
            gpu = self.gpus.get(need.gpu_id)
            return gpu is not None and gpu.could_take(need)
        return sum(1 for g in self.gpus.values() if g.could_take(need)) >= count


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
    #: When it joined the queue (the scheduler's clock), for the starvation bound.
    queued_at: float = 0.0
    selector: LabelSelector = field(default_factory=LabelSelector)
    reason: PendingReason | None = None
    #: Reason codes already handed out by :meth:`Scheduler.take_new_reasons`.
    recorded: set[PendingReasonCode] = field(default_factory=set)
    #: What the run needs, as a key: runs of one shape fit or miss together.
    shape: tuple[object, ...] = ()

    @property
    def key(self) -> tuple[int, datetime, str]:
        # Higher priority first, then first in, first out.
        return (-self.priority, self.created_at, self.run_id)


#: Default bound on how long the first waiting run may be overtaken, in seconds.
DEFAULT_STARVATION_S = 60.0


class Scheduler:
    """Pending queue and agent reservations; decides placements.

    Parameters
    ----------
    starvation_s : float
        How long the first waiting run (highest priority, oldest) that some agent could
        hold may be overtaken by runs that fit, before an agent is held for it.
    clock : Callable[[], float]
        Monotonic seconds; the controller passes its event loop's clock.
    """

    def __init__(
        self,
        *,
        starvation_s: float = DEFAULT_STARVATION_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.starvation_s = starvation_s
        self._clock = clock
        self._queue: list[tuple[tuple[int, datetime, str], _Pending]] = []
        self._pending: dict[str, _Pending] = {}
        self.agents: dict[str, AgentSlot] = {}
        # run id -> agent name, for every reservation
        self._holder: dict[str, str] = {}
        # The agent held for a starving run, and that run: nothing else goes there.
        self._room_for: str | None = None
        self._room_on: str | None = None
        self._wake_at: float | None = None
        self._new_reasons: dict[str, tuple[int, PendingReason]] = {}
        # What changed since the last pass: runs queued, agents whose room grew, and a
        # counter of changes to the fleet itself (what reasons are worked out from).
        self._dirty_runs: set[str] = set()
        self._dirty_agents: set[str] = set()
        self._fleet_version = 0
        self._reasons_version = -1

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
        queued_at: float | None = None,
        recorded: frozenset[PendingReasonCode] = frozenset(),
    ) -> None:
        """Add (or replace) a pending run; ``queued_at`` (default: now) starts its wait;
        ``recorded`` are reason codes already recorded for this attempt."""
        old = self._pending.get(run_id)
        self.dequeue(run_id)
        entry = _Pending(
            run_id,
            attempt,
            priority,
            created_at,
            constraints,
            avoid,
            queued_at=self._clock() if queued_at is None else queued_at,
            selector=constraints.label_selector(),
            recorded=set(recorded),
            shape=_shape(constraints),
        )
        if old is not None and old.attempt == attempt:
            entry.reason = old.reason
            entry.recorded |= old.recorded
        self._pending[run_id] = entry
        self._dirty_runs.add(run_id)
        bisect.insort(self._queue, (entry.key, entry), key=lambda item: item[0])

    def dequeue(self, run_id: str) -> bool:
        """Remove a pending run; False when it was not queued."""
        entry = self._pending.pop(run_id, None)
        if entry is None:
            return False
        self._new_reasons.pop(run_id, None)
        self._dirty_runs.discard(run_id)
        if run_id == self._room_for:
            self._clear_hold()
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
                entry.queued_at,
            )

    def pending_reason(self, run_id: str) -> PendingReason | None:
        """Why a pending run was not placed in the last pass (None before its first)."""
        entry = self._pending.get(run_id)
        return None if entry is None else entry.reason

    def take_new_reasons(self) -> list[tuple[str, int, PendingReason]]:
        """(run id, attempt, reason) for each reason code that applied to a pending
        attempt for the first time since the last call; each code once per attempt."""
        taken = [
            (run_id, attempt, reason) for run_id, (attempt, reason) in self._new_reasons.items()
        ]
        self._new_reasons.clear()
        return taken

    @property
    def unschedulable_count(self) -> int:
        """Pending runs that no connected agent could take even if it were idle."""
        return sum(
            1
            for e in self._pending.values()
            if e.reason is not None and e.reason.code.unschedulable
        )

    @property
    def wake_at(self) -> float | None:
        """When (on the scheduler's clock) ``place()`` must run again although nothing
        changed: the first waiting run then crosses the starvation bound."""
        return self._wake_at

    @property
    def held_agent(self) -> tuple[str, str] | None:
        """(agent, run id) while an agent is held for a starving run."""
        if self._room_on is None or self._room_for is None:
            return None
        return self._room_on, self._room_for

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
        labels: dict[str, str] | None = None,
    ) -> AgentSlot:
        """Add an agent or refresh its capacity, keeping its reservations (and its
        labels when ``labels`` is None)."""
        slot = self.agents.get(name)
        if slot is None:
            slot = self.agents[name] = AgentSlot(name=name)
            self._fleet_version += 1
        before = _fleet_view(slot), _room_view(slot)
        if labels is not None:
            slot.labels = dict(labels)
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
            gpu.whole_count = old.whole_count if old else 0
            fresh[gpu.index] = gpu
        # A GPU that disappeared but still has reservations stays, unhealthy, so that
        # what is reserved on it is not forgotten.
        for index, old in slot.gpus.items():
            if index not in fresh and old.run_count:
                old.healthy = False
                old.health_reason = "no longer reported by the agent"
                fresh[index] = old
        slot.gpus = fresh
        if _fleet_view(slot) != before[0]:
            self._fleet_version += 1
            self._dirty_agents.add(name)
        elif any(free > before[1].get(index, -1) for index, free in _room_view(slot).items()):
            # More VRAM reported free: a run may fit now. Less changes nothing placed.
            self._dirty_agents.add(name)
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
        slot = self.agents.get(name)
        if slot is not None and slot.connected != connected:
            slot.connected = connected
            self._fleet_changed(name)

    def set_draining(self, name: str, draining: bool) -> None:
        """Mark an agent draining: it keeps its runs and takes no new ones."""
        slot = self.agents.get(name)
        if slot is not None and slot.draining != draining:
            slot.draining = draining
            self._fleet_changed(name)

    def _fleet_changed(self, name: str) -> None:
        self._fleet_version += 1
        self._dirty_agents.add(name)

    def _clear_hold(self) -> None:
        if self._room_on is not None:
            # Its room is open to every run again.
            self._dirty_agents.add(self._room_on)
        self._room_for = self._room_on = None

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
            whole_gpu=constraints.holds_whole_gpu,
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
            gpu.whole_count += int(reservation.whole_gpu)
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
                gpu.whole_count -= int(reservation.whole_gpu)
        self._dirty_agents.add(agent)
        return reservation

    # ------------------------------------------------------------------
    # Placement
    # ------------------------------------------------------------------
    def place(self, now: float | None = None) -> list[Placement]:
        """Place every pending run that fits, in priority order, best fit first.

        A run that fits nowhere stays queued with a reason and does not block the runs
        behind it, except on an agent held for a starving run (see the module). The
        chosen resources are reserved before this returns.
        """
        now = self._clock() if now is None else now
        if (
            not self._dirty_runs
            and not self._dirty_agents
            and self._reasons_version == self._fleet_version
            and (self._wake_at is None or now < self._wake_at)
        ):
            return []  # nothing that could place a run or change a reason
        self._wake_at = None
        self._check_hold()
        dirty_runs, self._dirty_runs = self._dirty_runs, set()
        dirty_agents = [self.agents[n] for n in sorted(self._dirty_agents) if n in self.agents]
        self._dirty_agents = set()
        explain_all = self._reasons_version != self._fleet_version
        self._reasons_version = self._fleet_version
        everyone = list(self.agents.values())
        placements: list[Placement] = []
        # Shapes that found no room in this pass: a run needing as much or more of
        # everything cannot fit either, so it is skipped without searching. A miss of a
        # run searched on the dirty agents only says nothing about the other agents.
        misses_everywhere = _Misses()
        misses_dirty = _Misses()
        reasons: dict[tuple[object, ...], PendingReason] = {}
        candidate_seen = False
        # The most CPU and memory any dirty agent has free: a run needing more is not
        # searched for on them.
        room_cpu, room_ram = _most_room(dirty_agents)
        for _, entry in list(self._queue):
            need = entry.constraints
            held_for_it = entry.run_id == self._room_for
            # The held agent's room may have grown before this pass: search it for the
            # run it is held for.
            fresh = entry.run_id in dirty_runs or held_for_it
            plain = not entry.avoid and not held_for_it
            covered = plain and (
                misses_everywhere.covers(entry) or (not fresh and misses_dirty.covers(entry))
            )
            if not fresh and (need.cpu > room_cpu + 1e-9 or need.ram_mb > room_ram):
                covered = True
            choice = None
            if not covered and (fresh or dirty_agents):
                skip = None if held_for_it else self._room_on
                choice = self._best_fit(entry, everyone if fresh else dirty_agents, skip)
                if choice is None and plain:
                    (misses_everywhere if fresh else misses_dirty).add(entry)
            if choice is None:
                reason = entry.reason
                if (
                    reason is None
                    or explain_all
                    or fresh
                    or reason.code is PendingReasonCode.MAKING_ROOM
                ):
                    reason = self._reason(entry, reasons)
                if not candidate_seen and self._room_on is None and not reason.code.unschedulable:
                    candidate_seen = True
                    if now - entry.queued_at >= self.starvation_s:
                        reason = self._hold_for(entry) or reason
                    else:
                        self._wake_at = entry.queued_at + self.starvation_s
                self._set_reason(entry, reason)
                continue
            slot, gpu_ids = choice
            self.dequeue(entry.run_id)
            self.reserve(slot.name, entry.run_id, entry.attempt, need, gpu_ids)
            if slot in dirty_agents:
                room_cpu, room_ram = _most_room(dirty_agents)
            placements.append(
                Placement(
                    run_id=entry.run_id,
                    attempt=entry.attempt,
                    agent=slot.name,
                    gpu_ids=gpu_ids,
                    gpu_uuids=tuple(slot.gpus[i].uuid for i in gpu_ids),
                )
            )
        if self._dirty_agents:
            # The hold ended in this pass (its run placed, or dropped): the runs behind
            # may use what is left of that agent now rather than at the next change.
            placements += self.place(now)
        return placements

    def _check_hold(self) -> None:
        """Drop the hold when its run left the queue or its agent can no longer hold it."""
        if self._room_for is None:
            return
        entry = self._pending.get(self._room_for)
        slot = self.agents.get(self._room_on or "")
        if (
            entry is None
            or slot is None
            or not slot.accepts_work
            or slot.name in entry.avoid
            or not entry.selector.matches(slot.labels)
            or not slot.could_hold(entry.constraints)
        ):
            self._clear_hold()

    def _hold_for(self, entry: _Pending) -> PendingReason | None:
        """Hold the agent where the starving run fits soonest: of those that could hold
        it, the one with the fewest runs in its way."""
        best: tuple[tuple[int, float, str], AgentSlot] | None = None
        for slot in self._eligible(entry):
            if not slot.could_hold(entry.constraints):
                continue
            score = (len(slot.reservations), slot.cpu_reserved, slot.name)
            if best is None or score < best[0]:
                best = (score, slot)
        if best is None:
            return None
        self._room_for, self._room_on = entry.run_id, best[1].name
        return self._making_room(entry)

    def _making_room(self, entry: _Pending) -> PendingReason:
        return PendingReason(
            PendingReasonCode.MAKING_ROOM,
            f"waited more than {self.starvation_s:g}s; room is being made for it on agent "
            f"{self._room_on} (no new run is placed there until it starts)",
        )

    def _set_reason(self, entry: _Pending, reason: PendingReason) -> None:
        if entry.reason != reason:
            entry.reason = reason
        if reason.code not in entry.recorded:
            entry.recorded.add(reason.code)
            self._new_reasons[entry.run_id] = (entry.attempt, reason)

    def _eligible(self, entry: _Pending) -> list[AgentSlot]:
        """Agents that take work, that the run does not avoid and whose labels match."""
        return [
            slot
            for slot in self.agents.values()
            if slot.accepts_work
            and slot.name not in entry.avoid
            and entry.selector.matches(slot.labels)
        ]

    def _reason(
        self, entry: _Pending, cache: dict[tuple[object, ...], PendingReason]
    ) -> PendingReason:
        """Why the run was not placed; computed once per shape of run in a pass."""
        if entry.run_id == self._room_for:
            return self._making_room(entry)
        key = (entry.shape, entry.avoid)
        reason = cache.get(key)
        if reason is None:
            reason = cache[key] = self._explain(entry)
        return reason

    def _explain(self, entry: _Pending) -> PendingReason:
        need = entry.constraints
        taking = [s for s in self.agents.values() if s.accepts_work]
        if not taking:
            return PendingReason(PendingReasonCode.NO_AGENT, "no connected agent takes work")
        if all(s.name in entry.avoid for s in taking):
            return PendingReason(
                PendingReasonCode.NO_AGENT, "the only agents that take work refused it"
            )
        eligible = self._eligible(entry)
        if not eligible:
            return PendingReason(
                PendingReasonCode.SELECTOR_UNMATCHED, f"no agent matches selector {entry.selector}"
            )
        if any(s.could_hold(need) for s in eligible):
            return PendingReason(
                PendingReasonCode.AGENTS_BUSY, "every agent that could take it is busy"
            )
        return _unschedulable(need, eligible)

    def _best_fit(
        self, entry: _Pending, agents: list[AgentSlot], skip: str | None
    ) -> tuple[AgentSlot, tuple[int, ...]] | None:
        need = entry.constraints
        best: tuple[tuple[float, float, float, str], AgentSlot, tuple[int, ...]] | None = None
        for slot in agents:
            if not slot.accepts_work or slot.name in entry.avoid or slot.name == skip:
                continue
            cpu_left = slot.cpu - slot.cpu_reserved - need.cpu
            ram_left = slot.ram_mb - slot.ram_reserved_mb - need.ram_mb
            if cpu_left < -1e-9 or ram_left < 0:
                continue
            if not entry.selector.matches(slot.labels):
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


def _most_room(agents: list[AgentSlot]) -> tuple[float, int]:
    """The most free CPU and the most free memory among these agents."""
    cpu, ram = -1.0, -1
    for slot in agents:
        if slot.accepts_work:
            cpu = max(cpu, slot.cpu - slot.cpu_reserved)
            ram = max(ram, slot.ram_mb - slot.ram_reserved_mb)
    return cpu, ram


def _shape(need: Constraints) -> tuple[object, ...]:
    return (
        need.cpu,
        need.ram_mb,
        need.vram_mb,
        need.gpus_needed,
        need.gpu_id,
        need.holds_whole_gpu,
        need.selector,
    )


class _Misses:
    """Shapes that found no room in a pass: the same shape misses again, and so does a
    run needing as much or more of everything (checked against a few shapes only)."""

    _MAX_SHAPES = 16

    def __init__(self) -> None:
        self._keys: set[tuple[object, ...]] = set()
        self._shapes: list[Constraints] = []

    def covers(self, entry: _Pending) -> bool:
        if entry.shape in self._keys:
            return True
        need = entry.constraints
        return any(_covers(need, miss) for miss in self._shapes)

    def add(self, entry: _Pending) -> None:
        self._keys.add(entry.shape)
        if entry.constraints.gpu_id is None and len(self._shapes) < self._MAX_SHAPES:
            self._shapes.append(entry.constraints)


def _fleet_view(slot: AgentSlot) -> tuple[object, ...]:
    """What reasons are worked out from: an agent's whole capacity and standing."""
    return (
        slot.cpu,
        slot.ram_mb,
        slot.connected,
        slot.draining,
        tuple(sorted(slot.labels.items())),
        tuple((g.index, g.healthy, g.vram_total_mb) for g in slot.gpus.values()),
    )


def _room_view(slot: AgentSlot) -> dict[int, int]:
    """What else bounds an agent's room: the VRAM each GPU has available."""
    return {g.index: g.vram_available_mb for g in slot.gpus.values()}


def _unschedulable(need: Constraints, agents: list[AgentSlot]) -> PendingReason:
    """The first thing the run needs that no eligible agent has, in words."""
    largest_cpu = max(s.cpu for s in agents)
    if need.cpu > largest_cpu + 1e-9:
        return PendingReason(
            PendingReasonCode.INSUFFICIENT_CPU,
            f"needs {need.cpu:g} CPU; the largest agent has {largest_cpu:g}",
        )
    largest_ram = max(s.ram_mb for s in agents)
    if need.ram_mb > largest_ram:
        return PendingReason(
            PendingReasonCode.INSUFFICIENT_RAM,
            f"needs {need.ram_mb} MB RAM; the largest agent has {largest_ram} MB",
        )
    count = need.gpus_needed
    plural = "GPU" if count == 1 else "GPUs"
    healthy = [[g for g in s.gpus.values() if g.healthy] for s in agents]
    if need.gpu_id is not None:
        pinned = [g for gpus in healthy for g in gpus if g.index == need.gpu_id]
        if not pinned:
            return PendingReason(
                PendingReasonCode.GPU_NOT_FOUND,
                f"needs GPU {need.gpu_id}; no agent has a healthy GPU {need.gpu_id}",
            )
        healthy = [pinned]
    most = max(len(gpus) for gpus in healthy)
    if most == 0:
        return PendingReason(
            PendingReasonCode.INSUFFICIENT_GPU, f"needs {count} {plural}; no agent has a GPU"
        )
    if most < count:
        return PendingReason(
            PendingReasonCode.INSUFFICIENT_GPU,
            f"needs {count} {plural}; the most on one agent is {most}",
        )
    if need.vram_mb:
        largest_vram = max(g.vram_total_mb for gpus in healthy for g in gpus)
        if need.vram_mb > largest_vram:
            return PendingReason(
                PendingReasonCode.INSUFFICIENT_VRAM,
                f"needs {need.vram_mb} MB VRAM on one GPU; the largest GPU has {largest_vram} MB",
            )
    return PendingReason(
        PendingReasonCode.NO_SINGLE_AGENT_FITS,
        "no single agent has everything it needs at once "
        f"({need.cpu:g} CPU, {need.ram_mb} MB RAM, {count} {plural}"
        + (f" with {need.vram_mb} MB VRAM each)" if need.vram_mb else ")"),
    )


def _pick_gpus(slot: AgentSlot, need: Constraints) -> tuple[int, ...] | None:
    """The GPUs of an agent that fit the run best, or None when they do not fit."""
    count = need.gpus_needed
    if count == 0:
        return ()
    if need.gpu_id is not None:
        gpu = slot.gpus.get(need.gpu_id)
        if gpu is None or not gpu.takes(need):
            return None
        return (gpu.index,)
    fitting = [g for g in slot.gpus.values() if g.takes(need)]
    if len(fitting) < count:
        return None
    # Tightest GPUs first, so that large free GPUs stay free for large runs.
    fitting.sort(key=lambda g: (g.vram_available_mb, g.index))
    return tuple(sorted(g.index for g in fitting[:count]))


def _covers(need: Constraints, miss: Constraints) -> bool:
    """True when ``need`` asks at least as much as ``miss`` in every dimension, of the
    same kind (whole or shared GPUs) and with the same selector."""
    return (
        need.gpu_id is None
        and miss.gpu_id is None
        and need.selector == miss.selector
        and need.holds_whole_gpu == miss.holds_whole_gpu
        and need.cpu >= miss.cpu
        and need.ram_mb >= miss.ram_mb
        and need.vram_mb >= miss.vram_mb
        and need.gpus_needed >= miss.gpus_needed
    )
