"""Settings of ``gyoza server``: flags win over environment variables over defaults."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from gyoza.server.auth import AuthPolicy, Principal
from gyoza.server.config import ConfigError, ServerConfig, normalize_database_url, split_listen
from gyoza.server.errors import ApiError
from gyoza.server.retention import parse_duration


def test_defaults() -> None:
    config = ServerConfig.resolve(environ={})
    assert config.listen == "127.0.0.1:50051"
    assert config.database_url == "sqlite:///gyoza.db"
    assert config.tls is None
    assert config.api_keys == () and config.agent_tokens == ()
    assert config.metrics_port is None
    assert config.max_message_bytes == 4 * 1024 * 1024
    assert config.max_json_bytes == 1024 * 1024


def test_environment_then_flags() -> None:
    env = {
        "GYOZA_LISTEN": "0.0.0.0:7000",
        "GYOZA_DATABASE_URL": "postgresql://u:p@db/gyoza",
        "GYOZA_API_KEYS": "a, b,,a",
        "GYOZA_AGENT_TOKENS": "t1",
        "GYOZA_METRICS_PORT": "9100",
        "GYOZA_LEASE_TIMEOUT_S": "3",
    }
    config = ServerConfig.resolve(environ=env)
    assert config.listen == "0.0.0.0:7000"
    assert config.database_url == "postgresql+psycopg://u:p@db/gyoza"
    assert config.api_keys == ("a", "b")
    assert config.agent_tokens == ("t1",)
    assert config.metrics_port == 9100
    assert config.control.lease_timeout_s == 3
    flagged = ServerConfig.resolve(
        listen="[::1]:9000", database="local.db", api_keys=["z"], metrics_port=0, environ=env
    )
    assert flagged.listen == "[::1]:9000"
    assert flagged.listen_host == "::1"
    assert flagged.database_url == "sqlite:///local.db"
    assert flagged.api_keys == ("z",)
    assert flagged.metrics_port == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"listen": "nohost"}, "HOST:PORT"),
        ({"listen": "h:99999"}, "0-65535"),
        ({"tls_cert": "c.pem"}, "--tls-key"),
        ({"tls_client_ca": "ca.pem"}, "--tls-cert"),
        ({"metrics_port": 70000}, "--metrics-port"),
        ({"log_level": "loud"}, "--log-level"),
        ({"shutdown_grace": -1.0}, "--shutdown-grace"),
        ({"retention": "30 days"}, "--retention"),
        ({"retention": "0d"}, "--retention"),
    ],
)
def test_bad_settings_are_refused(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig.resolve(environ={}, **flags)  # type: ignore[arg-type]


def test_tls_files_must_exist(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(ConfigError, match="does not exist"):
        ServerConfig.resolve(tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem", environ={})


def test_listen_and_database_helpers() -> None:
    assert split_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert normalize_database_url("/var/lib/gyoza.db") == "sqlite:////var/lib/gyoza.db"
    assert normalize_database_url("sqlite:///x.db") == "sqlite:///x.db"


def test_auth_policy() -> None:
    policy = AuthPolicy(["key"], ["tok"])
    create = "/gyoza.api.v1.OpRunService/CreateOpRun"
    connect = "/gyoza.api.v1.AgentService/Connect"
    assert policy.authorize(create, "Bearer key") is Principal.CLIENT
    assert policy.authorize(connect, "bearer tok") is Principal.AGENT
    assert policy.authorize("/grpc.health.v1.Health/Check", None) is Principal.ANONYMOUS
    for method, header, reason in (
        (create, None, "CREDENTIALS_MISSING"),
        (create, "Bearer nope", "CREDENTIALS_INVALID"),
        (create, "Bearer tok", "API_KEY_REQUIRED"),
        (connect, "Bearer key", "AGENT_TOKEN_REQUIRED"),
    ):
        with pytest.raises(ApiError) as caught:
            policy.authorize(method, header)
        assert caught.value.reason == reason
    # One kind configured leaves the other open (and the server warns about it).
    clients_only = AuthPolicy(["key"], [])
    assert clients_only.agents_open and not clients_only.clients_open
    assert clients_only.authorize(connect, None) is Principal.ANONYMOUS


def test_retention_takes_an_age_with_a_unit() -> None:
    assert ServerConfig.resolve(environ={}).retention is None
    assert ServerConfig.resolve(retention="30d", environ={}).retention == timedelta(days=30)
    env = {"GYOZA_RETENTION": "12h", "GYOZA_RETENTION_INTERVAL_S": "5"}
    config = ServerConfig.resolve(environ=env)
    assert (config.retention, config.retention_interval_s) == (timedelta(hours=12), 5.0)
    assert ServerConfig.resolve(retention="90m", environ=env).retention == timedelta(minutes=90)
    assert ServerConfig.resolve(retention="off", environ=env).retention is None
    assert parse_duration("45") == timedelta(seconds=45)
    assert parse_duration("2w") == timedelta(weeks=2)
