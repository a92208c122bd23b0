"""One contract for every store: SQLite (a file), PostgreSQL and InMemoryStore.

pytest-asyncio is not used: each test runs its body with ``asyncio.run`` through
:func:`run_with`, which opens the store inside that loop and closes it after.
"""

from __future__ import annotations

import asyncio
import copy
import functools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from gyoza.models import (
    AlreadyExists,
    EventDelivery,
    EventEntry,
    InputSpec,
    InputType,
    NotFound,
    OpDefinition,
    OpRun,
    OpRunState,
    RunNotFinished,
)
from gyoza.models.outputs import OutputSpec
from gyoza.server.store import InMemoryStore, LogRecord, RunFilter, Store, TopicRecord
from gyoza.server.store.records import AgentDrain
from gyoza.server.store.tables import metadata

T = TypeVar("T")
AnyStore = Store | InMemoryStore
Changes = list[tuple[int, EventEntry]]

BASE = datetime(2026, 1, 1, tzinfo=UTC)


class StoreFactory:
    """Opens the backend under test; for SQL backends every call opens the same database."""

    def __init__(self, backend: str, url: str | None) -> None:
        self.backend = backend
        self.url = url

    def __call__(self, *, log_retention: int = 10_000) -> AnyStore:
        if self.url is None:
            return InMemoryStore(log_retention=log_retention)
        return Store.open(self.url, log_retention=log_retention)


SQL_BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


