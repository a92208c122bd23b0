"""Many simulated agents in one process, for benchmarks and load tests.

Each agent is a real :class:`~gyoza.agent.daemon.Agent` (its own stream, outbox and state
directory) with the scripted executor and a declared capacity, so nothing reads the
machine. They share the caller's event loop and, optionally, one channel (one HTTP/2
connection carrying every stream)::

    async with SimulatedFleet(200, server=address, base_dir=tmp) as fleet:
        await fleet.wait_connected()
        ...  # create runs with inputs {"sleep_ms": 50, "progress_steps": 3}
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import TracebackType

import grpc

from gyoza.agent.config import AgentConfig
from gyoza.agent.daemon import Agent, ConnectionState, create_channel


def simulated_config(
    name: str,
    *,
    server: str,
    base_dir: Path,
    token: str | None = None,
    gpus: str | None = "1x80G",
    cpu: float = 16.0,
    ram_mb: int = 64 * 1024,
    labels: dict[str, str] | None = None,
    outbox_synchronous: str = "NORMAL",
) -> AgentConfig:
    """The configuration of one simulated agent, stored in ``base_dir/name``.

    The outbox defaults to ``synchronous=NORMAL``: hundreds of outboxes on one disk, and a
    benchmark does not survive power cuts anyway.
    """
    return AgentConfig(
        server=server,
        name=name,
        token=token,
        state_dir=base_dir / name,
        executor="scripted",
        gpus=gpus,
        cpu=cpu,
        ram_mb=ram_mb,
        labels=dict(labels or {}),
        outbox_synchronous=outbox_synchronous,
    )


class SimulatedFleet:
    """*count* scripted agents named ``{prefix}-{i:04d}``; an async context manager.

    Parameters
    ----------
    count : int
        Number of agents.
    server : str
        ``HOST:PORT`` of the server.
    base_dir : Path
        Parent of the agents' state directories.
    prefix : str
        Name prefix of the agents.
    share_channel : bool
        One channel for every agent's stream instead of a connection each.
    **options
        Passed to :func:`simulated_config` (``token``, ``gpus``, ``cpu``, ``ram_mb``,
        ``labels``, ``outbox_synchronous``).
    """

    def __init__(
        self,
        count: int,
        *,
        server: str,
        base_dir: Path,
        prefix: str = "sim-agent",
        share_channel: bool = False,
        token: str | None = None,
        gpus: str | None = "1x80G",
        cpu: float = 16.0,
        ram_mb: int = 64 * 1024,
        labels: dict[str, str] | None = None,
        outbox_synchronous: str = "NORMAL",
    ) -> None:
        self.configs = [
            simulated_config(
                f"{prefix}-{i:04d}",
                server=server,
                base_dir=base_dir,
                token=token,
                gpus=gpus,
                cpu=cpu,
                ram_mb=ram_mb,
                labels=labels,
                outbox_synchronous=outbox_synchronous,
            )
            for i in range(count)
        ]
        self._share_channel = share_channel
        self._channel: grpc.aio.Channel | None = None
        self.agents: list[Agent] = []

    async def __aenter__(self) -> SimulatedFleet:
        """Start every agent (their outboxes open concurrently)."""
        if self._share_channel and self.configs:
            self._channel = create_channel(self.configs[0])
        self.agents = [Agent(config, channel=self._channel) for config in self.configs]
        results = await asyncio.gather(
            *(agent.__aenter__() for agent in self.agents), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self._stop()
            raise errors[0]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop every agent at once (scripts in flight are left for a restart)."""
        await self._stop()

    async def wait_connected(self) -> None:
        """Return once every agent has been welcomed (wrap in a timeout)."""
        await asyncio.gather(
            *(
                agent.wait_for_state(ConnectionState.CONNECTED, ConnectionState.DRAINING)
                for agent in self.agents
            )
        )

    async def _stop(self) -> None:
        await asyncio.gather(
            *(agent.__aexit__(None, None, None) for agent in self.agents),
            return_exceptions=True,
        )
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
