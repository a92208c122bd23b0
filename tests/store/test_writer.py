"""The group-commit writer on its own, with batches made deterministic by a gate."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from gyoza.models import AlreadyExists, EventEntry, OpRun
from gyoza.server.store.engines import create_engines, normalize_url
from gyoza.server.store.repository import Repository
from gyoza.server.store.rows import log_rows
from gyoza.server.store.schema import upgrade
from gyoza.server.store.writer import Writer
from gyoza.server.store.writes import AppendLogs, SaveRuns

_items = sa.table("items", sa.column("k", sa.Integer))


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'w.db'}"
    else:
        url = request.getfixturevalue("fresh_pg_database")
    writer_engine, reader_engine = create_engines(normalize_url(url), readers=1)
    reader_engine.dispose()
    with writer_engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE items (k INTEGER PRIMARY KEY)")
    yield writer_engine
    writer_engine.dispose()


def insert(*keys: int) -> Callable[[Connection], int]:
    def write(conn: Connection) -> int:
        for k in keys:
            conn.execute(_items.insert().values(k=k))
        return sum(keys)

    return write


def stored(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.select(_items.c.k).order_by(_items.c.k))]


def test_a_failing_write_is_rolled_back_alone_and_the_batch_commits(engine: Engine) -> None:
    writer = Writer(engine)
    writer.start()
    gate = threading.Event()

    async def main() -> list[object]:
        # The first write holds the thread, so the next three queue up into one batch.
        blocker = writer.submit(lambda conn: gate.wait(10))
        await asyncio.sleep(0.05)
        futures = [
            writer.submit(insert(1)),
            writer.submit(insert(2, 1)),  # 2 is fine, 1 is a duplicate
            writer.submit(insert(3)),
        ]
        gate.set()
        assert await blocker is True
        return await asyncio.gather(*futures, return_exceptions=True)

    try:
        first, second, third = asyncio.run(main())
    finally:
        writer.close()
    assert first == 1
    assert isinstance(second, sa.exc.IntegrityError)
    assert third == 3
    assert stored(engine) == [1, 3]
    assert writer.stats.batches == 2
    assert writer.stats.largest_batch == 3
    assert writer.stats.retried_batches == 1


def test_a_lone_failing_write_gets_its_error(engine: Engine) -> None:
    writer = Writer(engine)
    writer.start()

    async def main() -> None:
        await writer.submit(insert(1))
        with pytest.raises(sa.exc.IntegrityError):
            await writer.submit(insert(5, 1))
        assert await writer.submit(insert(2)) == 2

    try:
        asyncio.run(main())
    finally:
        writer.close()
    assert stored(engine) == [1, 2]


def test_close_applies_queued_writes_then_refuses_new_ones(engine: Engine) -> None:
    writer = Writer(engine)
    writer.start()

    async def main() -> None:
        futures = [writer.submit(insert(k)) for k in range(1, 51)]
        await asyncio.to_thread(writer.close)
        assert await asyncio.gather(*futures) == list(range(1, 51))
        with pytest.raises(RuntimeError):
            writer.submit(insert(99))

    asyncio.run(main())
    assert stored(engine) == list(range(1, 51))
    assert writer.stats.writes == 50


# ----------------------------------------------------------------------
# Combined writes of the store
# ----------------------------------------------------------------------


def _stored_runs(engine: Engine, count: int) -> tuple[Repository, list[OpRun]]:
    upgrade(engine)
    repository = Repository(engine.dialect.name)
    runs = [OpRun.create("busybox", inputs={"i": i}) for i in range(count)]
    with engine.begin() as conn:
        for run in runs:
            repository.create_run(conn, repository.encode_run(run, []))
    return repository, runs


def _event(run: OpRun, text: str) -> list[tuple[int, EventEntry]]:
    return [(run.current_attempt, run.add_event("INFO", text))]


def test_saves_and_log_appends_of_different_runs_are_combined(engine: Engine) -> None:
    repository, runs = _stored_runs(engine, 4)
    writer = Writer(engine, on_rollback=repository.forget)
    writer.start()
    gate = threading.Event()
    now = datetime.now(UTC)

    async def main() -> list[object]:
        blocker = writer.submit(lambda conn: gate.wait(10))
        await asyncio.sleep(0.05)
        futures: list[asyncio.Future[Any]] = []
        for run in runs:
            futures.append(
                writer.submit(SaveRuns(repository, [repository.encode_run(run, _event(run, "a"))]))
            )
            rows = log_rows(run.id, 1, [("line", "stdout", now)] * 2, stamp=repository.stamp)
            futures.append(writer.submit(AppendLogs(repository, run.id, 1, rows)))
        # A second save of the first run, queued after its log append.
        futures.append(
            writer.submit(
                SaveRuns(repository, [repository.encode_run(runs[0], _event(runs[0], "b"))])
            )
        )
        gate.set()
        await blocker
        return list(await asyncio.gather(*futures))

    try:
        results = asyncio.run(main())
    finally:
        writer.close()
    assert results[1::2][:4] == [2, 2, 2, 2]
    # One stage for the blocker; then all saves of distinct runs, all appends, and the
    # second save of run 0 (it may not move before run 0's append).
    assert writer.stats.batches == 2
    assert writer.stats.stages == 1 + 3
    assert writer.stats.retried_batches == 0
    with engine.connect() as conn:
        for run in runs:
            loaded = repository.get_run(conn, run.id)
            assert loaded is not None
            assert loaded.to_dict() == run.to_dict()


def test_a_failing_combined_write_fails_alone(engine: Engine) -> None:
    repository, runs = _stored_runs(engine, 3)
    writer = Writer(engine, on_rollback=repository.forget)
    writer.start()
    gate = threading.Event()
    duplicate = _event(runs[1], "once")

    async def main() -> list[object]:
        first = writer.submit(SaveRuns(repository, [repository.encode_run(runs[1], duplicate)]))
        await first
        blocker = writer.submit(lambda conn: gate.wait(10))
        await asyncio.sleep(0.05)
        futures = [
            writer.submit(
                SaveRuns(repository, [repository.encode_run(runs[0], _event(runs[0], "x"))])
            ),
            writer.submit(SaveRuns(repository, [repository.encode_run(runs[1], duplicate)])),
            writer.submit(
                SaveRuns(repository, [repository.encode_run(runs[2], _event(runs[2], "y"))])
            ),
        ]
        gate.set()
        await blocker
        return await asyncio.gather(*futures, return_exceptions=True)

    try:
        ok_0, failed, ok_2 = asyncio.run(main())
    finally:
        writer.close()
    assert ok_0 == [[]]
    assert isinstance(failed, AlreadyExists)
    assert ok_2 == [[]]
    assert writer.stats.retried_batches == 1
    with engine.connect() as conn:
        for run in (runs[0], runs[2]):
            loaded = repository.get_run(conn, run.id)
            assert loaded is not None
            assert loaded.to_dict() == run.to_dict()