def _factory(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    if backend == "sqlite":
        return StoreFactory(backend, f"sqlite:///{tmp_path / 'data' / 'gyoza.db'}")
    if backend == "postgres":
        return StoreFactory(backend, request.getfixturevalue("fresh_pg_database"))
    return StoreFactory(backend, None)


@pytest.fixture(params=[*SQL_BACKENDS, pytest.param("memory", id="memory")])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Opens the store under test: a SQLite file, a fresh PostgreSQL database, memory."""
    return _factory(request.param, request, tmp_path)


@pytest.fixture(params=SQL_BACKENDS)
def make_sql_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Like make_store, for what only a database has (a schema, a second client)."""
    return _factory(request.param, request, tmp_path)


def run_with(
    make_store: StoreFactory,
    body: Callable[[AnyStore], Awaitable[T]],
    *,
    log_retention: int = 10_000,
) -> T:
    """Open a store, run ``body(store)`` in a new event loop, close the store."""

    async def main() -> T:
        store = make_store(log_retention=log_retention)
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


# ----------------------------------------------------------------------
# Building runs
# ----------------------------------------------------------------------


def new_run(
    n: int = 0,
    *,
    image: str = "busybox:latest",
    topic: str = "",
    op_definition: str | None = None,
    request_id: str | None = None,
    created: datetime | None = None,
) -> OpRun:
    run = OpRun.create(
        image,
        priority=n % 3,
        inputs={"n": n, "nested": {"list": [1, 2.5, None, True, "ü"]}},
        event_delivery=EventDelivery(topic=topic, attributes={"team": "vision"} if topic else {}),
        op_definition=op_definition,
        op_definition_version=1 if op_definition else None,
        request_id=request_id,
    )
    if created is not None:
        run.created_at = run.updated_at = created
    return run


def change(run: OpRun, action: Callable[[OpRun], object]) -> Changes:
    """Apply *action* and return the (attempt, event) pairs it added, as the server does."""
    marks = {a.attempt: len(a.events) for a in run.attempts}
    action(run)
    return [(a.attempt, e) for a in run.attempts for e in a.events[marks.get(a.attempt, 0) :]]


def assign_and_start(run: OpRun) -> None:
    run.assign("agent-1", [0])
    run.add_event("STARTED", "container up", {"worker_id": "agent-1", "gpu_id": 0})


def fail(run: OpRun) -> None:
    run.add_event(
        "FAILED", "exit 3", {"error_message": "boom", "failure_class": "EXIT_CODE", "exit_code": 3}
    )


def without_events(data: dict[str, Any]) -> dict[str, Any]:
    stripped = copy.deepcopy(data)
    stripped["events"] = []
    for attempt in stripped["attempts"]:
        attempt["events"] = []
    return stripped


async def saved(store: AnyStore, run: OpRun, action: Callable[[OpRun], object]) -> Changes:
    new = change(run, action)
    await store.save_run(run, new)
    return new


# ----------------------------------------------------------------------
# Definitions
# ----------------------------------------------------------------------


def definition(name: str, image: str = "busybox:latest") -> OpDefinition:
    return OpDefinition(
        name=name,
        image=image,
        description="adds numbers",
        inputs=[
            InputSpec("a", InputType.INT, required=True),
            InputSpec("b", InputType.FLOAT, default=1.5, description="second"),
        ],
        event_delivery=EventDelivery(topic="sums", attributes={"x": "1"}),
    )


def test_definitions_are_versioned_per_name(make_store: StoreFactory) -> None:
    async def body(store: AnyStore) -> None:
        first = await store.create_definition(definition("adder", "img:1"))
        second = await store.create_definition(definition("adder", "img:2"))
        other = await store.create_definition(definition("other"))
        assert (first.version, second.version, other.version) == (1, 2, 1)
        assert first.created_at.tzinfo is not None
        assert first.created_at.utcoffset() == timedelta(0)

        latest = await store.get_definition("adder")
        assert latest.to_dict() == second.to_dict()
        assert (await store.get_definition("adder", 1)).to_dict() == first.to_dict()
        assert (await store.get_definition("adder", 1)).image == "img:1"
        with pytest.raises(NotFound):
            await store.get_definition("adder", 3)
        with pytest.raises(NotFound):
            await store.get_definition("missing")

        # Deleting the newest version: the older one is the latest again, and the next
        # create does not reuse the deleted number.
        assert await store.delete_definition("adder", 2) == 1
        assert (await store.get_definition("adder")).version == 1
        assert (await store.create_definition(definition("adder"))).version == 3
        with pytest.raises(NotFound):
            await store.delete_definition("adder", 2)

        assert await store.delete_definition("adder") == 2
        with pytest.raises(NotFound):
            await store.get_definition("adder")
        with pytest.raises(NotFound):
            await store.delete_definition("adder")
        assert (await store.get_definition("other")).version == 1

    run_with(make_store, body)


def test_definitions_list_latest_by_name_and_versions_newest_first(
    make_store: StoreFactory,
) -> None:
    async def body(store: AnyStore) -> None:
        for name, versions in [("op-c", 3), ("op-a", 1), ("op-e", 2), ("op-b", 1), ("op-d", 1)]:
            for _ in range(versions):
                await store.create_definition(definition(name))

        pages: list[list[tuple[str, int]]] = []
        token = ""
        while True:
            page, token = await store.list_definitions(page_size=2, page_token=token)
            pages.append([(d.name, d.version) for d in page])
            if not token:
                break
        assert pages == [
            [("op-a", 1), ("op-b", 1)],
            [("op-c", 3), ("op-d", 1)],
            [("op-e", 2)],
        ]

        page, token = await store.list_definitions(name="op-c", page_size=2)
        assert [d.version for d in page] == [3, 2]
        rest, last = await store.list_definitions(name="op-c", page_size=2, page_token=token)
        assert [d.version for d in rest] == [1]
        assert last == ""
        assert (await store.list_definitions(name="nothing")) == ([], "")

        full, _ = await store.list_definitions(name="op-c", page_size=1)
        assert full[0].to_dict() == (await store.get_definition("op-c")).to_dict()

        with pytest.raises(ValueError):
            await store.list_definitions(page_token="not a token")
        with pytest.raises(ValueError):  # a token of another listing
            await store.list_definitions(page_size=2, page_token=token)
        with pytest.raises(ValueError):
            await store.list_definitions(name="op-e", page_token=token)
        with pytest.raises(ValueError):
            await store.list_definitions(page_size=0)

    run_with(make_store, body)


# ----------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------


def test_run_with_several_attempts_round_trips_exactly(make_store: StoreFactory) -> None:
    async def body(store: AnyStore) -> None:
        run = new_run(7, topic="t", op_definition="adder", request_id="req-7")
        run.output_specs = [OutputSpec("answer", InputType.INT, required=True)]
        await store.create_run(run)
        assert (await store.get_run(run.id)).to_dict() == run.to_dict()

        await saved(store, run, lambda r: r.assign("agent-1", [0, 1]))
        await saved(
            store,
            run,
            lambda r: r.apply_report(
                1, 1, "STARTED", "up", {"worker_id": "agent-1", "gpu_id": 1}, at=BASE
            ),
        )

        def progress(r: OpRun) -> None:
            r.add_event("PROGRESS", 40)
            r.add_event("INFO", "halfway", {"deep": {"a": [1, 2.5, None, False]}, "ü": "✓"})

        await saved(store, run, progress)

        def fail_and_schedule(r: OpRun) -> None:
            fail(r)
            r.schedule_auto_retry()

        await saved(store, run, fail_and_schedule)
        assert run.next_retry_at is not None
        assert (await store.get_run(run.id)).to_dict() == run.to_dict()

        await saved(store, run, lambda r: r.retry(reason="flaky"))
        await saved(store, run, assign_and_start)

        def complete(r: OpRun) -> None:
            r.add_event("PROGRESS", 100)
            r.add_event("COMPLETED", "done", {"outputs": {"answer": 42, "text": "héllo ✓"}})

        await saved(store, run, complete)

        loaded = await store.get_run(run.id)
        assert len(loaded.attempts) == 2
        assert loaded.to_dict() == run.to_dict()
        assert loaded.attempts[0].events[2].msg == 40  # an int stays an int
        started = loaded.attempts[0].events[1]
        assert (started.t, started.applied_at is not None) == (BASE, True)
        assert loaded.output_specs == run.output_specs
        assert loaded.created_at.utcoffset() == timedelta(0)
        by_request = await store.get_run_by_request_id("req-7")
        assert by_request is not None
        assert by_request.to_dict() == run.to_dict()

        every = await store.list_events(run.id)
        assert [(a, e.to_dict()) for a, e in every] == [
            (a.attempt, e.to_dict()) for a in run.attempts for e in a.events
        ]
        second = await store.list_events(run.id, attempt=2)
        assert [e.seq for _, e in second] == [e.seq for e in run.attempts[1].events]
        after = await store.list_events(run.id, after=(1, 3), limit=3)
        assert [(a, e.seq) for a, e in after] == [(1, 4), (1, 5), (2, 1)]
        assert await store.list_events("run_missing") == []

        with pytest.raises(NotFound):
            await store.get_run("run_missing")

    run_with(make_store, body)


def test_request_id_and_run_id_are_unique(make_store: StoreFactory) -> None:
    async def body(store: AnyStore) -> None:
        first = new_run(1, request_id="req-1")
        await store.create_run(first)
        with pytest.raises(AlreadyExists):
            await store.create_run(new_run(2, request_id="req-1"))
        with pytest.raises(AlreadyExists):
            await store.create_run(first)
        # save_run cannot take a request id either.
        thief = new_run(3, request_id="req-1")
        with pytest.raises(AlreadyExists):
            await store.save_run(thief, [])
        with pytest.raises(NotFound):
            await store.get_run(thief.id)

        found = await store.get_run_by_request_id("req-1")
        assert found is not None
        assert found.id == first.id
        assert await store.get_run_by_request_id("req-2") is None
        # Runs without a request id do not collide.
        await store.create_run(new_run(4))
        await store.create_run(new_run(5))

    run_with(make_store, body)


def _filter_fixture() -> list[OpRun]:
    """Seven runs, one a second from BASE, in different states."""
    runs = [
        new_run(0, image="img-a", op_definition="d1", created=BASE),
        new_run(1, image="img-b", created=BASE + timedelta(seconds=1)),
        new_run(2, image="img-a", op_definition="d1", created=BASE + timedelta(seconds=2)),
        new_run(3, image="img-b", op_definition="d2", created=BASE + timedelta(seconds=3)),
        new_run(4, image="img-a", created=BASE + timedelta(seconds=4)),
        new_run(5, image="img-b", created=BASE + timedelta(seconds=5)),
        new_run(6, image="img-a", created=BASE + timedelta(seconds=6)),
    ]
    assign_and_start(runs[1])  # RUNNING
    assign_and_start(runs[2])
    runs[2].add_event("COMPLETED", "ok", {"outputs": {}})
    assign_and_start(runs[3])
    fail(runs[3])  # FAILED, no retry
    runs[4].request_cancel("no")  # CANCELLED
    assign_and_start(runs[5])
    fail(runs[5])
    runs[5].schedule_auto_retry(BASE)  # FAILED, retry due
    runs[6].assign("agent-2")  # ASSIGNED
    return runs


def test_list_runs_filters(make_store: StoreFactory) -> None:
    async def body(store: AnyStore) -> None:
        runs = _filter_fixture()
        for run in runs:
            await store.create_run(run)

        async def ids(f: RunFilter) -> list[int]:
            page, token = await store.list_runs(f, page_size=50)
            assert token == ""
            return [runs.index(next(r for r in runs if r.id == p.id)) for p in page]

        assert await ids(RunFilter()) == [6, 5, 4, 3, 2, 1, 0]
        assert await ids(RunFilter(oldest_first=True)) == [0, 1, 2, 3, 4, 5, 6]
        assert await ids(RunFilter(states=(OpRunState.PENDING, OpRunState.RUNNING))) == [1, 0]
        assert await ids(RunFilter(states=(OpRunState.FAILED,))) == [5, 3]
        assert await ids(RunFilter(op_definition="d1")) == [2, 0]
        assert await ids(RunFilter(image="img-a")) == [6, 4, 2, 0]
        after = BASE + timedelta(seconds=2)
        assert await ids(RunFilter(created_after=after)) == [6, 5, 4, 3, 2]
        assert await ids(RunFilter(created_before=after)) == [1, 0]
        assert await ids(
            RunFilter(
                image="img-a",
                created_after=BASE + timedelta(seconds=1),
                created_before=BASE + timedelta(seconds=6),
                oldest_first=True,
            )
        ) == [2, 4]
        assert await ids(RunFilter(image="img-z")) == []

        # Listed runs carry their attempts but no events.
        page, _ = await store.list_runs(RunFilter(), page_size=50)
        by_id = {r.id: r for r in runs}
        for listed in page:
            assert all(not a.events for a in listed.attempts)
            assert listed.to_dict() == without_events(by_id[listed.id].to_dict())

    run_with(make_store, body)


def test_list_runs_paging_stays_correct_while_runs_are_created(
    make_store: StoreFactory,
) -> None:
    async def body(store: AnyStore) -> None:
        # 20 runs; four of them share a creation time, so the id breaks the tie.
        originals = [new_run(i, created=BASE + timedelta(seconds=min(i, 10))) for i in range(14)]
        originals += [new_run(i, created=BASE + timedelta(seconds=i)) for i in range(14, 20)]
        for run in originals:
            await store.create_run(run)
        newer = 0

        async def create_newer() -> None:
            nonlocal newer
            newer += 1
            await store.create_run(new_run(100 + newer, created=BASE + timedelta(hours=newer)))
            # And one created "in the past", as a clock step back would.

        for oldest_first in (False, True):
            f = RunFilter(oldest_first=oldest_first)
            seen: list[str] = []
            token = ""
            while True:
                page, token = await store.list_runs(f, page_size=6, page_token=token)
                seen.extend(r.id for r in page)
                await create_newer()
                if not token:
                    break
            assert len(seen) == len(set(seen)), "a run was listed twice"
            original_ids = [r.id for r in originals]
            key = {r.id: (r.created_at, r.id) for r in originals}
            expected = sorted(original_ids, key=key.__getitem__, reverse=not oldest_first)
            assert [i for i in seen if i in key] == expected
            if not oldest_first:
                assert len(seen) == 20  # newer runs sort before the cursor: not listed

        page, token = await store.list_runs(RunFilter(), page_size=3)
        with pytest.raises(ValueError):  # a token used with other filters
            await store.list_runs(RunFilter(image="x"), page_size=3, page_token=token)
        with pytest.raises(ValueError):
            await store.list_runs(RunFilter(), page_token="garbage!")
        with pytest.raises(ValueError):
            await store.list_runs(RunFilter(), page_size=0)

    run_with(make_store, body)


def test_load_active_runs(make_store: StoreFactory) -> None:
    async def body(store: AnyStore) -> None:
        runs = _filter_fixture()
        for run in runs:
            await store.create_run(run)
        active = await store.load_active_runs()
        # PENDING, RUNNING, FAILED awaiting a retry, ASSIGNED; oldest first, in full.
        assert [r.id for r in active] == [runs[i].id for i in (0, 1, 5, 6)]
        for loaded in active:
            original = next(r for r in runs if r.id == loaded.id)
            assert loaded.to_dict() == original.to_dict()

    run_with(make_store, body)


def test_timestamps_come_back_aware_utc(make_store: StoreFactory) -> None:
    async def body(store: AnyStore) -> None:
        plus_two = timezone(timedelta(hours=2))
        run = new_run(1, created=datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=plus_two))
        await store.create_run(run)
        loaded = await store.get_run(run.id)
        assert loaded.created_at == run.created_at
        assert loaded.created_at.utcoffset() == timedelta(0)
        assert loaded.created_at.hour == 10
        assert loaded.created_at.microsecond == 123456

        naive = new_run(2)
        naive.created_at = datetime(2026, 3, 1, 12, 0)  # naive: refused
        with pytest.raises(ValueError):
            await store.create_run(naive)

    run_with(make_store, body)


