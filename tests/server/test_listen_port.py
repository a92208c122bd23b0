"""Two servers can never silently share a port: the second one fails to start.

grpc sets ``SO_REUSEPORT`` by default on Linux; the server turns it off unless
``GYOZA_REUSE_PORT=1`` (what the ``--workers`` supervisor gives its replicas).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import GYOZA, Proc, free_port

pytestmark = pytest.mark.timeout(120)


def wait_for_log(proc: Proc, text: str, timeout: float) -> None:
    """Until *text* is in the process's log (bounded)."""
    deadline = time.monotonic() + timeout
    while text not in proc.log():
        assert proc.popen is not None and proc.popen.poll() is None, proc.log()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {text!r}")
        time.sleep(0.05)


@pytest.mark.parametrize("first_reuses", [False, True], ids=["plain", "first-reuses-port"])
def test_a_second_server_on_a_used_port_fails_to_start(tmp_path: Path, first_reuses: bool) -> None:
    address = f"127.0.0.1:{free_port()}"
    first = Proc(
        "first",
        [GYOZA, "server", "--listen", address, "--database", f"sqlite:///{tmp_path / 'a.db'}",
         "--log-format", "logfmt"],
        tmp_path / "first.log",
        env={"GYOZA_REUSE_PORT": "1"} if first_reuses else {},
    )  # fmt: skip
    first.start()
    try:
        wait_for_log(first, "server listening", 60)
        env = {k: v for k, v in os.environ.items() if k != "GYOZA_REUSE_PORT"}
        second = subprocess.run(
            [GYOZA, "server", "--listen", address, "--database",
             f"sqlite:///{tmp_path / 'b.db'}", "--log-format", "logfmt"],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        assert second.returncode == 1, second.stderr
        assert f"cannot listen on {address}" in second.stderr + second.stdout
        assert first.popen is not None and first.popen.poll() is None
    finally:
        first.stop()
