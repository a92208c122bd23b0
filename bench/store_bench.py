"""``python -m bench.store_bench``: throughput and CPU of the store's write path.

Not part of ``make bench`` nor of the tests. Measures, on SQLite (a file in a temporary
directory) and on PostgreSQL when ``GYOZA_TEST_POSTGRES_URL`` is set (in a fresh
database, dropped after):

- **lifecycle**: *in_flight* tasks each playing runs the way the server does: create
  (1 attempt, topic ``bench``), ASSIGNED, STARTED, 3 x (one log line, PROGRESS),
  COMPLETED: 7 run writes and 3 log appends per run, about 8 events on the topic.
- **save_run**: *in_flight* RUNNING runs, each saved over and over with one new
  PROGRESS (INFO) event, 1 attempt, about 8 events on the attempt.
- **append_logs**: *in_flight* tasks appending 10 lines at a time to their attempts.
- **read_topic**: the whole topic log, read in pages of 500.

CPU is the process's (every thread: the event loop, encoding, the writer, the
driver); "domain" is the CPU the same loop spends without a store (changing the runs),
which the store-only figure leaves out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gyoza.models import EventDelivery, EventEntry, OpRun
from gyoza.server.store import Store

TOPIC = "bench"


@dataclass
class Figure:
    name: str
    calls: int
    wall_s: float
    cpu_s: float
    domain_cpu_s: float = 0.0
    unit: str = "calls"

    def line(self) -> str:
        per_s = self.calls / self.wall_s if self.wall_s else 0.0
        cpu_us = self.cpu_s / self.calls * 1e6 if self.calls else 0.0
        store_us = (self.cpu_s - self.domain_cpu_s) / self.calls * 1e6 if self.calls else 0.0
        return (
            f"  {self.name:<22} {per_s:>10,.0f} {self.unit}/s   "
            f"CPU {cpu_us:>7.1f} µs/{self.unit[:-1]}   store only {store_us:>7.1f} µs"
        )


def new_run(n: int) -> OpRun:
    return OpRun.create(
        "registry.example/bench:latest",
        priority=n % 3,
        inputs={"n": n, "prompt": "a photo of a gyoza", "steps": 30, "scale": 7.5},
        event_delivery=EventDelivery(topic=TOPIC, attributes={"team": "bench"}),
    )


def changed(run: OpRun, action: Callable[[OpRun], object]) -> list[tuple[int, EventEntry]]:
    marks = {a.attempt: len(a.events) for a in run.attempts}
    action(run)
    return [(a.attempt, e) for a in run.attempts for e in a.events[marks.get(a.attempt, 0) :]]


def _steps() -> list[Callable[[OpRun], object]]:
    steps: list[Callable[[OpRun], object]] = [
        lambda r: r.assign("agent-1", [0]),
        lambda r: r.add_event("STARTED", "container up", {"worker_id": "agent-1", "gpu_id": 0}),
    ]
    for pct in (33, 66, 100):
        steps.append(lambda r, pct=pct: r.add_event("PROGRESS", pct, {"step": pct}))
    steps.append(lambda r: r.add_event("COMPLETED", "done", {"outputs": {"image": "s3://x/y"}}))
    return steps


@contextmanager
def _measure() -> Iterator[list[float]]:
    out: list[float] = []
    wall, cpu = time.perf_counter(), time.process_time()
    yield out
    out.extend([time.perf_counter() - wall, time.process_time() - cpu])


async def _pool(in_flight: int, total: int, job: Callable[[int], Awaitable[None]]) -> None:
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            await job(i)

    await asyncio.gather(*(worker() for _ in range(in_flight)))


async def lifecycle(
    store: Store | None, runs: int, in_flight: int
) -> tuple[int, int, float, float]:
    steps = _steps()
    log_at = {2, 3, 4}
    t = datetime.now(UTC)

    async def play(i: int) -> None:
        run = new_run(i)
        if store is not None:
            await store.create_run(run)
        for k, step in enumerate(steps):
            if k in log_at and store is not None:
                await store.append_logs(run.id, 1, [(f"step {k} of run {i}", "stdout", t)])
            new = changed(run, step)
            if store is not None:
                await store.save_run(run, new)

    with _measure() as m:
        await _pool(in_flight, runs, play)
    return runs * (1 + len(steps)), runs * len(log_at), m[0], m[1]


async def save_loop(store: Store | None, saves: int, in_flight: int) -> tuple[float, float]:
    runs = [new_run(i) for i in range(in_flight)]
    for run in runs:
        changed(run, lambda r: r.assign("agent-1", [0]))
        changed(run, lambda r: r.add_event("STARTED", "up", {"worker_id": "agent-1"}))
        for pct in range(5):
            changed(run, lambda r, pct=pct: r.add_event("PROGRESS", pct, {"step": pct}))
        if store is not None:
            await store.create_run(run)
    per = saves // in_flight

    async def one(run: OpRun) -> None:
        for k in range(per):
            new = changed(run, lambda r, k=k: r.add_event("INFO", f"tick {k}", {"k": k}))
            # Keep the attempt at about 8 events, as a typical run has.
            del run.attempts[-1].events[:-8]
            if store is not None:
                await store.save_run(run, new)

    with _measure() as m:
        await asyncio.gather(*(one(r) for r in runs))
    return m[0], m[1]


async def bench_backend(url: str, *, runs: int, saves: int, in_flight: int) -> list[Figure]:
    figures = []
    # Domain-only CPU of the same loops.
    writes, appends, _, lc_domain = await lifecycle(None, runs, in_flight)
    _, save_domain = await save_loop(None, saves, in_flight)

    store = Store.open(url)
    try:
        await lifecycle(store, max(runs // 10, in_flight), in_flight)  # warm up
        writes, appends, wall, cpu = await lifecycle(store, runs, in_flight)
        figures.append(Figure("lifecycle (runs)", runs, wall, cpu, lc_domain, "runs"))
        figures.append(Figure("  writes in it", writes + appends, wall, cpu, lc_domain, "writes"))
        wall, cpu = await save_loop(store, saves, in_flight)
        figures.append(Figure("save_run", saves, wall, cpu, save_domain, "saves"))

        run_ids = []
        for i in range(in_flight):
            run = new_run(10_000 + i)
            await store.create_run(run)
            run_ids.append(run.id)
        t = datetime.now(UTC)
        lines = [(f"line {k}: some output of the container", "stdout", t) for k in range(10)]
        calls = max(saves // 10, in_flight)

        async def append(i: int) -> None:
            await store.append_logs(run_ids[i % in_flight], 1, lines)

        with _measure() as m:
            await _pool(in_flight, calls, append)
        figures.append(Figure("append_logs (lines)", calls * 10, m[0], m[1], 0.0, "lines"))

        with _measure() as m:
            offset, read = 0, 0
            while True:
                page = await store.read_topic(TOPIC, after_offset=offset, limit=500)
                if not page:
                    break
                read += len(page)
                offset = page[-1].offset
        figures.append(Figure("read_topic (records)", read, m[0], m[1], 0.0, "records"))
    finally:
        await store.close()
    return figures


def _pg_database(url: str) -> tuple[str, Callable[[], None]]:
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    admin = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"gyoza_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    return make_url(url).set(database=name).render_as_string(hide_password=False), drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="lifecycles to play")
    parser.add_argument("--saves", type=int, default=4000, help="saves in the save_run loop")
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--backend", choices=["sqlite", "postgres", "all"], default="all")
    args = parser.parse_args()
    kwargs = {"runs": args.runs, "saves": args.saves, "in_flight": args.in_flight}
    if args.backend in ("sqlite", "all"):
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            print("SQLite")
            for figure in asyncio.run(bench_backend(url, **kwargs)):
                print(figure.line())
    pg = os.environ.get("GYOZA_TEST_POSTGRES_URL", "").strip()
    if args.backend in ("postgres", "all") and pg:
        url, drop = _pg_database(pg)
        try:
            print("PostgreSQL")
            for figure in asyncio.run(bench_backend(url, **kwargs)):
                print(figure.line())
        finally:
            drop()


if __name__ == "__main__":
    main()