# ----------------------------------------------------------------------
# Writes: atomicity and group commit
# ----------------------------------------------------------------------


def test_failing_save_run_leaves_nothing_half_written(make_store: StoreFactory) -> None:
    async def body(store: AnyStore) -> None:
        run = new_run(1, topic="t")
        other = new_run(2, topic="t")
        await store.create_run(run)
        await store.create_run(other)
        first = await saved(store, run, lambda r: r.assign("agent-1"))
        stored_before = run.to_dict()
        offset_before = await store.latest_offset()

        # The run moves on (RUNNING, two new events) but one event repeats seq 1: the
        # run row, its attempt and the good event must all stay as they were.
        new = change(run, lambda r: r.add_event("STARTED", "up", {"worker_id": "agent-1"}))
        new.append((1, EventEntry(t=BASE, type="INFO", msg="again", seq=first[0][1].seq)))
        fine = change(other, lambda r: r.assign("agent-2"))
        bad_result, good_result = await asyncio.gather(
            store.save_run(run, new), store.save_run(other, fine), return_exceptions=True
        )
        assert isinstance(bad_result, AlreadyExists)
        assert isinstance(good_result, list)
        assert [r.event.seq for r in good_result] == [1]

        assert (await store.get_run(run.id)).to_dict() == stored_before
        assert (await store.get_run(other.id)).to_dict() == other.to_dict()
        topic = await store.read_topic("t", after_offset=offset_before)
        assert [(r.run_id, r.event.seq) for r in topic] == [(other.id, 1)]

        # An event for an attempt the run does not have is refused too.
        ghost = EventEntry(t=BASE, type="INFO", msg="ghost", seq=1)
        with pytest.raises(ValueError):
            await store.save_run(run, [(9, ghost)])
        assert (await store.get_run(run.id)).to_dict() == stored_before

        # The same save without the duplicate goes through.
        await store.save_run(run, new[:-1])
        assert (await store.get_run(run.id)).to_dict() == run.to_dict()

    run_with(make_store, body)


