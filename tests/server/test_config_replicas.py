"""Replica and ``--workers`` settings, and what a supervisor hands its workers."""

from __future__ import annotations

import os
import sys

import pytest

from gyoza.server.config import ConfigError, ServerConfig
from gyoza.server.workers import child_command, child_environment

PG = "postgresql://u@db/gyoza"


def test_replica_settings_from_flags_then_environment_then_defaults() -> None:
    config = ServerConfig.resolve(environ={})
    assert (config.replica_id, config.peer_listen, config.leader_lease_s) == ("", None, 10.0)
    assert config.workers is None
    env = {
        "GYOZA_REPLICA_ID": "r-env",
        "GYOZA_PEER_LISTEN": "10.0.0.1:0",
        "GYOZA_LEADER_LEASE_S": "4",
        "GYOZA_WORKERS": "3",
        "GYOZA_DATABASE_URL": PG,
    }
    config = ServerConfig.resolve(environ=env)
    assert (config.replica_id, config.peer_listen, config.leader_lease_s) == (
        "r-env",
        "10.0.0.1:0",
        4.0,
    )
    assert config.workers == 3
    config = ServerConfig.resolve(
        environ=env, replica_id="r", peer_listen="[::1]:0", leader_lease_s=2.5, workers=2
    )
    assert (config.replica_id, config.peer_listen, config.leader_lease_s, config.workers) == (
        "r",
        "[::1]:0",
        2.5,
        2,
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"workers": 2}, "--workers needs a PostgreSQL database"),
        ({"workers": 2, "database": PG, "listen": "127.0.0.1:0"}, "fixed --listen port"),
        ({"workers": 0, "database": PG}, "--workers must be 1 or more"),
        ({"workers": 2, "database": PG, "peer_listen": "h:7000"}, "must have port 0"),
        ({"peer_listen": "nohost"}, "--peer-listen"),
        ({"leader_lease_s": 0}, "--leader-lease-s must be more than zero"),
    ],
)
def test_bad_replica_settings_are_refused(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig.resolve(environ={}, **flags)  # type: ignore[arg-type]


def test_a_worker_gets_the_flags_minus_workers_and_its_own_ports() -> None:
    flags = {
        "listen": "0.0.0.0:7000",
        "database": PG,
        "metrics_port": 9100,
        "replica_id": "node",
        "api_keys": ["k1", "k2"],
        "agent_tokens": None,
        "shutdown_grace": 3.0,
        "log_level": None,
    }
    config = ServerConfig.resolve(environ={}, workers=2, **flags)  # type: ignore[arg-type]
    command = child_command(config, {**flags, "workers": 2}, 1)
    assert command[:3] == [sys.executable, "-m", "gyoza.server"]
    assert "--workers" not in command and "--log-level" not in command
    assert command[command.index("--metrics-port") + 1] == "9101"
    assert command[command.index("--replica-id") + 1] == "node-1"
    assert command[command.index("--shutdown-grace") + 1] == "3.0"
    assert "k1" not in " ".join(command)  # keys travel in the environment
    env = child_environment(config, flags, 1, {"GYOZA_WORKERS": "2", "HOME": "/h"})
    assert env["GYOZA_API_KEYS"] == "k1,k2" and env["HOME"] == "/h"
    assert "GYOZA_WORKERS" not in env
    assert env["GYOZA_REUSE_PORT"] == "1" and env["GYOZA_WORKER_INDEX"] == "1"
    assert env["GYOZA_PEER_LISTEN"] == "127.0.0.1:0"  # a wildcard host
    assert env["GYOZA_SUPERVISOR_PID"] == str(os.getpid())


def test_a_given_peer_address_is_kept() -> None:
    config = ServerConfig.resolve(
        environ={}, listen="[::1]:7000", database=PG, workers=2, peer_listen="10.0.0.2:0"
    )
    env = child_environment(config, {"peer_listen": "10.0.0.2:0"}, 0, {})
    assert "GYOZA_PEER_LISTEN" not in env
    assert child_command(config, {"peer_listen": "10.0.0.2:0"}, 0)[-2:] == [
        "--peer-listen",
        "10.0.0.2:0",
    ]
    plain = ServerConfig.resolve(environ={}, listen="[::1]:7000", database=PG, workers=2)
    assert child_environment(plain, {}, 0, {})["GYOZA_PEER_LISTEN"] == "[::1]:0"
