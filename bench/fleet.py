"""The simulated agents: one process, many real agents sharing one event loop.

``python -m bench.fleet --server HOST:PORT --agents N --base-dir DIR --prefix NAME
[--record FILE]`` starts *N* :class:`~gyoza.agent.daemon.Agent` instances, each with its
own stream, outbox and state directory ``DIR/NAME-i``, playing runs with the scripted
executor. It prints one JSON line, ``{"started": N, "open_s": ...}``, once every outbox is
open, and stops every agent when a line ``stop`` (or the end of input) arrives on stdin.
Then it writes ``FILE`` and prints ``{"stopped": true}``.

Two bench-owned hooks measure the latencies:

* :class:`BenchAgent` records ``time.time_ns()`` the moment an Assignment reaches the
  agent's handler (the message decoded off the stream), per run id: the dispatch end.
* :class:`StampingExecutor` is the scripted executor with every PROGRESS event's payload
  carrying ``bench_sent_ns``, the time the executor emitted it (before the outbox commit
  and the send), which a client subtracts from the time the event reached it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from bench.common import SENT_NS_KEY, cpu_seconds, write_json
from gyoza.agent.daemon import Agent, ConnectionState
from gyoza.agent.executor import Assignment, ReportSink
from gyoza.agent.fleet import simulated_config
from gyoza.agent.scripted import ScriptedExecutor
from gyoza.agent.session import Session
from gyoza.api.v1 import agent_service_pb2 as pb
from gyoza.models.reports import ReportedEvent
from gyoza.models.resources import EventType


class Recorder:
    """Per-run times the agents saw, written to a JSON file at the end."""

    def __init__(self) -> None:
        self.assigned_ns: dict[str, int] = {}
        self.started_ns: dict[str, int] = {}

    def to_dict(self) -> dict[str, dict[str, int]]:
        """Plain values, for JSON."""
        return {"assigned_ns": self.assigned_ns, "started_ns": self.started_ns}


class StampingSink:
    """A :class:`ReportSink` that stamps each PROGRESS event with the time it is sent."""

    def __init__(self, inner: ReportSink) -> None:
        self._inner = inner

    @property
    def cursor(self) -> int:
        """The inner sink's cursor."""
        return self._inner.cursor

    @property
    def started_at(self) -> datetime | None:
        """The inner sink's start time."""
        return self._inner.started_at

    async def event(self, event: ReportedEvent, *, cursor: int | None = None) -> None:
        """Record the event; a PROGRESS one carries ``bench_sent_ns``."""
        if event.type is EventType.PROGRESS:
            event = replace(event, payload={**event.payload, SENT_NS_KEY: str(time.time_ns())})
        await self._inner.event(event, cursor=cursor)

    async def logs(self, lines: Sequence[tuple[str, str]], *, cursor: int | None = None) -> None:
        """Record log lines."""
        await self._inner.logs(lines, cursor=cursor)


class StampingExecutor(ScriptedExecutor):
    """The scripted executor, stamping PROGRESS events and recording start times."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self._recorder = recorder

    async def start(self, assignment: Assignment, sink: ReportSink) -> None:
        """Record when the executor got the attempt, then play it."""
        self._recorder.started_ns.setdefault(assignment.run_id, time.time_ns())
        await super().start(assignment, StampingSink(sink))

    async def adopt(self, assignment: Assignment, sink: ReportSink) -> bool:
        """Continue a script after a restart (stamped like the rest)."""
        return await super().adopt(assignment, StampingSink(sink))


class BenchAgent(Agent):
    """An agent recording when each assignment reached it."""

    def __init__(self, *args: Any, recorder: Recorder, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._recorder = recorder

    async def on_assignment(self, session: Session, assignment: pb.Assignment) -> None:
        """Record the receive time, then accept as usual."""
        self._recorder.assigned_ns.setdefault(assignment.run_id, time.time_ns())
        await super().on_assignment(session, assignment)


async def run_fleet(args: argparse.Namespace) -> None:
    """Start the agents, wait for ``stop`` on stdin, stop them, write the record."""
    recorder = Recorder()
    base_dir = Path(args.base_dir)  # made by the parent process
    shared: grpc.aio.Channel | None = None
    if args.share_channel:
        shared = grpc.aio.insecure_channel(args.server)
    agents = [
        BenchAgent(
            simulated_config(
                f"{args.prefix}-{i:04d}",
                server=args.server,
                base_dir=base_dir,
                cpu=args.cpu,
            ).with_changes(coalesce_ms=args.coalesce_ms),
            executor=StampingExecutor(recorder),
            channel=shared,
            recorder=recorder,
        )
        for i in range(args.agents)
    ]
    start = time.monotonic()
    # Open the outboxes in groups: a thousand SQLite files at once would queue on the
    # loop's small default thread pool anyway.
    for first in range(0, len(agents), 100):
        await asyncio.gather(*(agent.__aenter__() for agent in agents[first : first + 100]))
    opened_s = time.monotonic() - start
    _say({"started": len(agents), "open_s": round(opened_s, 3)})

    async def connected() -> None:
        await asyncio.gather(
            *(
                agent.wait_for_state(ConnectionState.CONNECTED, ConnectionState.DRAINING)
                for agent in agents
            )
        )
        _say({"connected": len(agents), "connect_s": round(time.monotonic() - start, 3)})

    watcher = asyncio.create_task(connected())
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.strip() == "stop":
            break
    watcher.cancel()
    stop_start = time.monotonic()
    await asyncio.gather(*(agent.shutdown(0.0) for agent in agents), return_exceptions=True)
    if shared is not None:
        await shared.close()
    if args.record:
        write_json(Path(args.record), recorder.to_dict())
    _say(
        {
            "stopped": True,
            "stop_s": round(time.monotonic() - stop_start, 3),
            "cpu_s": round(cpu_seconds_self(), 3),
        }
    )


def cpu_seconds_self() -> float:
    """CPU time this process has used."""
    return cpu_seconds(os.getpid())


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The fleet's flags."""
    parser = argparse.ArgumentParser(prog="python -m bench.fleet")
    parser.add_argument("--server", required=True, help="HOST:PORT of the server")
    parser.add_argument("--agents", type=int, required=True, help="number of agents")
    parser.add_argument("--base-dir", required=True, help="parent of the state directories")
    parser.add_argument("--prefix", default="bench", help="agent name prefix")
    parser.add_argument("--record", help="JSON file for the per-run times")
    parser.add_argument("--cpu", type=float, default=16.0, help="CPU cores each agent declares")
    parser.add_argument(
        "--coalesce-ms", type=float, default=1.0, help="each agent's report coalescing under load"
    )
    parser.add_argument(
        "--share-channel", action="store_true", help="one connection for every agent's stream"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point."""
    logging.basicConfig(level=logging.WARNING, format="fleet %(levelname)s %(name)s %(message)s")
    asyncio.run(run_fleet(parse_args(argv)))


if __name__ == "__main__":
    main()