def test_save_runs_is_all_or_nothing(make_store: StoreFactory) -> None:
    async def body(store: AnyStore) -> None:
        good, bad = new_run(1, topic="t"), new_run(2, topic="t")
        await store.create_run(good)
        await store.create_run(bad)
        await saved(store, bad, lambda r: r.assign("agent-1"))
        good_before, bad_before = good.to_dict(), bad.to_dict()
        offset = await store.latest_offset()

        good_new = change(good, lambda r: r.assign("agent-2"))
        bad_new = change(bad, lambda r: r.add_event("INFO", "x"))
        bad_new.append((1, bad.attempts[0].events[0]))  # seq 1 again
        with pytest.raises(AlreadyExists):
            await store.save_runs([(good, good_new), (bad, bad_new)])
        assert (await store.get_run(good.id)).to_dict() == good_before
        assert (await store.get_run(bad.id)).to_dict() == bad_before
        assert await store.read_topic("t", after_offset=offset) == []

        records = await store.save_runs([(good, good_new), (bad, bad_new[:-1])])
        assert [[r.run_id for r in rs] for rs in records] == [[good.id], [bad.id]]
        assert (await store.get_run(good.id)).to_dict() == good.to_dict()
        assert (await store.get_run(bad.id)).to_dict() == bad.to_dict()

    run_with(make_store, body)


