"""The test services themselves: the Docker engine with the test image, and PostgreSQL."""

from __future__ import annotations

from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import make_url


def test_container_runs_without_network(docker_client: Any, test_image: str) -> None:
    container = docker_client.containers.run(
        test_image,
        ["sh", "-c", "echo hello-gyoza; ls /sys/class/net"],
        network_mode="none",
        init=True,
        detach=True,
    )
    try:
        result = container.wait(timeout=30)
        logs = container.logs(stdout=True, stderr=True).decode()
    finally:
        container.remove(force=True)
    assert result["StatusCode"] == 0, logs
    lines = logs.split()
    assert lines[0] == "hello-gyoza"
    assert lines[1:] == ["lo"]  # network_mode none: loopback only


def test_container_exit_code(docker_client: Any, test_image: str) -> None:
    container = docker_client.containers.run(
        test_image, ["sh", "-c", "exit 3"], network_mode="none", detach=True
    )
    try:
        assert container.wait(timeout=30)["StatusCode"] == 3
    finally:
        container.remove(force=True)


def test_postgres_select_one(postgres_url: str) -> None:
    conninfo = make_url(postgres_url).set(drivername="postgresql")
    with psycopg.connect(conninfo.render_as_string(hide_password=False), connect_timeout=3) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_fresh_pg_database_is_empty_and_separate(postgres_url: str, fresh_pg_database: str) -> None:
    assert fresh_pg_database != postgres_url
    engine = sa.create_engine(fresh_pg_database)
    try:
        with engine.begin() as conn:
            name = conn.execute(sa.text("SELECT current_database()")).scalar_one()
            tables = conn.execute(
                sa.text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            ).scalar_one()
            conn.execute(sa.text("CREATE TABLE scratch (id int PRIMARY KEY)"))
    finally:
        engine.dispose()
    assert name.startswith("gyoza_t_")
    assert tables == 0
