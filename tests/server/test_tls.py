"""TLS and mutual TLS by flags, with certificates made by the openssl command."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gyoza.api.v1 import op_run_service_pb2 as pb
from gyoza.api.v1 import op_run_service_pb2_grpc


def wait_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 30
    while True:
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def create(channel: grpc.Channel) -> Any:
    stub = op_run_service_pb2_grpc.OpRunServiceStub(channel)
    return stub.CreateOpRun(pb.CreateOpRunRequest(image="busybox"), timeout=10).op_run


def test_tls(server_factory: Callable[..., Any], pki: Path) -> None:
    server = server_factory(
        args=["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")]
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
    channel = server.channel(credentials=credentials)
    wait_serving(channel)
    assert create(channel).id
    assert any(e.get("tls") == "tls" for e in server.log_events())
    with pytest.raises(grpc.RpcError):
        create(server.channel())  # plaintext is refused


def test_mutual_tls(server_factory: Callable[..., Any], pki: Path) -> None:
    server = server_factory(
        args=[
            "--tls-cert", str(pki / "server.pem"),
            "--tls-key", str(pki / "server.key"),
            "--tls-client-ca", str(pki / "ca.pem"),
        ]
    )  # fmt: skip
    root = (pki / "ca.pem").read_bytes()
    with_cert = server.channel(
        credentials=grpc.ssl_channel_credentials(
            root_certificates=root,
            private_key=(pki / "client.key").read_bytes(),
            certificate_chain=(pki / "client.pem").read_bytes(),
        )
    )
    wait_serving(with_cert)
    assert create(with_cert).id
    without_cert = server.channel(credentials=grpc.ssl_channel_credentials(root_certificates=root))
    with pytest.raises(grpc.RpcError) as caught:
        create(without_cert)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_bad_tls_flags_stop_the_server_at_start(tmp_path: Path) -> None:
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "gyoza.server", "--tls-cert", "/nonexistent.pem"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert "--tls-key" in proc.stderr