def _info(i: int, run: OpRun) -> None:
    run.add_event("INFO", f"step {i}", {"i": i})


def test_concurrent_save_run_calls_are_all_committed(make_store: StoreFactory) -> None:
    tasks, saves = 40, 5

    async def body(store: AnyStore) -> None:
        runs = [new_run(i, topic="busy") for i in range(tasks)]
        for run in runs:
            await store.create_run(run)

        async def worker(run: OpRun) -> list[int]:
            offsets: list[int] = []
            for i in range(saves):
                new = change(run, functools.partial(_info, i))
                records = await store.save_run(run, new)
                offsets.extend(r.offset for r in records)
            return offsets

        results = await asyncio.gather(*(worker(r) for r in runs))
        for run, offsets in zip(runs, results, strict=True):
            assert offsets == sorted(offsets)
            assert (await store.get_run(run.id)).to_dict() == run.to_dict()
        every = [o for offsets in results for o in offsets]
        assert len(set(every)) == tasks * saves
        log = await store.read_topic("busy", limit=10_000)
        assert [r.offset for r in log] == sorted(every)
        if isinstance(store, Store):
            stats = store.writer_stats
            assert stats.batches < stats.writes, "no write was group-committed"

    run_with(make_store, body)


def test_saves_of_one_run_queued_together_apply_in_order(make_store: StoreFactory) -> None:
    async def body(store: AnyStore) -> None:
        run = new_run(1, topic="t")
        await store.create_run(run)
        pending = []
        for i in range(5):
            new = change(run, functools.partial(_info, i))
            pending.append(asyncio.ensure_future(store.save_run(run, new)))
            await asyncio.sleep(0)  # it snapshots the run and queues before the next change
        results = await asyncio.gather(*pending)
        assert [r[0].event.seq for r in results] == [1, 2, 3, 4, 5]
        offsets = [r[0].offset for r in results]
        assert offsets == sorted(offsets)
        assert (await store.get_run(run.id)).to_dict() == run.to_dict()

    run_with(make_store, body)


# ----------------------------------------------------------------------
# Topic log
# ----------------------------------------------------------------------


def test_topic_log_offsets_increase_and_reading_resumes(make_store: StoreFactory) -> None:
    async def body(store: AnyStore) -> None:
        assert await store.latest_offset() == 0
        a = new_run(1, topic="alpha", op_definition="adder")
        b = new_run(2, topic="beta")
        quiet = new_run(3)
        for run in (a, b, quiet):
            await store.create_run(run)

        offsets: list[int] = []
        expected: list[tuple[str, int, int]] = []
        for run, action in [
            (a, lambda r: r.assign("agent-1")),
            (b, lambda r: r.assign("agent-1")),
            (quiet, lambda r: r.assign("agent-1")),
            (a, lambda r: r.add_event("STARTED", "up")),
            (a, lambda r: (r.add_event("PROGRESS", 50), r.add_event("INFO", "half"))),
        ]:
            new = change(run, action)
            records = await store.save_run(run, new)
            if run is quiet:
                assert records == []
                continue
            assert [r.event.to_dict() for r in records] == [e.to_dict() for _, e in new]
            assert all(r.run_state is run.state for r in records)
            offsets.extend(r.offset for r in records)
            expected.extend((r.topic, r.attempt, r.event.seq) for r in records)
        assert offsets == sorted(offsets)
        assert len(set(offsets)) == len(offsets)
        assert await store.latest_offset() == offsets[-1]

        alpha = await store.read_topic("alpha")
        assert [(r.topic, r.attempt, r.event.seq) for r in alpha] == [
            e for e in expected if e[0] == "alpha"
        ]
        first = alpha[0]
        assert isinstance(first, TopicRecord)
        assert first.run_id == a.id
        assert first.attributes == {"team": "vision"}
        assert first.op_definition == "adder"
        assert first.run_state is OpRunState.ASSIGNED
        assert alpha[2].event.msg == 50
        assert alpha[2].event.t.utcoffset() == timedelta(0)

        resumed = await store.read_topic("alpha", after_offset=alpha[1].offset)
        assert [r.offset for r in resumed] == [r.offset for r in alpha[2:]]
        limited = await store.read_topic("alpha", after_offset=0, limit=2)
        assert [r.offset for r in limited] == [r.offset for r in alpha[:2]]
        assert [r.run_id for r in await store.read_topic("beta")] == [b.id]
        assert await store.read_topic("alpha", after_offset=offsets[-1]) == []
        assert await store.read_topic("nobody") == []

    run_with(make_store, body)


