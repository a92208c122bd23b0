"""The scheduler's promises to GPU users: a GPU asked for is a GPU held, no run starves,
a run goes only where its selector allows, and a run that waits says why."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from gyoza.models.resources import Constraints, PendingReasonCode
from gyoza.models.selectors import LabelSelector
from gyoza.server.scheduler import GpuSlot, Placement, Scheduler

T0 = datetime(2026, 1, 1, tzinfo=UTC)
_clock = itertools.count()


class Clock:
    """A hand-moved clock for the starvation bound."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _gpus(count: int, vram_mb: int) -> list[GpuSlot]:
    return [GpuSlot(index=i, uuid=f"GPU-{i}", vram_total_mb=vram_mb) for i in range(count)]


def _add(s: Scheduler, run_id: str, priority: int = 0, **need: object) -> None:
    s.enqueue(
        run_id,
        1,
        priority,
        T0 + timedelta(seconds=next(_clock)),
        Constraints(**need),  # type: ignore[arg-type]
    )


def _ids(placements: list[Placement]) -> list[str]:
    return [p.run_id for p in placements]


# -- a GPU asked for is a GPU held ---------------------------------------------------------


def test_gpu_without_vram_is_held_whole() -> None:
    s = Scheduler()
    s.upsert_agent("a", cpu=8, ram_mb=8000, gpus=_gpus(1, 81_920))
    _add(s, "first", gpu_count=1)
    _add(s, "second", gpu_count=1)
    _add(s, "sharer", vram_mb=1_000)
    assert _ids(s.place()) == ["first"]
    # Neither another whole-GPU run nor a VRAM-budget run goes on a GPU held whole.
    assert s.pending_reason("second").code is PendingReasonCode.AGENTS_BUSY  # type: ignore[union-attr]
    s.release("first")
    assert _ids(s.place()) == ["second"]
    s.release("second")
    assert _ids(s.place()) == ["sharer"]


def test_gpu_with_vram_budget_is_shared_and_then_not_held_whole() -> None:
    s = Scheduler()
    s.upsert_agent("a", cpu=8, ram_mb=8000, gpus=_gpus(1, 81_920))
    _add(s, "x", gpu_count=1, vram_mb=30_000)
    _add(s, "y", gpu_count=1, vram_mb=30_000)
    _add(s, "whole", gpu_count=1)
    assert _ids(s.place()) == ["x", "y"]
    # A whole-GPU run needs the GPU empty.
    s.release("x")
    assert s.place() == []
    s.release("y")
    assert _ids(s.place()) == ["whole"]


def test_whole_gpu_runs_take_other_gpus_of_the_agent() -> None:
    s = Scheduler()
    s.upsert_agent("a", cpu=8, ram_mb=8000, gpus=_gpus(2, 24_576))
    for name in ("p", "q", "r"):
        _add(s, name, gpu_count=1)
    placed = s.place()
    assert sorted(p.gpu_ids for p in placed) == [(0,), (1,)]
    assert s.pending_ids() == ["r"]


def test_pinned_gpu_without_vram_is_held_whole() -> None:
    s = Scheduler()
    s.upsert_agent("a", cpu=8, ram_mb=8000, gpus=_gpus(2, 24_576))
    _add(s, "pin1", gpu_id=1)
    _add(s, "pin1-again", gpu_id=1)
    _add(s, "pin1-vram", gpu_id=1, vram_mb=1_000)
    _add(s, "other", gpu_count=1)
    placed = {p.run_id: p.gpu_ids for p in s.place()}
    assert placed == {"pin1": (1,), "other": (0,)}
    s.release("pin1")
    assert _ids(s.place()) == ["pin1-again"]


def test_capacity_refresh_keeps_a_whole_gpu_held() -> None:
    s = Scheduler()
    s.upsert_agent("a", cpu=8, ram_mb=8000, gpus=_gpus(1, 24_576))
    _add(s, "whole", gpu_count=1)
    assert len(s.place()) == 1
    s.upsert_agent("a", cpu=8, ram_mb=8000, gpus=_gpus(1, 24_576))
    _add(s, "sharer", vram_mb=100)
    assert s.place() == []


