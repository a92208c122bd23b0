"""API keys and agent tokens: two kinds of credentials, never interchangeable."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gyoza.api.v1 import agent_service_pb2
from gyoza.api.v1 import op_run_service_pb2 as pb

ExpectError = Callable[[Callable[[], Any]], Any]

ARGS = ["--api-key", "client-key-1", "--api-key", "client-key-2", "--agent-token", "agent-tok"]


def bearer(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


def create(stubs: Any, metadata: list[tuple[str, str]]) -> Any:
    return stubs.runs.CreateOpRun(pb.CreateOpRunRequest(image="busybox"), metadata=metadata)


@pytest.fixture
def secured(server_factory: Callable[..., Any]) -> Any:
    return server_factory(args=ARGS)


def test_client_calls_need_a_client_key(secured: Any, expect_error: ExpectError) -> None:
    stubs = secured.stubs()
    assert create(stubs, bearer("client-key-1")).op_run.id
    assert create(stubs, bearer("client-key-2")).op_run.id

    missing = expect_error(lambda: create(stubs, []))
    assert missing.code == grpc.StatusCode.UNAUTHENTICATED
    assert missing.reason == "CREDENTIALS_MISSING"
    wrong = expect_error(lambda: create(stubs, bearer("guess")))
    assert wrong.code == grpc.StatusCode.UNAUTHENTICATED
    assert wrong.reason == "CREDENTIALS_INVALID"
    not_bearer = expect_error(lambda: create(stubs, [("authorization", "Basic client-key-1")]))
    assert not_bearer.code == grpc.StatusCode.UNAUTHENTICATED
    agent = expect_error(lambda: create(stubs, bearer("agent-tok")))
    assert agent.code == grpc.StatusCode.PERMISSION_DENIED
    assert agent.reason == "API_KEY_REQUIRED"
    # Streams are guarded too.
    watch = expect_error(
        lambda: stubs.runs.WatchOpRun(pb.WatchOpRunRequest(run_id="run_000000000000"))
    )
    assert watch.code == grpc.StatusCode.UNAUTHENTICATED
    fleet = expect_error(
        lambda: stubs.agents.ListAgents(
            agent_service_pb2.ListAgentsRequest(), metadata=bearer("agent-tok")
        )
    )
    assert fleet.code == grpc.StatusCode.PERMISSION_DENIED
    assert stubs.agents.ListAgents(
        agent_service_pb2.ListAgentsRequest(), metadata=bearer("client-key-1")
    )


def test_agent_stream_needs_an_agent_token(secured: Any, fake_agent: Callable[..., Any]) -> None:
    channel = secured.channel()
    agent = fake_agent(channel, "node-a", metadata=bearer("agent-tok"))
    assert agent.welcome.session_id

    for metadata, code in (
        (bearer("client-key-1"), grpc.StatusCode.PERMISSION_DENIED),
        ([], grpc.StatusCode.UNAUTHENTICATED),
        (bearer("nope"), grpc.StatusCode.UNAUTHENTICATED),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            fake_agent(channel, "node-b", metadata=metadata)
        assert caught.value.code() == code  # type: ignore[attr-defined]


def test_health_and_reflection_stay_open(secured: Any) -> None:
    stubs = secured.stubs()
    reply = stubs.health.Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(stubs.channel)
    answers = list(
        reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
    )
    names = {s.name for s in answers[0].list_services_response.service}
    assert "gyoza.api.v1.OpRunService" in names


def test_keys_from_the_environment(
    server_factory: Callable[..., Any], expect_error: ExpectError
) -> None:
    server = server_factory(
        env={"GYOZA_API_KEYS": "env-key-1, env-key-2", "GYOZA_AGENT_TOKENS": "t"}
    )
    stubs = server.stubs()
    assert create(stubs, bearer("env-key-2")).op_run.id
    assert expect_error(lambda: create(stubs, [])).code == grpc.StatusCode.UNAUTHENTICATED


def test_open_server_says_so_and_secured_one_does_not(sqlite_server: Any, secured: Any) -> None:
    def warnings(server: Any) -> list[str]:
        return [e["msg"] for e in server.log_events() if e.get("level") == "warning"]

    assert any("open" in message for message in warnings(sqlite_server))
    assert not any("open" in message for message in warnings(secured))
    # An open server takes calls with or without a key.
    stubs = sqlite_server.stubs()
    assert create(stubs, []).op_run.id
    assert create(stubs, bearer("anything")).op_run.id


def _live(stubs: Any, metadata: list[tuple[str, str]]) -> dict[str, str]:
    agents = stubs.agents.ListAgents(
        agent_service_pb2.ListAgentsRequest(), metadata=metadata
    ).agents
    return {a.name: a.session_id for a in agents}


def test_an_agent_token_cannot_impersonate_another_agent(
    server_factory: Callable[..., Any],
    fake_agent: Callable[..., Any],
    expect_error: ExpectError,
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "agent-tokens"
    tokens.write_text("# agent tokens, bound to names\nnode-a:tok-a\n\nnode-b*:tok-b\n")
    keys = tmp_path / "api-keys"
    keys.write_text("key-1\n")
    server = server_factory(args=["--agent-tokens-file", str(tokens), "--api-keys-file", str(keys)])
    # Secrets given as files never show in the process list.
    assert server.popen is not None
    cmdline = Path(f"/proc/{server.popen.pid}/cmdline").read_bytes()
    assert b"tok-a" not in cmdline and b"key-1" not in cmdline
    stubs = server.stubs()
    channel = server.channel()
    real = fake_agent(channel, "node-a", metadata=bearer("tok-a"))
    assert fake_agent(channel, "node-b7", metadata=bearer("tok-b")).welcome.session_id

    stolen = expect_error(lambda: fake_agent(channel, "node-a", metadata=bearer("tok-b")))
    assert (stolen.code, stolen.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "AGENT_NAME_NOT_ALLOWED",
    )
    assert "tok-b" not in stolen.message
    # The real session is untouched: still connected, and it gets the next run.
    assert _live(stubs, bearer("key-1"))["node-a"] == real.welcome.session_id
    runs = [
        stubs.runs.CreateOpRun(pb.CreateOpRunRequest(image="busybox"), metadata=bearer("key-1"))
        for _ in range(4)
    ]
    assert real.receive("assignment").assignment.run_id in {r.op_run.id for r in runs}

    # The same token again (the agent restarting) takes its name over.
    again = fake_agent(channel, "node-a", metadata=bearer("tok-a"))
    assert _live(stubs, bearer("key-1"))["node-a"] == again.welcome.session_id


def test_a_connected_name_is_taken_over_only_with_the_same_identity(
    server_factory: Callable[..., Any], fake_agent: Callable[..., Any], expect_error: ExpectError
) -> None:
    server = server_factory(env={"GYOZA_AGENT_TOKENS": "shared-1,shared-2"})
    channel = server.channel()
    first = fake_agent(channel, "node-x", metadata=bearer("shared-1"))
    other = expect_error(lambda: fake_agent(channel, "node-x", metadata=bearer("shared-2")))
    assert (other.code, other.reason) == (grpc.StatusCode.PERMISSION_DENIED, "AGENT_NAME_IN_USE")
    assert _live(server.stubs(), [])["node-x"] == first.welcome.session_id
    # Unbound tokens are worth a warning at start.
    assert any("not bound" in e["msg"] for e in server.log_events() if e.get("level") == "warning")


def test_with_mutual_tls_the_certificate_names_the_agent(
    server_factory: Callable[..., Any],
    fake_agent: Callable[..., Any],
    expect_error: ExpectError,
    pki: Path,
) -> None:
    server = server_factory(
        args=[
            "--tls-cert", str(pki / "server.pem"),
            "--tls-key", str(pki / "server.key"),
            "--tls-client-ca", str(pki / "ca.pem"),
        ]
    )  # fmt: skip
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / "agent.key").read_bytes(),
        certificate_chain=(pki / "agent.pem").read_bytes(),
    )
    channel = server.channel(credentials=credentials)
    assert fake_agent(channel, "node-a").welcome.session_id
    other = expect_error(lambda: fake_agent(channel, "node-z"))
    assert (other.code, other.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "AGENT_CERTIFICATE_MISMATCH",
    )
