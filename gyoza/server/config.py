"""Settings of ``gyoza server``: flags, then environment variables, then defaults.

Every setting has a flag of ``gyoza server`` (and ``python -m gyoza.server``); most also
have an environment variable. :meth:`ServerConfig.resolve` takes the flag values (``None``
where a flag was not given) and fills in the rest, so the CLI and the module entry point
resolve settings the same way.

=====================  =========================  ==============================
flag                   environment                default
=====================  =========================  ==============================
``--listen``           ``GYOZA_LISTEN``           ``127.0.0.1:50051``
``--database``         ``GYOZA_DATABASE_URL``     ``sqlite:///gyoza.db`` (cwd)
``--tls-cert``         ``GYOZA_TLS_CERT``         none (plaintext)
``--tls-key``          ``GYOZA_TLS_KEY``          none
``--tls-client-ca``    ``GYOZA_TLS_CLIENT_CA``    none (no client certificates)
``--api-key`` (many)   ``GYOZA_API_KEYS`` (a,b)   none (clients open)
``--api-keys-file``    ``GYOZA_API_KEYS_FILE``    none (one key a line)
``--agent-token``      ``GYOZA_AGENT_TOKENS``     none (agents open)
``--agent-tokens-file``  ``GYOZA_AGENT_TOKENS_FILE``  none (one ``[PATTERN:]TOKEN`` a line)
``--metrics-port``     ``GYOZA_METRICS_PORT``     off
``--log-level``        ``GYOZA_LOG_LEVEL``        ``info``
``--log-format``       ``GYOZA_LOG_FORMAT``       ``json``
``--shutdown-grace``   ``GYOZA_SHUTDOWN_GRACE``   ``10`` seconds
``--retention``        ``GYOZA_RETENTION``        off (finished runs are kept)
``--starvation-s``     ``GYOZA_STARVATION_S``     ``60`` seconds
``--replica-id``       ``GYOZA_REPLICA_ID``       ``<hostname>-<pid>-<random4>``
``--peer-listen``      ``GYOZA_PEER_LISTEN``      none (advertise ``--listen``)
``--leader-lease-s``   ``GYOZA_LEADER_LEASE_S``   ``10`` seconds
``--workers``          ``GYOZA_WORKERS``          none (one process)
=====================  =========================  ==============================

The last four concern several replicas on one PostgreSQL database (see
:mod:`gyoza.server.replica` and :mod:`gyoza.server.workers`); ``--workers`` is refused
on SQLite and with a ``--listen`` port of 0.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from gyoza.server.control import ControlSettings
from gyoza.server.logs import LOG_FORMATS
from gyoza.server.retention import parse_duration

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATABASE_URL = "sqlite:///gyoza.db"
"""A SQLite file in the working directory."""

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""Largest gRPC message the server receives or sends."""

MAX_JSON_BYTES = 1024 * 1024
"""Largest JSON document (a run's inputs, an op's outputs, an event payload)."""

LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A setting has a value the server cannot use."""


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate and key, and the CA that signs client certificates.

    Attributes
    ----------
    cert : Path
        PEM certificate chain of the server.
    key : Path
        PEM private key of the server.
    client_ca : Path | None
        PEM CA bundle; when set, clients must present a certificate it signed (mTLS).
    """

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``gyoza server`` needs to start.

    Attributes
    ----------
    listen : str
        ``HOST:PORT`` to serve gRPC on; port 0 picks a free port (it is logged).
    database_url : str
        SQLAlchemy URL of the store (``sqlite:///path`` or ``postgresql+psycopg://...``).
    tls : TlsFiles | None
        TLS (and mTLS) files; ``None`` serves plaintext.
    api_keys : tuple[str, ...]
        Client API keys; empty leaves the client methods open.
    agent_tokens : tuple[str, ...]
        Agent tokens; empty leaves ``AgentService.Connect`` open.
    metrics_port : int | None
        Port of the Prometheus ``/metrics`` endpoint (on the gRPC host); ``None``: off.
    log_level : str
        Lowest log level written.
    log_format : str
        ``json`` or ``logfmt``.
    shutdown_grace_s : float
        On SIGTERM, how long in-flight calls may take to finish.
    max_message_bytes : int
        Largest gRPC message received or sent.
    max_json_bytes : int
        Largest inputs, outputs or event payload, as JSON.
    control : ControlSettings
        Timing of the agent protocol.
    retention : timedelta | None
        Finished runs whose last change is older than this are deleted, with their
        events, logs and topic records; ``None`` keeps them.
    retention_interval_s : float
        Time between retention sweeps (``GYOZA_RETENTION_INTERVAL_S``, default 60).
    replica_id : str
        Name of this replica in the leadership row and in ListAgents; empty: a default
        of ``<hostname>-<pid>-<random4>``.
    peer_listen : str | None
        Extra ``HOST:PORT`` served and advertised to the other replicas for
        forwarding (port 0 picks one); ``None``: the ``listen`` address is advertised.
    leader_lease_s : float
        Length of the leadership lease; the leader renews it every third of it.
    workers : int | None
        Run a supervisor of this many replica processes sharing ``listen`` (PostgreSQL
        only, :mod:`gyoza.server.workers`); ``None``: this process is the server.
    """

    listen: str = DEFAULT_LISTEN
    database_url: str = DEFAULT_DATABASE_URL
    tls: TlsFiles | None = None
    api_keys: tuple[str, ...] = ()
    agent_tokens: tuple[str, ...] = ()
    metrics_port: int | None = None
    log_level: str = "info"
    log_format: str = "json"
    shutdown_grace_s: float = 10.0
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_json_bytes: int = MAX_JSON_BYTES
    control: ControlSettings = field(default_factory=ControlSettings)
    retention: timedelta | None = None
    retention_interval_s: float = 60.0
    replica_id: str = ""
    peer_listen: str | None = None
    leader_lease_s: float = 10.0
    workers: int | None = None

    @property
    def listen_host(self) -> str:
        """The host part of :attr:`listen`, without brackets."""
        return split_listen(self.listen)[0]

    @classmethod
    def resolve(
        cls,
        *,
        listen: str | None = None,
        database: str | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_client_ca: str | Path | None = None,
        api_keys: Iterable[str] | None = None,
        agent_tokens: Iterable[str] | None = None,
        metrics_port: int | None = None,
        log_level: str | None = None,
        log_format: str | None = None,
        shutdown_grace: float | None = None,
        retention: str | None = None,
        starvation: float | None = None,
        environ: Mapping[str, str] | None = None,
        api_keys_file: str | Path | None = None,
        agent_tokens_file: str | Path | None = None,
        replica_id: str | None = None,
        peer_listen: str | None = None,
        leader_lease_s: float | None = None,
        workers: int | None = None,
    ) -> ServerConfig:
        """Build the settings from flag values, the environment and the defaults.

        Each argument is a flag's value, ``None`` (or an empty list) when the flag was
        not given; then the environment variable applies, then the default. Secrets
        read from a file (``*_file``, one a line, ``#`` comments) are added to those
        given by flag or environment; files keep them out of the process list.

        Raises
        ------
        ConfigError
            When a value is malformed: a listen address without a port, a certificate
            without its key, a port out of range, an unknown log level...
        """
        env = os.environ if environ is None else environ

        def pick(flag: str | None, variable: str, default: str) -> str:
            if flag is not None and flag != "":
                return flag
            return env.get(variable, "").strip() or default

        def pick_path(flag: str | Path | None, variable: str) -> Path | None:
            value = str(flag) if flag else env.get(variable, "").strip()
            return Path(value) if value else None

        def pick_list(flag: Iterable[str] | None, variable: str) -> tuple[str, ...]:
            values = [v.strip() for v in flag or () if v.strip()]
            if not values:
                values = [v.strip() for v in env.get(variable, "").split(",") if v.strip()]
            return tuple(dict.fromkeys(values))

        listen_value = pick(listen, "GYOZA_LISTEN", DEFAULT_LISTEN)
        split_listen(listen_value)
        database_url = normalize_database_url(
            pick(database, "GYOZA_DATABASE_URL", DEFAULT_DATABASE_URL)
        )

        cert = pick_path(tls_cert, "GYOZA_TLS_CERT")
        key = pick_path(tls_key, "GYOZA_TLS_KEY")
        client_ca = pick_path(tls_client_ca, "GYOZA_TLS_CLIENT_CA")
        tls: TlsFiles | None = None
        if (cert is None) != (key is None):
            raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
        if client_ca is not None and cert is None:
            raise ConfigError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        if cert is not None and key is not None:
            for path in (cert, key, client_ca):
                if path is not None and not path.is_file():
                    raise ConfigError(f"TLS file {path} does not exist")
            tls = TlsFiles(cert=cert, key=key, client_ca=client_ca)

        port: int | None = metrics_port
        if port is None:
            raw = env.get("GYOZA_METRICS_PORT", "").strip()
            if raw:
                try:
                    port = int(raw)
                except ValueError:
                    raise ConfigError(
                        f"GYOZA_METRICS_PORT must be a port number, not {raw!r}"
                    ) from None
        if port is not None and not 0 <= port <= 65535:
            raise ConfigError(f"--metrics-port must be within 0-65535, not {port}")

        level = pick(log_level, "GYOZA_LOG_LEVEL", "info").lower()
        if level not in LOG_LEVELS:
            raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
        fmt = pick(log_format, "GYOZA_LOG_FORMAT", "json").lower()
        if fmt not in LOG_FORMATS:
            raise ConfigError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")

        grace = shutdown_grace
        if grace is None:
            raw = env.get("GYOZA_SHUTDOWN_GRACE", "").strip()
            try:
                grace = float(raw) if raw else 10.0
            except ValueError:
                raise ConfigError(f"GYOZA_SHUTDOWN_GRACE must be seconds, not {raw!r}") from None
        if grace < 0:
            raise ConfigError(f"--shutdown-grace must be >= 0, not {grace}")

        try:
            control = ControlSettings.from_env(env)
        except ValueError as error:
            raise ConfigError(f"agent protocol timing: {error}") from None
        if starvation is not None:
            control = dataclasses.replace(control, starvation_s=starvation)
        if not control.starvation_s >= 0:
            raise ConfigError(f"--starvation-s must be >= 0, not {control.starvation_s}")

        keys = pick_list(api_keys, "GYOZA_API_KEYS") + read_secrets(
            pick_path(api_keys_file, "GYOZA_API_KEYS_FILE"), "--api-keys-file"
        )
        tokens = pick_list(agent_tokens, "GYOZA_AGENT_TOKENS") + read_secrets(
            pick_path(agent_tokens_file, "GYOZA_AGENT_TOKENS_FILE"), "--agent-tokens-file"
        )
        keep = None
        retention_text = pick(retention, "GYOZA_RETENTION", "")
        if retention_text and retention_text.lower() not in ("off", "0"):
            try:
                keep = parse_duration(retention_text)
            except ValueError as error:
                raise ConfigError(f"--retention: {error}") from None
        raw = env.get("GYOZA_RETENTION_INTERVAL_S", "").strip()
        try:
            interval = float(raw) if raw else 60.0
        except ValueError:
            raise ConfigError(f"GYOZA_RETENTION_INTERVAL_S must be seconds, not {raw!r}") from None
        if interval <= 0:
            raise ConfigError("GYOZA_RETENTION_INTERVAL_S must be more than zero")

        replica = pick(replica_id, "GYOZA_REPLICA_ID", "")
        peer = pick(peer_listen, "GYOZA_PEER_LISTEN", "") or None
        if peer is not None:
            try:
                split_listen(peer)
            except ConfigError as error:
                raise ConfigError(f"--peer-listen: {error}") from None
        leader_lease = leader_lease_s
        if leader_lease is None:
            raw = env.get("GYOZA_LEADER_LEASE_S", "").strip()
            try:
                leader_lease = float(raw) if raw else 10.0
            except ValueError:
                raise ConfigError(f"GYOZA_LEADER_LEASE_S must be seconds, not {raw!r}") from None
        if not leader_lease > 0:
            raise ConfigError(f"--leader-lease-s must be more than zero, not {leader_lease}")
        count = workers
        if count is None:
            raw = env.get("GYOZA_WORKERS", "").strip()
            try:
                count = int(raw) if raw else None
            except ValueError:
                raise ConfigError(f"GYOZA_WORKERS must be a number, not {raw!r}") from None
        if count is not None:
            check_workers(count, listen_value, database_url, peer)

        return cls(
            listen=listen_value,
            database_url=database_url,
            tls=tls,
            api_keys=tuple(dict.fromkeys(keys)),
            agent_tokens=tuple(dict.fromkeys(tokens)),
            metrics_port=port,
            log_level=level,
            log_format=fmt,
            shutdown_grace_s=grace,
            control=control,
            retention=keep,
            retention_interval_s=interval,
            replica_id=replica,
            peer_listen=peer,
            leader_lease_s=leader_lease,
            workers=count,
        )


def check_workers(count: int, listen: str, database_url: str, peer_listen: str | None) -> None:
    """Refuse a ``--workers`` setting the supervisor cannot run.

    Raises
    ------
    ConfigError
        When *count* is below 1, the store is not PostgreSQL (SQLite is one process's
        file), the listen port is 0 (the workers must share one fixed port) or a peer
        address has a fixed port (each worker needs its own).
    """
    if count < 1:
        raise ConfigError(f"--workers must be 1 or more, not {count}")
    if not database_url.startswith("postgresql"):
        raise ConfigError(
            "--workers needs a PostgreSQL database (--database postgresql://...): "
            "a SQLite store is served by one process"
        )
    if split_listen(listen)[1] == 0:
        raise ConfigError(
            f"--workers needs a fixed --listen port, not {listen!r}: the workers share it"
        )
    if peer_listen is not None and split_listen(peer_listen)[1] != 0:
        raise ConfigError(
            f"--peer-listen {peer_listen!r} with --workers must have port 0: each worker "
            "serves its own peer port"
        )


def read_secrets(path: Path | None, flag: str) -> tuple[str, ...]:
    """The secrets in *path*, one a line; blank lines and ``#`` comments are skipped.

    Raises
    ------
    ConfigError
        When the file cannot be read.
    """
    if path is None:
        return ()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{flag} {path}: {error}") from None
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as ``(host, port)``.

    Raises
    ------
    ConfigError
        When there is no port, or it is not a number within 0-65535.
    """
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"--listen must be HOST:PORT, not {listen!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"--listen port must be a number, not {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--listen port must be within 0-65535, not {port}")
    return host.removeprefix("[").removesuffix("]"), port


def normalize_database_url(value: str) -> str:
    """A SQLAlchemy URL for *value*: a URL is kept, a plain file path becomes SQLite.

    ``postgresql://`` is given the psycopg (v3) driver, the one the server ships with.
    """
    if "://" not in value:
        return f"sqlite:///{value}"
    if value.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + value.split("://", 1)[1]
    scheme = value.split("://", 1)[0]
    if scheme not in _DATABASE_SCHEMES:
        raise ConfigError(
            f"--database {scheme}:// is not supported: use a sqlite:///PATH file or a "
            "postgresql://USER@HOST/DB URL"
        )
    return value


_DATABASE_SCHEMES = {"sqlite", "sqlite+pysqlite", "postgresql+psycopg"}
