"""The dashboard's test stack: ``gyoza server``, scripted agents that declare GPUs, and
``gyoza ui``, each its own process on 127.0.0.1 (imported by conftest.py and the tests;
tests/ui is put on the import path by conftest.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from gyoza.client import Client, UnavailableError

GYOZA = str(Path(sys.executable).with_name("gyoza"))
CHROMIUM = os.environ.get("GYOZA_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("GYOZA_CHROMEDRIVER", "/usr/bin/chromedriver")
#: A lost agent's runs fail within a few seconds; a restarted server is back in time.
TIMING = {
    "GYOZA_HEARTBEAT_INTERVAL_S": "0.3",
    "GYOZA_LEASE_TIMEOUT_S": "2.0",
    "GYOZA_GRACE_S": "20",
}
#: The header every dashboard action carries.
ACTION = {"X-Gyoza-UI": "1"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def service_unavailable(message: str) -> None:
    """Fail under CI, skip elsewhere (as tests/conftest.py does for its services)."""
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    """Re-check a condition no stream announces, for a bounded time."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Proc:
    """A gyoza process with its log file."""

    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, **TIMING, **self.env, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


class Stack:
    """A server, agents and the dashboard; ``client`` talks to the server,
    ``http`` to the dashboard."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.address = f"127.0.0.1:{free_port()}"
        self.server = Proc(
            [GYOZA, "server", "--listen", self.address, "--database", f"sqlite:///{tmp}/g.db"],
            tmp / "server.log",
        )
        self.agents: list[Proc] = []
        self.ui: Proc | None = None
        self.url = ""
        self.client = Client(self.address, timeout=10)
        self._http: httpx.Client | None = None

    @property
    def http(self) -> httpx.Client:
        assert self._http is not None, "start_ui() first"
        return self._http

    def start_server(self) -> None:
        self.server.start()

        def serving() -> bool:
            assert self.server.popen is not None
            if self.server.popen.poll() is not None:
                raise AssertionError(f"server exited:\n{self.server.log()}")
            try:
                self.client.list_agents()
            except UnavailableError:
                return False
            return True

        wait_for("the server to serve", serving)

    def add_agent(self, name: str, gpus: str = "2x80G", labels: str = "pool=test") -> None:
        agent = Proc(
            [
                GYOZA,
                "agent",
                "--server",
                self.address,
                "--name",
                name,
                "--executor",
                "scripted",
                "--gpus",
                gpus,
                "--labels",
                labels,
                "--cpu",
                "16",
                "--ram-mb",
                "65536",
                "--state-dir",
                str(self.tmp / f"agent-{name}"),
            ],
            self.tmp / f"agent-{name}.log",
        )
        agent.start()
        self.agents.append(agent)
        wait_for(
            f"agent {name} to connect",
            lambda: any(a.name == name for a in self.client.list_agents()),
        )

    def start_ui(self) -> None:
        log_path = self.tmp / "ui.log"
        self.ui = Proc([GYOZA, "ui", "--server", self.address, "--listen", "127.0.0.1:0"], log_path)
        self.ui.start()

        def listening() -> bool:
            found = re.search(r"dashboard on (http://\S+)", log_path.read_text())
            if found:
                self.url = found.group(1)
            assert self.ui is not None and self.ui.popen is not None
            if self.ui.popen.poll() is not None:
                raise AssertionError(f"gyoza ui exited:\n{self.ui.log()}")
            return bool(found)

        wait_for("gyoza ui to listen", listening)
        self._http = httpx.Client(base_url=self.url, timeout=20)

    def scripted_run(self, sleep_ms: int = 0, steps: int = 3, **options: Any) -> str:
        """Create a run of the scripted executor; its id."""
        inputs = {"sleep_ms": sleep_ms, "progress_steps": steps, **options.pop("inputs", {})}
        return self.client.create_run(image="scripted", inputs=inputs, **options).id

    def wait_state(self, run_id: str, state: str, timeout: float = 30) -> None:
        """Follow the run's watch until it reads *state*."""
        for change in self.client.watch_run(run_id, timeout=timeout):
            if change.run.state.value == state:
                return
        raise AssertionError(f"{run_id} ended as {self.client.get_run(run_id).state}")

    def act(self, path: str, **form: str) -> httpx.Response:
        """POST a dashboard action as its pages do."""
        return self.http.post(path, data=form, headers=ACTION)

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        self.client.close()
        for proc in [*(p for p in [self.ui] if p is not None), *self.agents, self.server]:
            proc.stop()


def sse_events(response: httpx.Response) -> Iterator[tuple[str, Any]]:
    """The (event, data) pairs of a server-sent event stream, as they come."""
    event = "message"
    data: list[str] = []
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line.partition(":")[2].strip()
        elif line.startswith("data:"):
            data.append(line.partition(":")[2].strip())
