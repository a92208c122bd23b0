"""The simulated fleet as a child process of the benchmark (see :mod:`bench.fleet`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from bench.common import cpu_seconds, rss_bytes

#: The repository root: the fleet runs ``python -m bench.fleet`` from here.
REPO = Path(__file__).resolve().parent.parent


class FleetProcess:
    """``python -m bench.fleet`` with its own event loop, CPU and memory.

    Parameters
    ----------
    server : str
        ``HOST:PORT`` of the server.
    agents : int
        Number of agents.
    base_dir : Path
        Parent of the agents' state directories.
    prefix : str
        Agent name prefix (``prefix-0000``...).
    record : Path | None
        Where the fleet writes the per-run times when it stops.
    cpu : float
        CPU cores each agent declares.
    coalesce_ms : float
        Each agent's report coalescing under load (``AgentConfig.coalesce_ms``).
    """

    def __init__(
        self,
        server: str,
        agents: int,
        base_dir: Path,
        prefix: str,
        *,
        record: Path | None = None,
        cpu: float = 16.0,
        coalesce_ms: float = 1.0,
    ) -> None:
        self.server = server
        self.agents = agents
        self.base_dir = base_dir
        self.prefix = prefix
        self.record = record
        self.cpu = cpu
        self.coalesce_ms = coalesce_ms
        self.log_path = base_dir.parent / f"fleet-{prefix}.log"
        self._process: asyncio.subprocess.Process | None = None
        self.messages: list[dict[str, Any]] = []

    @property
    def pid(self) -> int:
        """The fleet's process id."""
        assert self._process is not None
        return self._process.pid

    def cpu_seconds(self) -> float:
        """CPU time the fleet has used so far."""
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        """The fleet's resident memory."""
        return rss_bytes(self.pid)

    def alive(self) -> bool:
        """True while the process runs."""
        return self._process is not None and self._process.returncode is None

    async def start(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Start the process and wait until every agent's outbox is open.

        Raises
        ------
        RuntimeError
            When the fleet fails to start (its log is quoted).
        """
        self.base_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "bench.fleet",
            "--server",
            self.server,
            "--agents",
            str(self.agents),
            "--base-dir",
            str(self.base_dir),
            "--prefix",
            self.prefix,
            "--cpu",
            str(self.cpu),
            "--coalesce-ms",
            str(self.coalesce_ms),
        ]
        if self.record is not None:
            command += ["--record", str(self.record)]
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        with self.log_path.open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                *command,
                cwd=REPO,
                env=env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        return await self.expect("started", timeout_s)

    async def expect(self, key: str, timeout_s: float) -> dict[str, Any]:
        """The next message of the fleet that has *key*.

        Raises
        ------
        RuntimeError
            When the fleet exits or says nothing in time.
        """
        assert self._process is not None and self._process.stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    line = await self._process.stdout.readline()
                    if not line:
                        await self._process.wait()
                        raise RuntimeError(
                            f"the fleet exited with {self._process.returncode}:\n{self.log_tail()}"
                        )
                    message: dict[str, Any] = json.loads(line)
                    self.messages.append(message)
                    if key in message:
                        return message
        except TimeoutError:
            raise RuntimeError(
                f"the fleet said no {key!r} within {timeout_s:.0f} s:\n{self.log_tail()}"
            ) from None

    async def stop(self, timeout_s: float = 60.0) -> dict[str, Any] | None:
        """Ask the agents to stop, wait for the record, and reap the process."""
        process = self._process
        if process is None or process.returncode is not None:
            return None
        result: dict[str, Any] | None = None
        try:
            assert process.stdin is not None
            process.stdin.write(b"stop\n")
            await process.stdin.drain()
            process.stdin.close()
            result = await self.expect("stopped", timeout_s)
            await asyncio.wait_for(process.wait(), 10)
        except (RuntimeError, TimeoutError, ConnectionError):
            self.kill()
            await process.wait()
        return result

    def kill(self) -> None:
        """Kill the process at once."""
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the fleet's log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