# -- no run starves --------------------------------------------------------------------------


def _starving_fleet(clock: Clock) -> Scheduler:
    s = Scheduler(starvation_s=10, clock=clock)
    s.upsert_agent("a", cpu=2, ram_mb=8000, gpus=[])
    s.upsert_agent("b", cpu=2, ram_mb=8000, gpus=[])
    return s


def test_reservation_after_the_bound_stops_new_runs_on_the_held_agent() -> None:
    clock = Clock()
    s = _starving_fleet(clock)
    s.reserve("a", "busy-a", 1, Constraints(cpu=1), ())
    s.reserve("b", "busy-b1", 1, Constraints(cpu=1), ())
    s.reserve("b", "busy-b2", 1, Constraints(cpu=1), ())
    _add(s, "large", cpu=2)
    for i in range(3):
        _add(s, f"late-{i}", cpu=1)
    # Before the bound: a small run that fits goes ahead of the large one.
    assert [(p.run_id, p.agent) for p in s.place()] == [("late-0", "a")]
    reason = s.pending_reason("large")
    assert reason is not None and reason.code is PendingReasonCode.AGENTS_BUSY
    assert s.wake_at == clock.now + 10
    # Past the bound, an agent is held for the large run.
    clock.now += 10.5
    assert s.place() == []
    assert s.held_agent == ("a", "large")
    reason = s.pending_reason("large")
    assert reason is not None and reason.code is PendingReasonCode.MAKING_ROOM
    assert "agent a" in reason.message
    # Room frees on the held agent: the small runs waiting do not take it...
    s.release("busy-a")
    assert s.place() == []
    # ...but keep going on the other agent.
    s.release("busy-b1")
    assert [(p.run_id, p.agent) for p in s.place()] == [("late-1", "b")]
    # Once the runs it waited for end, the large run starts on the held agent.
    s.release("late-0")
    assert [(p.run_id, p.agent) for p in s.place()] == [("large", "a")]


def test_higher_priority_runs_arriving_later_do_not_take_the_held_agent() -> None:
    clock = Clock()
    s = Scheduler(starvation_s=5, clock=clock)
    s.upsert_agent("a", cpu=4, ram_mb=8000, gpus=[])
    _add(s, "busy", cpu=3)
    s.place()
    _add(s, "large", priority=5, cpu=4)
    s.place()
    clock.now += 6
    s.place()
    assert s.held_agent == ("a", "large")
    _add(s, "urgent-small", priority=9, cpu=1)
    assert s.place() == []
    s.release("busy")
    assert _ids(s.place()) == ["large"]
    s.release("large")
    assert _ids(s.place()) == ["urgent-small"]


def test_hold_goes_to_the_agent_with_the_fewest_runs_in_the_way() -> None:
    clock = Clock()
    s = Scheduler(starvation_s=0, clock=clock)
    s.upsert_agent("crowded", cpu=4, ram_mb=8000, gpus=[])
    s.upsert_agent("quiet", cpu=4, ram_mb=8000, gpus=[])
    s.reserve("crowded", "c1", 1, Constraints(cpu=1), ())
    s.reserve("crowded", "c2", 1, Constraints(cpu=1), ())
    s.reserve("crowded", "c3", 1, Constraints(cpu=1), ())
    s.reserve("quiet", "q1", 1, Constraints(cpu=2), ())
    _add(s, "large", cpu=4)
    s.place()
    assert s.held_agent == ("quiet", "large")


