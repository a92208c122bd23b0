"""Fixtures for the docker executor tests: op images, an in-memory ReportSink, executors."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gyoza.agent.docker.contract import LABEL_AGENT
from gyoza.agent.docker_executor import DockerExecutor
from gyoza.models.reports import ReportedEvent
from gyoza.models.resources import EventType, FailureClass

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
HELLO_OP_IMAGE = "gyoza-example/hello-op:test"
SCENARIO_IMAGE = "gyoza-test/scenarios:latest"

TERMINAL = {EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED}


@dataclass
class Event:
    type: EventType
    message: str
    progress: int
    payload: dict[str, Any] | None
    outputs: dict[str, Any] | None
    failure_class: FailureClass | None
    exit_code: int | None
    error_message: str | None
    duration_ms: int | None
    cursor: int | None


@dataclass
class RecordingSink:
    """A ReportSink that keeps every report in memory, in order.

    It checks what an outbox would rely on: the cursor never goes back, and nothing is
    reported after the terminal event.
    """

    reports: list[Event | list[tuple[str, str]]] = field(default_factory=list)
    _cursor: int = 0
    _changed: asyncio.Condition | None = None

    @property
    def cursor(self) -> int:
        return self._cursor

    @property
    def events(self) -> list[Event]:
        return [r for r in self.reports if isinstance(r, Event)]

    @property
    def types(self) -> list[EventType]:
        return [e.type for e in self.events]

    @property
    def lines(self) -> list[tuple[str, str]]:
        return [line for r in self.reports if isinstance(r, list) for line in r]

    @property
    def terminal(self) -> Event | None:
        ends = [e for e in self.events if e.type in TERMINAL]
        return ends[-1] if ends else None

    async def event(self, event: ReportedEvent, *, cursor: int | None = None) -> None:
        record = Event(
            event.type,
            event.message,
            event.progress,
            dict(event.payload) if event.payload else None,
            event.outputs,
            event.failure_class,
            event.exit_code,
            event.error_message or None,
            event.duration_ms,
            cursor,
        )
        await self._store(record, cursor)

    async def logs(self, lines: Sequence[tuple[str, str]], *, cursor: int | None = None) -> None:
        assert lines, "empty log report"
        await self._store(list(lines), cursor)

    async def _store(self, record: Event | list[tuple[str, str]], cursor: int | None) -> None:
        assert self.terminal is None, f"report after the terminal event: {record}"
        if cursor is not None:
            assert cursor >= self._cursor, f"cursor went back: {self._cursor} -> {cursor}"
            self._cursor = cursor
        self.reports.append(record)
        async with self._condition():
            self._condition().notify_all()

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def wait_for(
        self, predicate: Callable[[RecordingSink], bool], within: float = 30
    ) -> None:
        async with self._condition():
            await asyncio.wait_for(self._condition().wait_for(lambda: predicate(self)), within)

    async def wait_terminal(self, within: float = 30) -> Event:
        await self.wait_for(lambda s: s.terminal is not None, within)
        assert self.terminal is not None
        return self.terminal


@pytest.fixture
def new_sink() -> Callable[[], RecordingSink]:
    """Makes RecordingSinks (one per attempt; it stands for the agent's outbox)."""
    return RecordingSink


def _build(client: Any, path: Path, tag: str, base: str) -> None:
    client.images.build(
        path=str(path), tag=tag, buildargs={"BASE": base}, network_mode="none", rm=True
    )


@pytest.fixture(scope="session")
def op_images(docker_client: Any, test_image: str) -> dict[str, str]:
    """The example op and the scenario op, built on the busybox test image."""
    _build(docker_client, REPO_ROOT / "examples" / "hello-op", HELLO_OP_IMAGE, test_image)
    _build(docker_client, HERE / "ops", SCENARIO_IMAGE, test_image)
    return {"hello": HELLO_OP_IMAGE, "scenarios": SCENARIO_IMAGE}


@pytest.fixture
def agent_name() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def remove_leftovers(docker_client: Any, agent_name: str) -> Iterator[None]:
    """After the test, remove any container the test's agent left (and fail on it)."""
    yield
    leftovers = docker_client.containers.list(
        all=True, filters={"label": f"{LABEL_AGENT}={agent_name}"}
    )
    for container in leftovers:
        container.remove(force=True)
    assert not leftovers, f"containers left behind: {[c.name for c in leftovers]}"


ExecutorFactory = Callable[..., DockerExecutor]


@pytest.fixture
def make_executor(
    docker_client: Any, tmp_path: Path, agent_name: str, remove_leftovers: None
) -> ExecutorFactory:
    """Makes DockerExecutors of the test's agent (all on one state dir). Make them inside
    the test's event loop and close them there (``async with``)."""

    def make(**kwargs: Any) -> DockerExecutor:
        kwargs.setdefault("stop_grace_s", 2)
        return DockerExecutor(tmp_path / "state", agent_name, client=docker_client, **kwargs)

    return make
