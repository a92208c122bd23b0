"""A Node.js client (@grpc/grpc-js + @grpc/proto-loader, from protos/) against the server.

The test installs the npm packages itself (``npm install`` in tests/node, cached in its
git-ignored node_modules), so a fresh machine needs nothing more than node and npm.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gyoza.api.v1 import op_run_service_pb2 as pb
from gyoza.api.v1 import resources_pb2

NODE_DIR = Path(__file__).resolve().parent.parent / "node"


def service_unavailable(message: str) -> None:
    """Fail under CI, skip elsewhere (as tests/conftest.py does for its services)."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def node_client() -> Path:
    """tests/node with its packages installed; the path of the client script."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        service_unavailable("node and npm are needed for the Node.js client test")
    installed = NODE_DIR / "node_modules" / "@grpc" / "grpc-js"
    if not installed.is_dir():
        proc = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if proc.returncode != 0:
            service_unavailable(f"npm install failed:\n{proc.stdout}{proc.stderr}")
    return NODE_DIR / "watch_run.js"


def test_node_client_creates_and_watches_a_run(sqlite_server: Any, node_client: Path) -> None:
    proc = subprocess.run(
        ["node", str(node_client), sqlite_server.address],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["created_state"] == "OP_RUN_STATE_PENDING"
    assert seen["final_state"] == "OP_RUN_STATE_CANCELLED"
    assert seen["request_id"] == "node-client-1"
    messages = seen["messages"]
    assert messages[0]["event"] is None  # the snapshot
    assert [m["event"] for m in messages[1:]] == ["EVENT_TYPE_INFO", "EVENT_TYPE_CANCELLED"]
    assert messages[-1]["priority"] == 9
    # The Python stubs see the same run.
    run = sqlite_server.stubs().runs.GetOpRun(pb.GetOpRunRequest(run_id=seen["run_id"])).op_run
    assert run.state == resources_pb2.OP_RUN_STATE_CANCELLED
