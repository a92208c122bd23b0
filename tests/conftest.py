"""Fixtures shared by every test: the Docker engine, the test image and PostgreSQL.

`make test` (and `.ci/run`) start the services first: scripts/start-dockerd.sh,
scripts/start-postgres.sh (which gives GYOZA_TEST_POSTGRES_URL) and
scripts/make-test-image.sh. When a service is missing, a test that needs it fails
under CI (env CI set) and is skipped elsewhere.
"""

from __future__ import annotations

import gc
import os
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_IMAGE = "gyoza-test/busybox:latest"

_DOCKER_FIXTURES = {"docker_client", "test_image"}
_POSTGRES_FIXTURES = {"postgres_url", "fresh_pg_database"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def service_unavailable(message: str) -> None:
    """Fail under CI, skip elsewhere: CI must never pass by skipping."""
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Mark tests by the services they use, so `-m "not docker"` works.
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & _DOCKER_FIXTURES:
            item.add_marker(pytest.mark.docker)
        if names & _POSTGRES_FIXTURES:
            item.add_marker(pytest.mark.postgres)


def libpq_url(url: str) -> str:
    """A SQLAlchemy URL (postgresql+psycopg://...) as a libpq/psycopg conninfo URL."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _with_database(url: str, database: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=database).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """SQLAlchemy URL of the test PostgreSQL database (env GYOZA_TEST_POSTGRES_URL)."""
    import psycopg

    url = os.environ.get("GYOZA_TEST_POSTGRES_URL", "").strip()
    if not url:
        service_unavailable(
            "GYOZA_TEST_POSTGRES_URL is not set; run scripts/start-postgres.sh (or `make test`)"
        )
    try:
        with psycopg.connect(libpq_url(url), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # any failure means: no usable server
        service_unavailable(f"PostgreSQL at {url} is not reachable: {exc}")
    return url


@pytest.fixture
def fresh_pg_database(postgres_url: str) -> Iterator[str]:
    """A new, empty database on the test server; yields its SQLAlchemy URL, drops it after."""
    import psycopg
    from psycopg import sql

    name = f"gyoza_t_{uuid.uuid4().hex[:16]}"
    admin = libpq_url(postgres_url)
    with psycopg.connect(admin, connect_timeout=3, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_database(postgres_url, name)
    finally:
        with psycopg.connect(admin, connect_timeout=3, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    """A docker.DockerClient for the local engine; makes sure the test image exists."""
    import docker

    client = None
    error = None
    # docker-py leaves the socket of a failed connect open: drop it here, quietly,
    # rather than as an unraisable ResourceWarning later in the session.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=30)
            client.ping()
        except Exception as exc:  # any failure means: no usable engine
            error = f"Docker engine not available: {exc}; run scripts/start-dockerd.sh"
            if client is not None:
                client.close()
        gc.collect()
    if error is not None:
        service_unavailable(error)
    assert client is not None
    try:
        _ensure_test_image(client)
        yield client
    finally:
        client.close()


def _ensure_test_image(client: Any) -> None:
    import docker.errors

    try:
        client.images.get(TEST_IMAGE)
        return
    except docker.errors.ImageNotFound:
        pass
    proc = subprocess.run(
        [str(REPO_ROOT / "scripts" / "make-test-image.sh")],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        service_unavailable(
            f"could not build {TEST_IMAGE}: scripts/make-test-image.sh exited "
            f"{proc.returncode}\n{proc.stdout}{proc.stderr}"
        )


@pytest.fixture(scope="session")
def test_image(docker_client: Any) -> str:
    """Name of the busybox test image (built by scripts/make-test-image.sh)."""
    return TEST_IMAGE


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA with a server certificate for 127.0.0.1 and a client certificate.

    Files: ``ca.pem``, ``server.pem``/``server.key``, ``client.pem``/``client.key``, and
    ``agent.pem``/``agent.key`` for an agent named ``node-a`` (its CN and a DNS SAN).
    """
    import shutil

    if shutil.which("openssl") is None:
        service_unavailable("the openssl command is needed to make test certificates")
    where = tmp_path_factory.mktemp("pki")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=gyoza test CA", "-keyout", "ca.key", "-out", "ca.pem",
        cwd=where,
    )  # fmt: skip
    (where / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (where / "agent.ext").write_text("subjectAltName=DNS:node-a\n")
    for name, cn, extra in (
        ("server", "gyoza server", ["-extfile", "server.ext"]),
        ("client", "gyoza client", []),
        ("agent", "node-a", ["-extfile", "agent.ext"]),
    ):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr",
            cwd=where,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *extra,
            cwd=where,
        )  # fmt: skip
    return where