def test_whole_gpu_run_gets_a_held_gpu_agent_with_pins_elsewhere() -> None:
    clock = Clock()
    s = Scheduler(starvation_s=1, clock=clock)
    s.upsert_agent("g", cpu=16, ram_mb=64_000, gpus=_gpus(1, 81_920))
    s.upsert_agent("cpu-only", cpu=16, ram_mb=64_000, gpus=[])
    _add(s, "sharer", vram_mb=10_000)
    s.place()
    _add(s, "whole", gpu_count=1)
    clock.now += 2
    s.place()
    assert s.held_agent == ("g", "whole")
    # VRAM-budget runs (even pinned) wait; CPU-only runs go to the other agent.
    _add(s, "pinned-sharer", vram_mb=1_000, gpu_id=0)
    _add(s, "cpu-run", cpu=1)
    assert [(p.run_id, p.agent) for p in s.place()] == [("cpu-run", "cpu-only")]
    s.release("sharer")
    assert _ids(s.place()) == ["whole"]


def test_unschedulable_run_gets_no_hold() -> None:
    clock = Clock()
    s = Scheduler(starvation_s=0, clock=clock)
    s.upsert_agent("a", cpu=2, ram_mb=8000, gpus=[])
    _add(s, "huge", cpu=64)
    _add(s, "small", cpu=1)
    assert _ids(s.place()) == ["small"]
    assert s.held_agent is None


def test_hold_is_dropped_when_the_agent_leaves() -> None:
    clock = Clock()
    s = Scheduler(starvation_s=0, clock=clock)
    s.upsert_agent("a", cpu=2, ram_mb=8000, gpus=[])
    s.upsert_agent("b", cpu=2, ram_mb=8000, gpus=[])
    s.reserve("a", "x", 1, Constraints(cpu=1), ())
    s.reserve("b", "y", 1, Constraints(cpu=1), ())
    s.reserve("b", "y2", 1, Constraints(cpu=1), ())
    _add(s, "large", cpu=2)
    s.place()
    assert s.held_agent == ("a", "large")
    s.set_connected("a", False)
    s.release("y")
    s.release("y2")
    assert [(p.run_id, p.agent) for p in s.place()] == [("large", "b")]


# -- selectors ---------------------------------------------------------------------------------


def test_selector_limits_where_a_run_goes() -> None:
    s = Scheduler()
    s.upsert_agent("scripted", cpu=64, ram_mb=64_000, gpus=[], labels={"executor": "scripted"})
    s.upsert_agent(
        "docker", cpu=2, ram_mb=4000, gpus=[], labels={"executor": "docker", "zone": "eu-1"}
    )
    _add(s, "d", cpu=1, selector="executor=docker")
    _add(s, "not-eu", cpu=1, selector="zone != eu-1")
    _add(s, "in", cpu=1, selector="executor in (docker, podman), zone notin (us-1)")
    placed = {p.run_id: p.agent for p in s.place()}
    assert placed == {"d": "docker", "not-eu": "scripted", "in": "docker"}


def test_selector_nobody_matches_says_so() -> None:
    s = Scheduler()
    s.upsert_agent("a", cpu=4, ram_mb=4000, gpus=[], labels={"executor": "scripted"})
    _add(s, "h100", selector="gpu.model = NVIDIA H100 80GB HBM3")
    assert s.place() == []
    reason = s.pending_reason("h100")
    assert reason is not None
    assert reason.code is PendingReasonCode.SELECTOR_UNMATCHED
    assert reason.message == "no agent matches selector gpu.model=NVIDIA H100 80GB HBM3"
    s.upsert_agent("b", cpu=4, ram_mb=4000, gpus=[], labels={"gpu.model": "NVIDIA H100 80GB HBM3"})
    assert _ids(s.place()) == ["h100"]


def test_shape_pruning_does_not_cross_selectors() -> None:
    s = Scheduler()
    s.upsert_agent("a", cpu=4, ram_mb=4000, gpus=[], labels={"pool": "x"})
    _add(s, "nowhere", cpu=1, selector="pool=y")
    _add(s, "here", cpu=2, selector="pool=x")
    assert _ids(s.place()) == ["here"]


# -- pending reasons ----------------------------------------------------------------------------


def _reason(s: Scheduler, run_id: str) -> tuple[PendingReasonCode, str]:
    reason = s.pending_reason(run_id)
    assert reason is not None
    return reason.code, reason.message


