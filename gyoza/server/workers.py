"""``gyoza server --workers N``: a supervisor of N replica processes on one address.

The supervisor serves nothing itself. It starts N children, each ``python -m
gyoza.server`` with the supervisor's own flags (minus ``--workers``) and, in its
environment:

* ``GYOZA_REUSE_PORT=1``: the children bind the one ``--listen`` address together
  (``SO_REUSEPORT``; the kernel spreads new connections over them);
* ``GYOZA_WORKER_INDEX=i`` (0 to N-1);
* ``GYOZA_PEER_LISTEN=<listen host>:0`` (``127.0.0.1`` for a wildcard host), unless one
  was given: each child serves its own peer port, which it advertises to the others for
  forwarding;
* metrics on ``--metrics-port`` + i, when metrics are on;
* ``--replica-id <id>-<i>`` when a replica id was given.

The children are replicas on one PostgreSQL database (:mod:`gyoza.server.replica`):
one leads, the others forward to it. A child that dies is started again after a backoff
(logged); SIGTERM or SIGINT is passed on to every child, and the supervisor waits for
them (their shutdown grace) before it exits; a second signal kills them at once. A child dies with the supervisor: it asks
the kernel for SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

from gyoza.server.config import ServerConfig
from gyoza.server.logs import log_event

log = logging.getLogger("gyoza.server.workers")

SUPERVISOR_PID_VARIABLE = "GYOZA_SUPERVISOR_PID"
"""Set in a child's environment: the pid of the supervisor it must die with."""

RESTART_INITIAL_S = 0.5
RESTART_MAX_S = 30.0
STABLE_S = 30.0
"""A child that ran this long before it died is restarted after the initial delay again."""

STOP_MARGIN_S = 15.0
"""How much longer than the shutdown grace the supervisor waits for a child to stop
before it kills it."""

_LIST_FLAGS = {"api_keys": "GYOZA_API_KEYS", "agent_tokens": "GYOZA_AGENT_TOKENS"}
"""Repeatable flags, handed on in the environment (not in the process list)."""

_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def child_command(config: ServerConfig, flags: Mapping[str, Any], index: int) -> list[str]:
    """The command line of child *index*: the given flags, minus ``--workers``.

    Parameters
    ----------
    config : ServerConfig
        The supervisor's resolved settings.
    flags : Mapping[str, Any]
        The flag values the supervisor was given (``None``: not given), by the names
        of :func:`gyoza.server.app.main_server`'s arguments.
    index : int
        The child's index.
    """
    values = {k: v for k, v in flags.items() if v is not None and k not in _LIST_FLAGS}
    values.pop("workers", None)
    if config.metrics_port is not None:
        # Port 0 picks a free port for each; any other is the first child's.
        values["metrics_port"] = config.metrics_port + index if config.metrics_port else 0
    if config.replica_id:
        values["replica_id"] = f"{config.replica_id}-{index}"
    command = [sys.executable, "-m", "gyoza.server"]
    for name, value in values.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    return command


def child_environment(
    config: ServerConfig, flags: Mapping[str, Any], index: int, environ: Mapping[str, str]
) -> dict[str, str]:
    """The environment of child *index* (see the module's docstring)."""
    env = {k: v for k, v in environ.items() if k != "GYOZA_WORKERS"}
    for name, variable in _LIST_FLAGS.items():
        if flags.get(name):
            env[variable] = ",".join(flags[name])
    env["GYOZA_REUSE_PORT"] = "1"
    env["GYOZA_WORKER_INDEX"] = str(index)
    env[SUPERVISOR_PID_VARIABLE] = str(os.getpid())
    if config.peer_listen is None:
        host = config.listen_host
        if host in _WILDCARD_HOSTS:
            host = "127.0.0.1"
        env["GYOZA_PEER_LISTEN"] = f"[{host}]:0" if ":" in host else f"{host}:0"
    return env