# ----------------------------------------------------------------------
# Logs
# ----------------------------------------------------------------------


def test_logs_are_numbered_per_attempt_and_bounded(make_store: StoreFactory) -> None:
    async def body(store: AnyStore) -> None:
        run = new_run(1)
        await store.create_run(run)

        def lines(*texts: str, stream: str = "stdout") -> list[tuple[str, str, datetime]]:
            return [(t, stream, BASE + timedelta(milliseconds=i)) for i, t in enumerate(texts)]

        assert await store.append_logs(run.id, 1, lines("a", "b", "c")) == 3
        # Saving the run must not reset the attempt's line count.
        await saved(store, run, lambda r: r.assign("agent-1"))
        assert await store.append_logs(run.id, 1, lines("d", "e", "f", "g", stream="stderr")) == 7
        assert await store.append_logs(run.id, 1, []) == 7

        kept, dropped = await store.read_logs(run.id, 1)
        assert [(r.number, r.text) for r in kept] == [
            (3, "c"),
            (4, "d"),
            (5, "e"),
            (6, "f"),
            (7, "g"),
        ]
        assert dropped == 2
        assert kept[1] == LogRecord(number=4, text="d", stream="stderr", t=BASE)
        assert kept[0].t.utcoffset() == timedelta(0)

        tail, dropped = await store.read_logs(run.id, 1, after_line=4, limit=2)
        assert [r.number for r in tail] == [5, 6]
        assert dropped == 0
        assert await store.read_logs(run.id, 1, after_line=7) == ([], 0)

        # More lines at once than are kept.
        burst = [f"line {i}" for i in range(12)]
        assert await store.append_logs(run.id, 1, lines(*burst)) == 19
        kept, dropped = await store.read_logs(run.id, 1, after_line=2)
        assert [r.number for r in kept] == [15, 16, 17, 18, 19]
        assert kept[-1].text == "line 11"
        assert dropped == 12

        # Each attempt counts on its own.
        await saved(store, run, lambda r: r.add_event("FAILED", "x"))
        await saved(store, run, lambda r: r.retry())
        assert await store.append_logs(run.id, 2, lines("new\x00line")) == 1
        kept, _ = await store.read_logs(run.id, 2)
        assert [(r.number, r.text) for r in kept] == [(1, "new\ufffdline")]

        with pytest.raises(NotFound):
            await store.append_logs(run.id, 3, lines("x"))
        with pytest.raises(NotFound):
            await store.append_logs("run_missing", 1, lines("x"))
        with pytest.raises(ValueError):
            await store.append_logs(run.id, 1, lines("x", stream="stdin"))
        assert await store.read_logs("run_missing", 1) == ([], 0)

    run_with(make_store, body, log_retention=5)


def test_concurrent_log_appends_keep_numbering(make_store: StoreFactory) -> None:
    async def body(store: AnyStore) -> None:
        run = new_run(1)
        await store.create_run(run)
        results = await asyncio.gather(
            *(store.append_logs(run.id, 1, [(f"{i}", "stdout", BASE)] * 3) for i in range(20))
        )
        assert sorted(results) == list(range(3, 61, 3))
        kept, dropped = await store.read_logs(run.id, 1, limit=100)
        assert [r.number for r in kept] == list(range(1, 61))
        assert dropped == 0

    run_with(make_store, body)


# ----------------------------------------------------------------------
# Lifecycle
# ----------------------------------------------------------------------


def test_closed_store_refuses_calls(make_store: StoreFactory) -> None:
    async def body() -> None:
        store = make_store()
        run = new_run(1)
        await store.create_run(run)
        await store.close()
        await store.close()  # closing twice is fine
        with pytest.raises(RuntimeError):
            await store.get_run(run.id)
        with pytest.raises(RuntimeError):
            await store.save_run(run, [])

    asyncio.run(body())


# ----------------------------------------------------------------------
# SQL backends only
# ----------------------------------------------------------------------