def test_reasons_in_words_and_codes() -> None:
    s = Scheduler()
    _add(s, "any", cpu=1)
    s.place()
    assert _reason(s, "any") == (PendingReasonCode.NO_AGENT, "no connected agent takes work")
    s.upsert_agent("a", cpu=2, ram_mb=4000, gpus=[])
    s.upsert_agent("g", cpu=2, ram_mb=4000, gpus=_gpus(2, 24_576))
    s.reserve("a", "busy-a", 1, Constraints(cpu=2), ())
    s.reserve("g", "busy-g", 1, Constraints(cpu=2), ())
    _add(s, "cpu", cpu=64)
    _add(s, "ram", ram_mb=100_000)
    _add(s, "gpus", gpu_count=4)
    _add(s, "vram", vram_mb=30_000)
    _add(s, "pin", gpu_id=7)
    _add(s, "mix", cpu=2, gpu_count=1, ram_mb=4000)
    _add(s, "busy", cpu=1)
    s.place()
    assert _reason(s, "cpu") == (
        PendingReasonCode.INSUFFICIENT_CPU,
        "needs 64 CPU; the largest agent has 2",
    )
    assert _reason(s, "ram")[0] is PendingReasonCode.INSUFFICIENT_RAM
    assert _reason(s, "gpus") == (
        PendingReasonCode.INSUFFICIENT_GPU,
        "needs 4 GPUs; the most on one agent is 2",
    )
    assert _reason(s, "vram") == (
        PendingReasonCode.INSUFFICIENT_VRAM,
        "needs 30000 MB VRAM on one GPU; the largest GPU has 24576 MB",
    )
    assert _reason(s, "pin")[0] is PendingReasonCode.GPU_NOT_FOUND
    assert _reason(s, "mix")[0] is PendingReasonCode.AGENTS_BUSY
    assert _reason(s, "busy") == (
        PendingReasonCode.AGENTS_BUSY,
        "every agent that could take it is busy",
    )
    assert s.unschedulable_count == 5


def test_no_gpu_anywhere() -> None:
    s = Scheduler()
    s.upsert_agent("a", cpu=2, ram_mb=4000, gpus=[])
    _add(s, "g", gpu_count=1)
    s.place()
    assert _reason(s, "g") == (
        PendingReasonCode.INSUFFICIENT_GPU,
        "needs 1 GPU; no agent has a GPU",
    )


def test_no_single_agent_fits() -> None:
    s = Scheduler()
    s.upsert_agent("cpus", cpu=64, ram_mb=4000, gpus=[])
    s.upsert_agent("gpus", cpu=2, ram_mb=4000, gpus=_gpus(1, 24_576))
    _add(s, "both", cpu=32, gpu_count=1)
    s.place()
    assert _reason(s, "both")[0] is PendingReasonCode.NO_SINGLE_AGENT_FITS


def test_each_reason_code_is_handed_out_once_per_attempt() -> None:
    s = Scheduler()
    s.upsert_agent("a", cpu=2, ram_mb=4000, gpus=[])
    _add(s, "big", cpu=8)
    s.place()
    assert [(r, c.code) for r, _, c in s.take_new_reasons()] == [
        ("big", PendingReasonCode.INSUFFICIENT_CPU)
    ]
    for _ in range(3):
        s.place()
    assert s.take_new_reasons() == []
    # The fleet changes: the reason is updated, and a new code is recorded once.
    s.upsert_agent("b", cpu=8, ram_mb=4000, gpus=[])
    s.reserve("b", "other", 1, Constraints(cpu=1), ())
    s.place()
    s.place()
    assert [c.code for _, _, c in s.take_new_reasons()] == [PendingReasonCode.AGENTS_BUSY]
    assert _reason(s, "big")[0] is PendingReasonCode.AGENTS_BUSY
    # A new attempt starts afresh.
    s.enqueue("big", 2, 0, T0, Constraints(cpu=8))
    s.place()
    assert [(a, c.code) for _, a, c in s.take_new_reasons()] == [(2, PendingReasonCode.AGENTS_BUSY)]


