"""Placement rules of the scheduler (pure, no I/O)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from gyoza.models.resources import Constraints
from gyoza.server.scheduler import GpuSlot, Scheduler

T0 = datetime(2026, 1, 1, tzinfo=UTC)
_clock = itertools.count()


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


def _fleet() -> Scheduler:
    s = Scheduler()
    s.upsert_agent("big", cpu=64, ram_mb=512_000, gpus=_gpus(2, 81_920))
    s.upsert_agent("small", cpu=32, ram_mb=256_000, gpus=_gpus(4, 24_576))
    return s


def test_vram_is_a_budget_per_gpu_never_over_reserved() -> None:
    s = _fleet()
    for i in range(20):
        _add(s, f"r{i}", vram_mb=30_000)
    placed = s.place()
    # 80G GPUs take two 30G runs each; 24G GPUs take none.
    assert len(placed) == 4
    assert {p.agent for p in placed} == {"big"}
    for agent in s.agents.values():
        for gpu in agent.gpus.values():
            assert gpu.vram_reserved_mb <= gpu.vram_total_mb
    assert s.queue_depth == 16


def test_two_runs_share_a_gpu_only_while_vram_fits() -> None:
    s = Scheduler()
    s.upsert_agent("a", cpu=8, ram_mb=8000, gpus=_gpus(1, 24_000))
    _add(s, "x", vram_mb=10_000)
    _add(s, "y", vram_mb=10_000)
    _add(s, "z", vram_mb=10_000)
    placed = s.place()
    assert [p.run_id for p in placed] == ["x", "y"]
    assert all(p.gpu_ids == (0,) for p in placed)
    s.release("x")
    assert [p.run_id for p in s.place()] == ["z"]


def test_priority_first_then_fifo() -> None:
    s = Scheduler()
    _add(s, "low-1", priority=0)
    _add(s, "high", priority=5)
    _add(s, "low-2", priority=0)
    _add(s, "mid", priority=3)
    assert s.pending_ids() == ["high", "mid", "low-1", "low-2"]
    s.reprioritize("low-2", 9)
    assert s.pending_ids()[0] == "low-2"


def test_run_that_fits_nowhere_waits_and_smaller_pass() -> None:
    s = _fleet()
    _add(s, "huge", priority=10, vram_mb=100_000)
    _add(s, "tiny", priority=0, vram_mb=1_000)
    placed = s.place()
    assert [p.run_id for p in placed] == ["tiny"]
    assert s.pending_ids() == ["huge"]


def test_pinned_gpu_is_honoured() -> None:
    s = _fleet()
    _add(s, "pinned", vram_mb=1_000, gpu_id=3)
    (placement,) = s.place()
    assert placement.agent == "small"
    assert placement.gpu_ids == (3,)
    assert placement.gpu_uuids == ("GPU-3",)


def test_best_fit_prefers_the_tightest_gpu() -> None:
    s = _fleet()
    _add(s, "fits-small", vram_mb=20_000)
    (placement,) = s.place()
    assert placement.agent == "small"


def test_multi_gpu_runs_need_that_many_fitting_gpus() -> None:
    s = _fleet()
    _add(s, "four", gpu_count=4, vram_mb=20_000)
    _add(s, "three-big", gpu_count=3, vram_mb=40_000)
    placed = {p.run_id: p for p in s.place()}
    assert placed["four"].gpu_ids == (0, 1, 2, 3)
    assert "three-big" not in placed


def test_cpu_and_ram_are_never_over_committed() -> None:
    s = Scheduler()
    s.upsert_agent("a", cpu=4, ram_mb=4096, gpus=[])
    for i in range(5):
        _add(s, f"r{i}", cpu=1.5, ram_mb=1000)
    assert len(s.place()) == 2
    slot = s.agents["a"]
    assert slot.cpu_reserved <= slot.cpu and slot.ram_reserved_mb <= slot.ram_mb


def test_draining_and_disconnected_agents_take_nothing() -> None:
    s = _fleet()
    s.set_draining("big", True)
    s.set_connected("small", False)
    _add(s, "r", vram_mb=1)
    assert s.place() == []
    s.set_connected("small", True)
    assert [p.agent for p in s.place()] == ["small"]


def test_unhealthy_gpu_takes_no_runs() -> None:
    s = Scheduler()
    gpus = _gpus(1, 80_000)
    gpus[0].healthy = False
    s.upsert_agent("a", cpu=8, ram_mb=8000, gpus=gpus)
    _add(s, "r", vram_mb=1)
    assert s.place() == []


def test_reported_free_vram_caps_the_budget() -> None:
    s = Scheduler()
    gpu = GpuSlot(index=0, vram_total_mb=80_000, vram_free_reported_mb=10_000)
    s.upsert_agent("a", cpu=8, ram_mb=8000, gpus=[gpu])
    _add(s, "r", vram_mb=20_000)
    assert s.place() == []


def test_capacity_refresh_keeps_reservations() -> None:
    s = Scheduler()
    s.upsert_agent("a", cpu=8, ram_mb=8000, gpus=_gpus(1, 24_000))
    _add(s, "x", vram_mb=20_000)
    assert len(s.place()) == 1
    s.upsert_agent("a", cpu=8, ram_mb=8000, gpus=_gpus(1, 24_000))
    assert s.agents["a"].gpus[0].vram_reserved_mb == 20_000
    _add(s, "y", vram_mb=20_000)
    assert s.place() == []


def test_avoided_agent_is_skipped() -> None:
    s = _fleet()
    s.enqueue("r", 2, 0, T0, Constraints(vram_mb=20_000), frozenset({"small"}))
    (placement,) = s.place()
    assert placement.agent == "big"