def die_with_supervisor(environ: Mapping[str, str] | None = None) -> None:
    """In a child: have the kernel send SIGTERM when the supervisor dies; exit at once
    when it is already gone. Does nothing outside a supervisor (or off Linux)."""
    env = os.environ if environ is None else environ
    parent = env.get(SUPERVISOR_PID_VARIABLE, "").strip()
    if not parent.isdigit():
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    except (AttributeError, OSError) as error:
        log_event(log, logging.WARNING, "cannot tie the worker to its supervisor", error=str(error))
        return
    # The supervisor may have died between the fork and the prctl.
    if os.getppid() != int(parent):
        raise SystemExit(0)


class Supervisor:
    """Keeps N children serving until SIGTERM or SIGINT; see the module's docstring.

    Parameters
    ----------
    config : ServerConfig
        Settings; ``config.workers`` children are run.
    flags : Mapping[str, Any]
        The flag values given, handed on to the children.
    environ : Mapping[str, str] | None
        The environment handed on; :data:`os.environ` by default.
    """

    def __init__(
        self,
        config: ServerConfig,
        flags: Mapping[str, Any],
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.flags = dict(flags)
        self.environ = dict(os.environ if environ is None else environ)
        self.count = config.workers or 1
        self._stop = asyncio.Event()
        self._signal: signal.Signals = signal.SIGTERM
        self._children: dict[int, asyncio.subprocess.Process] = {}

    def request_stop(self, signum: signal.Signals = signal.SIGTERM) -> None:
        """Stop: pass *signum* on to every child, and wait for them; a second request
        kills them at once."""
        again = self._stop.is_set()
        if not again:
            self._signal = signum
            self._stop.set()
        log_event(
            log,
            logging.INFO if not again else logging.WARNING,
            "supervisor stopping" if not again else "supervisor killing its workers",
            signal=signum.name,
        )
        for process in self._children.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGKILL if again else signum)

    async def run(self) -> int:
        """Run the children until stopped; the exit status (0)."""
        log_event(
            log,
            logging.INFO,
            "supervisor started",
            workers=self.count,
            listen=self.config.listen,
            pid=os.getpid(),
        )
        await asyncio.gather(*(self._keep(index) for index in range(self.count)))
        log_event(log, logging.INFO, "supervisor stopped")
        return 0

    async def _keep(self, index: int) -> None:
        """Run child *index*, again after each death, until stopped."""
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._stop.is_set():
            process = await asyncio.create_subprocess_exec(
                *child_command(self.config, self.flags, index),
                env=child_environment(self.config, self.flags, index, self.environ),
            )
            self._children[index] = process
            started = loop.time()
            log_event(log, logging.INFO, "worker started", worker=index, pid=process.pid)
            if self._stop.is_set():  # stopped while it was being started
                process.send_signal(self._signal)
            ended = asyncio.ensure_future(process.wait())
            stopping = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({ended, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if self._stop.is_set():
                await self._wait_stopped(index, process, ended)
                return
            failures = 1 if loop.time() - started >= STABLE_S else failures + 1
            delay = min(RESTART_MAX_S, RESTART_INITIAL_S * 2 ** (failures - 1))
            log_event(
                log,
                logging.WARNING,
                "worker died; restarting",
                worker=index,
                pid=process.pid,
                exit_code=process.returncode,
                restart_in_s=delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def _wait_stopped(
        self, index: int, process: asyncio.subprocess.Process, ended: asyncio.Future[int]
    ) -> None:
        timeout = self.config.shutdown_grace_s + STOP_MARGIN_S
        try:
            await asyncio.wait_for(asyncio.shield(ended), timeout)
        except TimeoutError:
            log_event(
                log,
                logging.WARNING,
                "worker did not stop; killing it",
                worker=index,
                pid=process.pid,
            )
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await ended
        log_event(
            log,
            logging.INFO,
            "worker stopped",
            worker=index,
            pid=process.pid,
            exit_code=process.returncode,
        )


def run_supervisor(config: ServerConfig, flags: Mapping[str, Any]) -> int:
    """Run a :class:`Supervisor` until SIGTERM or SIGINT; the exit status."""

    async def main() -> int:
        supervisor = Supervisor(config, flags)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, supervisor.request_stop, signum)
        return await supervisor.run()

    return asyncio.run(main())
