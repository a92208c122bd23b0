"""``gyoza dev``: a server and a local agent in one process, for trying gyoza on one machine.

The server listens on 127.0.0.1:50051 with a SQLite file in the working directory; the
agent runs ops in the local Docker engine (or plays them with the scripted executor) and
keeps its outbox under ``./.gyoza-dev``; the web dashboard (``gyoza ui``) listens on
127.0.0.1:8080 unless turned off. Their logs go to ``server.log`` and ``agent.log`` in
that folder (the terminal stays free for typing commands); ``gyoza dev`` says where.
Ctrl-C stops them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from pathlib import Path

from gyoza.agent.config import AgentConfig
from gyoza.agent.daemon import Agent
from gyoza.server.app import ControlPlane
from gyoza.server.config import ConfigError, ServerConfig
from gyoza.server.logs import JsonFormatter, LogfmtFormatter, configure_logging

log = logging.getLogger("gyoza.dev")


async def run_dev(server: ServerConfig, agent: AgentConfig, ui_listen: str | None = None) -> None:
    """Serve, run the agent and (with *ui_listen*) the dashboard until SIGINT or SIGTERM.

    A dashboard that cannot listen is reported and left out; the rest runs on.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    async with ControlPlane(server) as plane:
        runner = Agent(agent)
        task = asyncio.create_task(runner.run())
        print(
            f"gyoza dev: server on {plane.address} ({server.database_url}), "
            f"agent {agent.name!r} with the {agent.executor} executor. Ctrl-C stops them all.",
            file=sys.stderr,
        )
        dashboard = None if ui_listen is None else _start_ui(plane.address, ui_listen)
        waiter = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                waiter.cancel()
                task.result()  # the agent failed: say why
                return
            await runner.shutdown(0.0)
            await asyncio.gather(task, return_exceptions=True)
        finally:
            if dashboard is not None:
                dashboard.cancel()
                await asyncio.gather(dashboard, return_exceptions=True)


def _start_ui(address: str, listen: str) -> asyncio.Task[None] | None:
    """Start the dashboard over a client of the dev server; ``None`` where the
    dashboard is not installed."""
    try:
        from gyoza.client import Client
        from gyoza.ui.serve import CHANNEL_OPTIONS, serve_ui
    except ImportError as error:
        print(f"gyoza dev: no dashboard ({error})", file=sys.stderr)
        return None

    def ready(url: str) -> None:
        print(f"gyoza dev: dashboard on {url}", file=sys.stderr, flush=True)

    async def serve() -> None:
        try:
            await serve_ui(Client(address, channel_options=CHANNEL_OPTIONS), listen, on_ready=ready)
        except (OSError, ValueError) as error:
            print(f"gyoza dev: no dashboard: cannot listen on {listen}: {error}", file=sys.stderr)

    return asyncio.create_task(serve(), name="gyoza-dev-ui")


class _ByLogger(logging.Filter):
    """Passes the records of the agent's loggers (``gyoza.agent...``), or all others."""

    def __init__(self, agent: bool) -> None:
        super().__init__()
        self.agent = agent

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("gyoza.agent") is self.agent


def log_to_files(level: str, log_format: str, server_log: Path, agent_log: Path) -> None:
    """Send the agent's log records to *agent_log* and every other record to
    *server_log* (appended), in the server's format; nothing goes to the terminal."""
    configure_logging(level, log_format)  # levels, and checks the format
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    for path, agent in ((server_log, False), (agent_log, True)):
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(JsonFormatter() if log_format == "json" else LogfmtFormatter())
        handler.addFilter(_ByLogger(agent))
        root.addHandler(handler)


def main_dev(
    *,
    database: str | None = None,
    listen: str | None = None,
    state_dir: str | None = None,
    executor: str | None = None,
    ui_listen: str | None = "127.0.0.1:8080",
) -> None:
    """Run ``gyoza dev`` with the given flag values (``None``: the default; a
    *ui_listen* of ``None`` means no dashboard)."""
    try:
        server = ServerConfig.resolve(listen=listen, database=database)
    except ConfigError as error:
        print(f"gyoza dev: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    state = Path(state_dir or ".gyoza-dev")
    server_log, agent_log = state / "server.log", state / "agent.log"
    log_to_files(server.log_level, server.log_format, server_log, agent_log)
    print(f"gyoza dev: logs in {server_log} and {agent_log}", file=sys.stderr)
    host, _, port = server.listen.rpartition(":")
    address = f"{'127.0.0.1' if host in ('', '0.0.0.0', '[::]') else host}:{port}"
    agent = AgentConfig(
        server=address,
        name=f"{socket.gethostname()}-dev",
        state_dir=state,
        executor=executor or "docker",
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_dev(server, agent, ui_listen))