# -- incremental passes -----------------------------------------------------------------------


def _fits_now(s: Scheduler, need: Constraints, agent: str) -> bool:
    """Brute force: could the run be placed on this agent right now?"""
    from gyoza.server.scheduler import _pick_gpus

    slot = s.agents[agent]
    return (
        slot.accepts_work
        and slot.cpu - slot.cpu_reserved >= need.cpu - 1e-9
        and slot.ram_mb - slot.ram_reserved_mb >= need.ram_mb
        and LabelSelector.parse(need.selector).matches(slot.labels)
        and _pick_gpus(slot, need) is not None
    )


def test_incremental_passes_leave_no_run_that_fits() -> None:
    """After any sequence of changes, each pass leaves no queued run that fits on an
    agent (the held one aside) and over-commits nothing, although it searches only what
    changed."""
    import random

    shapes = [
        Constraints(cpu=1),
        Constraints(cpu=2, ram_mb=2000),
        Constraints(gpu_count=1),
        Constraints(vram_mb=20_000),
        Constraints(vram_mb=50_000, cpu=1),
        Constraints(gpu_count=2, vram_mb=10_000),
        Constraints(gpu_id=1),
        Constraints(cpu=1, selector="pool=b"),
        Constraints(cpu=6),
    ]
    for seed in range(20):
        rng = random.Random(seed)
        clock = Clock()
        s = Scheduler(starvation_s=5, clock=clock)
        names = [f"a{i}" for i in range(5)]
        for i, name in enumerate(names):
            s.upsert_agent(
                name,
                cpu=4 + i,
                ram_mb=8000,
                gpus=_gpus(i % 3, 81_920 if i % 2 else 24_576),
                labels={"pool": "ab"[i % 2]},
            )
        placed: list[str] = []
        for step in range(300):
            action = rng.random()
            clock.now += rng.random()
            if action < 0.45:
                shape = rng.choice(shapes)
                _add(s, f"r{seed}-{step}", priority=rng.choice((0, 0, 1)), **shape.to_dict())
            elif action < 0.8 and placed:
                s.release(placed.pop(rng.randrange(len(placed))))
            elif action < 0.9:
                name = rng.choice(names)
                s.set_draining(name, rng.random() < 0.3)
            else:
                name = rng.choice(names)
                s.set_connected(name, rng.random() < 0.8)
            placed += [p.run_id for p in s.place()]
            held = s.held_agent
            for run_id in s.pending_ids():
                entry = s._pending[run_id]
                for name in names:
                    if held is not None and name == held[0] and run_id != held[1]:
                        continue
                    assert not _fits_now(s, entry.constraints, name), (seed, step, run_id, name)
                assert s.pending_reason(run_id) is not None
            for slot in s.agents.values():
                assert slot.cpu_reserved <= slot.cpu + 1e-9 or not slot.connected
                for gpu in slot.gpus.values():
                    assert gpu.whole_count <= 1
                    assert gpu.whole_count == 0 or gpu.run_count == 1


def test_more_free_vram_reported_is_searched_again() -> None:
    s = Scheduler()
    gpu = GpuSlot(index=0, vram_total_mb=80_000, vram_free_reported_mb=10_000)
    s.upsert_agent("a", cpu=8, ram_mb=8000, gpus=[gpu])
    _add(s, "r", vram_mb=20_000)
    assert s.place() == []
    # Less free VRAM reported: nothing to search; more: the run fits now.
    s.upsert_agent(
        "a", cpu=8, ram_mb=8000, gpus=[GpuSlot(0, vram_total_mb=80_000, vram_free_reported_mb=5)]
    )
    assert s.place() == []
    s.upsert_agent(
        "a",
        cpu=8,
        ram_mb=8000,
        gpus=[GpuSlot(0, vram_total_mb=80_000, vram_free_reported_mb=30_000)],
    )
    assert _ids(s.place()) == ["r"]