def test_data_survives_reopening(make_sql_store: StoreFactory) -> None:
    make_store = make_sql_store
    run = new_run(1, topic="t", request_id="req")

    async def write(store: AnyStore) -> None:
        await store.create_definition(definition("adder"))
        await store.create_run(run)
        await saved(store, run, lambda r: r.assign("agent-1"))
        await store.append_logs(run.id, 1, [("hello", "stdout", BASE)])

    async def read(store: AnyStore) -> None:
        assert (await store.get_run(run.id)).to_dict() == run.to_dict()
        assert (await store.create_definition(definition("adder"))).version == 2
        assert await store.latest_offset() == 1
        assert await store.append_logs(run.id, 1, [("again", "stdout", BASE)]) == 2

    run_with(make_store, write)
    run_with(make_store, read)


def test_migrated_schema_matches_the_tables(make_sql_store: StoreFactory) -> None:
    make_store = make_sql_store
    assert make_store.url is not None

    async def noop(store: AnyStore) -> None:
        assert isinstance(store, Store)
        assert store.url.startswith(("sqlite:///", "postgresql+psycopg://"))

    run_with(make_store, noop)
    engine = sa.create_engine(make_store.url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []
            if make_store.backend == "sqlite":
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()


def test_two_stores_on_one_database_share_versions_and_offsets(
    make_sql_store: StoreFactory,
) -> None:
    make_store = make_sql_store

    async def body(first: AnyStore) -> None:
        second = make_store()
        try:
            created = await asyncio.gather(
                *(s.create_definition(definition("shared")) for s in [first, second] * 10)
            )
            assert sorted(d.version for d in created) == list(range(1, 21))
            runs = [new_run(i, topic="t") for i in range(10)]
            for i, run in enumerate(runs):
                await (first, second)[i % 2].create_run(run)
            records = await asyncio.gather(
                *(
                    (first, second)[i % 2].save_run(run, change(run, lambda r: r.assign("a")))
                    for i, run in enumerate(runs)
                )
            )
            offsets = sorted(r[0].offset for r in records)
            assert [r.offset for r in await second.read_topic("t")] == offsets
        finally:
            await second.close()

    run_with(make_store, body)


def test_log_numbering_survives_a_second_store_appending(make_sql_store: StoreFactory) -> None:
    """The writer remembers line counts; one changed behind it is noticed and re-read."""
    make_store = make_sql_store

    async def body(first: AnyStore) -> None:
        second = make_store()
        try:
            run = new_run(1)
            await first.create_run(run)
            line = [("x", "stdout", BASE)]
            assert await first.append_logs(run.id, 1, line * 3) == 3
            assert await second.append_logs(run.id, 1, line * 2) == 5
            assert await first.append_logs(run.id, 1, line) == 6
            assert isinstance(first, Store)
            assert first.writer_stats.retried_batches == 1  # the stale count, re-read
            assert await first.append_logs(run.id, 1, line) == 7
            kept, dropped = await second.read_logs(run.id, 1)
            assert [r.number for r in kept] == list(range(1, 8))
            assert dropped == 0
        finally:
            await second.close()

    run_with(make_store, body)


def test_agents_last_heard_from_are_kept_and_never_go_back(make_store: StoreFactory) -> None:
    async def body(store: AnyStore) -> None:
        assert await store.agents_last_seen(["a1"]) == {}
        await store.record_agents_seen({"a1": BASE, "a2": BASE + timedelta(seconds=5)})
        await store.record_agents_seen({"a1": BASE + timedelta(seconds=9)})
        await store.record_agents_seen({"a2": BASE})  # older: ignored
        seen = await store.agents_last_seen(["a1", "a2", "a3"])
        assert seen == {"a1": BASE + timedelta(seconds=9), "a2": BASE + timedelta(seconds=5)}

    run_with(make_store, body)


# ----------------------------------------------------------------------
# Deleting finished runs, retention
# ----------------------------------------------------------------------


async def _finished_run(
    store: AnyStore, n: int, *, topic: str = "", ended: datetime | None = None
) -> OpRun:
    """A run that completed, with events, log lines and topic records."""
    run = new_run(n, topic=topic)
    await store.create_run(run)
    await saved(store, run, assign_and_start)
    await store.append_logs(run.id, 1, [("line", "stdout", BASE)])
    new = change(run, lambda r: r.add_event("COMPLETED", "done", {"outputs": {"n": n}}))
    if ended is not None:
        run.updated_at = ended
    await store.save_run(run, new)
    return run


def test_deleting_a_finished_run_removes_everything_it_owns(make_store: StoreFactory) -> None:
    async def body(store: AnyStore) -> None:
        gone = await _finished_run(store, 1, topic="t")
        kept = await _finished_run(store, 2, topic="t")
        offsets = [r.offset for r in await store.read_topic("t")]
        await store.delete_run(gone.id)

        with pytest.raises(NotFound):
            await store.get_run(gone.id)
        assert await store.list_events(gone.id) == []
        assert (await store.read_logs(gone.id, 1))[0] == []
        remaining = await store.read_topic("t")
        assert {r.run_id for r in remaining} == {kept.id}
        # What remains keeps its offsets; a reader resuming before a deleted record
        # gets the records after it, in order.
        assert [r.offset for r in remaining] == [
            o for o in offsets if o in {r.offset for r in remaining}
        ]
        assert [r.offset for r in await store.read_topic("t", after_offset=offsets[0])] == [
            r.offset for r in remaining if r.offset > offsets[0]
        ]
        assert (await store.get_run(kept.id)).to_dict() == kept.to_dict()
        with pytest.raises(NotFound):
            await store.delete_run(gone.id)
        # Offsets are never reused after a delete.
        later = await _finished_run(store, 3, topic="t")
        assert min(r.offset for r in await store.read_topic("t") if r.run_id == later.id) > max(
            offsets
        )

    run_with(make_store, body)


def test_a_reconnect_window_opens_once_per_absence(make_store: StoreFactory) -> None:
    async def body(store: AnyStore) -> None:
        t = [BASE + timedelta(seconds=s) for s in range(6)]
        await store.record_agents_seen({"a1": t[0]})
        first = await store.open_reconnect_windows({"a1": t[0], "new": t[1]}, t[2])
        assert first == {"a1": (t[0], t[2]), "new": (t[1], t[2])}
        # Another restart before the agent is heard again keeps the window's start.
        assert await store.open_reconnect_windows({"a1": t[0]}, t[4]) == {"a1": (t[0], t[2])}
        # Heard again, then absent: a new window.
        await store.record_agents_seen({"a1": t[3]})
        assert await store.open_reconnect_windows({"a1": t[0]}, t[5]) == {"a1": (t[3], t[5])}

    run_with(make_store, body)


def test_runs_that_may_still_change_are_not_deleted(make_store: StoreFactory) -> None:
    async def body(store: AnyStore) -> None:
        pending = new_run(1)
        await store.create_run(pending)
        running = new_run(2)
        await store.create_run(running)
        await saved(store, running, assign_and_start)
        waiting = new_run(3)
        waiting.retry_policy.max_attempts = 3
        await store.create_run(waiting)
        await saved(store, waiting, assign_and_start)
        await saved(store, waiting, lambda r: (fail(r), r.schedule_auto_retry()))
        assert waiting.next_retry_at is not None
        for run in (pending, running, waiting):
            with pytest.raises(RunNotFinished) as caught:
                await store.delete_run(run.id)
            assert caught.value.reason == "RUN_NOT_FINISHED"
            assert (await store.get_run(run.id)).to_dict() == run.to_dict()
        later = datetime.now(UTC) + timedelta(days=1)
        assert await store.delete_finished_before(later) == []

    run_with(make_store, body)


def test_retention_deletes_old_finished_runs_oldest_first_in_batches(
    make_store: StoreFactory,
) -> None:
    async def body(store: AnyStore) -> None:
        old = [
            await _finished_run(store, i, topic="t", ended=BASE + timedelta(minutes=i))
            for i in range(5)
        ]
        recent = await _finished_run(store, 9, topic="t", ended=BASE + timedelta(days=40))
        active = new_run(10)
        await store.create_run(active)
        cutoff = BASE + timedelta(days=30)

        # Runs the server is busy with are left for a later batch.
        first = await store.delete_finished_before(cutoff, limit=2, exclude={old[0].id})
        assert first == [old[1].id, old[2].id]
        rest = await store.delete_finished_before(cutoff, limit=2)
        assert rest == [old[0].id, old[3].id]
        assert await store.delete_finished_before(cutoff, limit=2) == [old[4].id]
        assert await store.delete_finished_before(cutoff, limit=2) == []

        assert {r.run_id for r in await store.read_topic("t")} == {recent.id}
        await store.get_run(recent.id)
        await store.get_run(active.id)
        for run in old:
            with pytest.raises(NotFound):
                await store.get_run(run.id)

    run_with(make_store, body)


def test_agent_drains_are_kept_until_cleared(make_store: StoreFactory) -> None:
    async def body(store: AnyStore) -> None:
        assert await store.list_drains() == []
        await store.set_drain(AgentDrain("b", "maintenance", BASE))
        await store.set_drain(AgentDrain("a", "first", BASE))
        await store.set_drain(AgentDrain("a", "again", BASE + timedelta(hours=1)))
        assert await store.list_drains() == [
            AgentDrain("a", "again", BASE + timedelta(hours=1)),
            AgentDrain("b", "maintenance", BASE),
        ]
        assert await store.clear_drain("a") is True
        assert await store.clear_drain("a") is False
        assert [d.name for d in await store.list_drains()] == ["b"]

    run_with(make_store, body)


def test_agent_drains_survive_reopening(make_sql_store: StoreFactory) -> None:
    async def write(store: AnyStore) -> None:
        await store.set_drain(AgentDrain("gpu-7", "bad fan", BASE))

    async def read(store: AnyStore) -> None:
        assert await store.list_drains() == [AgentDrain("gpu-7", "bad fan", BASE)]

    run_with(make_sql_store, write)
    run_with(make_sql_store, read)
