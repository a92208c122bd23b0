"""``python -m bench.placement`` (part of ``make bench``): what a placement pass costs.

The scheduler alone, in-process (it does no I/O): 500 agents, all busy, and 10,000
pending runs of mixed shapes (CPU-only, whole GPUs, VRAM budgets, pinned GPUs, selectors,
some too large for any agent). Each measured change is one a busy server sees all the
time, followed by the pass the controller runs for it:

- **run ends**: one running run is released (its agent has room again); the pass places
  what fits there;
- **run created**: one new run is queued (it fits nowhere yet);
- **agent joins**: a new empty agent connects (the pass fills it);
- **heartbeat**: an agent reports the same capacity again (nothing changes);
- **fleet change**: an agent drains (every reason is worked out again).

Each is measured with no hold and with a hold in force (the first waiting run has
crossed the starvation bound, so one agent is held for it), and once more with 10,000
distinct shapes of run (no two alike, none needing more of everything than another), where
skipping runs by shape cannot help. The first pass after a start searches every run on
every agent: that is what each change would cost without the incremental passes.
Figures are the median and 95th percentile of the pass's wall time; indicative only on a
shared machine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gyoza.models.resources import Constraints
from gyoza.server.scheduler import GpuSlot, Scheduler

T0 = datetime(2026, 1, 1, tzinfo=UTC)

SHAPES = (
    Constraints(cpu=1, ram_mb=1024),
    Constraints(cpu=2, ram_mb=4096),
    Constraints(cpu=4, ram_mb=8192, gpu_count=1),
    Constraints(cpu=1, vram_mb=20_000),
    Constraints(cpu=1, vram_mb=40_000, gpu_count=2),
    Constraints(cpu=1, vram_mb=8_000, gpu_id=3),
    Constraints(cpu=1, selector="zone=eu-1"),
    Constraints(cpu=1, selector="gpu.model in (H100), zone != us-2"),
    Constraints(cpu=128),  # larger than any agent: unschedulable
)


@dataclass
class Fleet:
    """A scheduler with a busy fleet and a deep queue, and a clock it reads."""

    scheduler: Scheduler
    running: list[str]
    clock: list[float]
    #: Seconds of the first pass, which searches every run on every agent.
    first_pass_s: float = 0.0
    next_id: int = 0


def build(agents: int, pending: int, *, hold: bool, distinct: bool = False, seed: int = 1) -> Fleet:
    """500 agents (8 GPUs on a quarter of them), each filled with runs, then the queue."""
    rng = random.Random(seed)
    clock = [0.0]
    s = Scheduler(starvation_s=60.0, clock=lambda: clock[0])
    for i in range(agents):
        gpus = (
            [GpuSlot(index=g, uuid=f"GPU-{i}-{g}", vram_total_mb=81_920) for g in range(8)]
            if i % 4 == 0
            else []
        )
        labels = {"zone": ("eu-1", "us-2")[i % 2], "gpu.model": "H100" if gpus else ""}
        s.upsert_agent(f"agent-{i:03}", cpu=32, ram_mb=256_000, gpus=gpus, labels=labels)
    running: list[str] = []
    # Fill every agent: CPU-only runs of 1 CPU, and whole GPUs on GPU agents.
    for i in range(agents):
        name = f"agent-{i:03}"
        slot = s.agents[name]
        for g in slot.gpus:
            run_id = f"busy-{i}-gpu{g}"
            s.reserve(name, run_id, 1, Constraints(cpu=1, gpu_count=1), (g,))
            running.append(run_id)
        while slot.cpu - slot.cpu_reserved >= 1:
            run_id = f"busy-{i}-{len(slot.reservations)}"
            s.reserve(name, run_id, 1, Constraints(cpu=1), ())
            running.append(run_id)
    if hold:
        # The first run in the queue needs a whole agent; it has waited past the bound.
        s.enqueue("large", 1, 5, T0, Constraints(cpu=32), queued_at=-1000.0)
    for n in range(pending):
        # Distinct: more CPU but less memory than the one before, so none covers another.
        shape = (
            Constraints(cpu=2 + n / pending, ram_mb=200_000 - n) if distinct else rng.choice(SHAPES)
        )
        s.enqueue(
            f"run-{n}",
            1,
            rng.choice((0, 0, 0, 1)),
            T0 + timedelta(seconds=n + 1),
            shape,
            queued_at=0.0,
        )
    began = time.perf_counter()
    s.place()  # the first pass: everything searched once
    first_pass_s = time.perf_counter() - began
    if hold:
        assert s.held_agent is not None, "the large run should hold an agent"
    rng.shuffle(running)
    return Fleet(s, running, clock, first_pass_s)


def _run_ends(fleet: Fleet) -> None:
    fleet.scheduler.release(fleet.running.pop())


def _run_created(fleet: Fleet) -> None:
    fleet.next_id += 1
    fleet.scheduler.enqueue(
        f"new-{fleet.next_id}", 1, 0, T0 + timedelta(days=1, seconds=fleet.next_id), SHAPES[1]
    )


def _agent_joins(fleet: Fleet) -> None:
    fleet.next_id += 1
    fleet.scheduler.upsert_agent(
        f"joined-{fleet.next_id}", cpu=8, ram_mb=64_000, gpus=[], labels={"zone": "eu-1"}
    )


def _heartbeat(fleet: Fleet) -> None:
    name = f"agent-{fleet.next_id % 500:03}"
    fleet.next_id += 1
    slot = fleet.scheduler.agents[name]
    gpus = [
        GpuSlot(index=g.index, uuid=g.uuid, vram_total_mb=g.vram_total_mb)
        for g in slot.gpus.values()
    ]
    fleet.scheduler.upsert_agent(name, cpu=slot.cpu, ram_mb=slot.ram_mb, gpus=gpus)


def _fleet_change(fleet: Fleet) -> None:
    fleet.next_id += 1
    name = f"agent-{fleet.next_id % 500:03}"
    slot = fleet.scheduler.agents[name]
    fleet.scheduler.set_draining(name, not slot.draining)


CHANGES: dict[str, Callable[[Fleet], None]] = {
    "run ends": _run_ends,
    "run created": _run_created,
    "agent joins": _agent_joins,
    "heartbeat": _heartbeat,
    "fleet change": _fleet_change,
}


def measure(fleet: Fleet, change: Callable[[Fleet], None], repeat: int) -> list[float]:
    """Seconds of each pass after one change."""
    times = []
    for _ in range(repeat):
        change(fleet)
        began = time.perf_counter()
        fleet.scheduler.place()
        times.append(time.perf_counter() - began)
        fleet.scheduler.take_new_reasons()
    return times


def main(argv: Sequence[str] | None = None) -> None:
    """Build the fleet, measure each change with and without a hold, print a table."""
    parser = argparse.ArgumentParser(prog="python -m bench.placement", description=__doc__)
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--pending", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)
    print(f"placement pass, {args.pending} pending runs, {args.agents} busy agents")
    print("| shapes | change | hold in force | median ms | p95 ms |")
    print("| --- | --- | --- | ---: | ---: |")
    plans = [(False, hold, CHANGES) for hold in (False, True)]
    plans.append((True, False, {k: CHANGES[k] for k in ("run ends", "run created")}))
    for distinct, hold, changes in plans:
        label = f"{args.pending:,} distinct" if distinct else f"{len(SHAPES)} mixed"
        first: list[float] = []
        for name, change in changes.items():
            fleet = build(args.agents, args.pending, hold=hold, distinct=distinct)
            first.append(fleet.first_pass_s)
            times = sorted(measure(fleet, change, args.repeat))
            p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
            print(
                f"| {label} | {name} | {'yes' if hold else 'no'} | "
                f"{statistics.median(times) * 1e3:.1f} | {p95 * 1e3:.1f} |"
            )
        print(
            f"| {label} | first pass (every run on every agent) | {'yes' if hold else 'no'} "
            f"| {statistics.median(first) * 1e3:.1f} | {max(first) * 1e3:.1f} |"
        )


if __name__ == "__main__":
    main()
