"""The server under test: one ``python -m gyoza.server`` subprocess on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from bench.common import HOST, cpu_seconds, free_port, rss_bytes, threads, wait_for_port


class ServerProcess:
    """Starts the gyoza server as its own process, so that its CPU and memory are its
    own, and stops it.

    Parameters
    ----------
    workdir : Path
        Where the SQLite file (``bench.db``) and the server's log go.
    log_level : str
        The server's ``--log-level``.
    """

    def __init__(self, workdir: Path, *, log_level: str = "info") -> None:
        self.workdir = workdir
        self.port = free_port()
        self.database = workdir / "bench.db"
        self.log_path = workdir / "server.log"
        self.log_level = log_level
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``HOST:PORT`` of the server."""
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self._process is not None, "the server is not started"
        return self._process.pid

    @property
    def command(self) -> list[str]:
        """The command line that starts the server."""
        return [
            sys.executable,
            "-m",
            "gyoza.server",
            "--listen",
            self.address,
            "--database",
            f"sqlite:///{self.database}",
            "--log-level",
            self.log_level,
        ]

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the server and wait until it accepts connections.

        Raises
        ------
        RuntimeError
            When the server exits or does not listen in time (its log is quoted).
        """
        log = self.log_path.open("wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        self._process = subprocess.Popen(
            self.command,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self._process.returncode}:\n{self.log_tail()}"
                )
            try:
                wait_for_port(self.port, 0.2)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"the server did not listen in time:\n{self.log_tail()}"
                    ) from None

    def rss(self) -> int:
        """The server's resident memory in bytes.

        Raises
        ------
        RuntimeError
            When the server has exited (its status and log are quoted).
        """
        self.check()
        return rss_bytes(self.pid)

    def check(self) -> None:
        """Raise when the server has exited.

        Raises
        ------
        RuntimeError
            When it has (its status and log are quoted).
        """
        process = self._process
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"the server exited with status {process.returncode}:\n{self.log_tail()}"
            )

    def threads(self) -> int:
        """The server's thread count."""
        return threads(self.pid)

    def cpu_seconds(self) -> float:
        """CPU time the server has used so far."""
        return cpu_seconds(self.pid)

    def alive(self) -> bool:
        """True while the process runs."""
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after *timeout_s*."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
