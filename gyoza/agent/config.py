"""How an agent is configured: flags, ``GYOZA_*`` environment variables, defaults."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from gyoza.agent.capacity import GpuInfo, parse_gpu_inventory

#: Executors ``--executor`` accepts.
EXECUTORS = ("docker", "scripted")

#: The environment variable behind each configuration field (flags win over them).
ENV_VARS: dict[str, str] = {
    "server": "GYOZA_SERVER",
    "name": "GYOZA_AGENT_NAME",
    "token": "GYOZA_TOKEN",
    "state_dir": "GYOZA_STATE_DIR",
    "executor": "GYOZA_EXECUTOR",
    "gpus": "GYOZA_GPUS",
    "labels": "GYOZA_LABELS",
    "tls": "GYOZA_TLS",
    "ca_cert": "GYOZA_TLS_CA_CERT",
    "client_cert": "GYOZA_TLS_CLIENT_CERT",
    "client_key": "GYOZA_TLS_CLIENT_KEY",
    "network": "GYOZA_NETWORK",
    "cpu": "GYOZA_CPU",
    "ram_mb": "GYOZA_RAM_MB",
    "on_stop": "GYOZA_ON_STOP",
    "metrics_port": "GYOZA_AGENT_METRICS_PORT",
    "coalesce_ms": "GYOZA_AGENT_COALESCE_MS",
}

#: What ``--on-stop`` accepts: on SIGTERM, leave the containers running for the next agent
#: process, or drain (no new work, wait for the held runs to finish) first.
ON_STOP = ("leave", "drain")


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/gyoza/agent`` (``~/.local/state/gyoza/agent``), or ``./.gyoza-agent``
    when there is no usable home directory."""
    xdg = os.environ.get("XDG_STATE_HOME")
    home = os.environ.get("HOME")
    if xdg:
        return Path(xdg) / "gyoza" / "agent"
    if home and os.access(home, os.W_OK):
        return Path(home) / ".local" / "state" / "gyoza" / "agent"
    return Path.cwd() / ".gyoza-agent"


def parse_labels(text: str | None) -> dict[str, str]:
    """Read ``"zone=a,pool=gpu"`` as a dictionary; ``None`` and ``""`` are empty.

    Raises
    ------
    ValueError
        When an item has no ``=`` or an empty key.
    """
    labels: dict[str, str] = {}
    if not text:
        return labels
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"label {item.strip()!r} is not KEY=VALUE")
        labels[key.strip()] = value.strip()
    return labels


def parse_servers(text: str) -> tuple[str, ...]:
    """Read ``"a:50051,b:50051"`` as its addresses, each ``HOST:PORT`` (``[::1]:PORT``
    for IPv6).

    Raises
    ------
    ValueError
        When the list is empty, has an empty entry, or an entry is not ``HOST:PORT``
        with a port within 1-65535.
    """
    if not text.strip():
        raise ValueError("must be HOST:PORT or a comma-separated list of them")
    addresses = [item.strip() for item in text.split(",")]
    if "" in addresses:
        raise ValueError(f"empty address in the list {text!r}")
    for address in addresses:
        host, sep, port = address.rpartition(":")
        bare = host.removeprefix("[").removesuffix("]")
        bracketed = bare != host  # an IPv6 address, and only it, goes in brackets
        if not sep or not bare or any(c in bare for c in "/ ") or (":" in bare) != bracketed:
            raise ValueError(f"{address!r} is not HOST:PORT")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{address!r}: the port must be a number within 1-65535")
    return tuple(dict.fromkeys(addresses))


@dataclass(frozen=True)
class AgentConfig:
    """Configuration of one agent.

    Parameters
    ----------
    server : str
        ``HOST:PORT`` of the gyoza server, or a comma-separated list of the addresses of
        its replicas (``a:50051,b:50051``): the agent connects to one and, when the
        stream breaks or the connection cannot be made, moves on to the next.
    name : str
        Unique name of the agent; a reconnect or a restart uses the same one. Defaults to
        the host name.
    token : str | None
        Agent token, sent as ``authorization: Bearer <token>`` metadata.
    state_dir : Path
        Where the outbox lives. One agent per state directory (it is locked).
    executor : str
        ``"docker"`` (one container per attempt) or ``"scripted"`` (plays an op from its
        inputs; tests and benchmarks).
    gpus : str | None
        Declared GPU inventory (``"2x80G"``, ``"1x24576M"``, ``"0"`` for none); replaces
        what NVML finds. ``None``: NVML's GPUs.
    labels : dict[str, str]
        Labels for operators (zone, node pool...).
    tls : bool
        Use TLS with the system's roots even when no certificate file is given.
    ca_cert, client_cert, client_key : Path | None
        PEM files: the server's CA, and this agent's certificate and key for mutual TLS.
        Giving any of them turns TLS on.
    network : str
        Docker network of the containers (``"none"``: no network).
    cpu : float | None
        CPU cores to declare instead of measuring them.
    ram_mb : int | None
        Memory in MiB to declare instead of measuring it.
    heartbeat_interval_s : float
        Heartbeat period used when the Welcome does not give one.
    reconnect_initial_s, reconnect_max_s : float
        Bounds of the exponential reconnect backoff (with jitter).
    welcome_timeout_s : float
        How long to wait for the Welcome after the Hello before giving the session up.
    shutdown_timeout_s : float
        On shutdown, how long to wait for held attempts to end and be acknowledged before
        stopping anyway (their containers keep running and are adopted on the next start).
        With ``on_stop="drain"``, 0 waits as long as they take.
    on_stop : str
        ``"leave"``: SIGTERM stops the agent (after ``shutdown_timeout_s``), leaving its
        containers running for the next agent process to adopt. ``"drain"``: SIGTERM
        takes no new work and waits until every held attempt has ended and its reports
        are acknowledged; a second signal stops at once.
    metrics_port : int | None
        Port of the agent's Prometheus ``/metrics`` endpoint (every interface); ``None``:
        off, ``0``: a free port (logged).
    outbox_synchronous : str
        SQLite ``synchronous`` mode of the outbox: ``"FULL"`` (durable across power loss,
        the default) or ``"NORMAL"`` (durable across a process crash only; for simulated
        fleets on one disk).
    coalesce_ms : float
        Under load (a report batch went out within the last few milliseconds), how long
        the stream waits for more committed reports before it writes the next batch, so
        that several go in one message; 0: never wait. At most 50.
    """

    server: str = "127.0.0.1:50051"
    name: str = field(default_factory=socket.gethostname)
    token: str | None = None
    state_dir: Path = field(default_factory=default_state_dir)
    executor: str = "docker"
    gpus: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    tls: bool = False
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    network: str = "none"
    cpu: float | None = None
    ram_mb: int | None = None
    heartbeat_interval_s: float = 10.0
    reconnect_initial_s: float = 0.2
    reconnect_max_s: float = 30.0
    welcome_timeout_s: float = 30.0
    shutdown_timeout_s: float = 0.0
    outbox_synchronous: str = "FULL"
    coalesce_ms: float = 1.0
    on_stop: str = "leave"
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid agent configuration: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every problem with this configuration (empty when it is valid)."""
        problems: list[str] = []
        try:
            parse_servers(self.server)
        except ValueError as exc:
            problems.append(f"server: {exc}")
        if not self.name.strip():
            problems.append("name: must not be empty")
        if self.executor not in EXECUTORS:
            problems.append(f"executor: must be one of {', '.join(EXECUTORS)}")
        try:
            parse_gpu_inventory(self.gpus)
        except ValueError as exc:
            problems.append(f"gpus: {exc}")
        if (self.client_cert is None) != (self.client_key is None):
            problems.append("client_cert and client_key: give both or neither")
        if self.cpu is not None and self.cpu <= 0:
            problems.append("cpu: must be > 0")
        if self.ram_mb is not None and self.ram_mb <= 0:
            problems.append("ram_mb: must be > 0")
        if self.on_stop not in ON_STOP:
            problems.append(f"on_stop: must be one of {', '.join(ON_STOP)}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            problems.append("metrics_port: must be within 0-65535")
        if self.shutdown_timeout_s < 0:
            problems.append("shutdown_timeout_s: must be >= 0")
        if self.outbox_synchronous.upper() not in ("FULL", "NORMAL"):
            problems.append("outbox_synchronous: must be FULL or NORMAL")
        if not 0 <= self.coalesce_ms <= 50:
            problems.append("coalesce_ms: must be within 0-50")
        if self.heartbeat_interval_s <= 0 or self.welcome_timeout_s <= 0:
            problems.append("heartbeat_interval_s and welcome_timeout_s: must be > 0")
        if not 0 < self.reconnect_initial_s <= self.reconnect_max_s:
            problems.append("reconnect_initial_s: must be > 0 and <= reconnect_max_s")
        return problems

    @property
    def servers(self) -> tuple[str, ...]:
        """The server addresses, in the order they are tried."""
        return parse_servers(self.server)

    @property
    def uses_tls(self) -> bool:
        """True when the channel to the server is secure."""
        return self.tls or any(p is not None for p in (self.ca_cert, self.client_cert))

    @property
    def declared_gpus(self) -> list[GpuInfo] | None:
        """The ``gpus`` declaration as GPU entries (stable UUIDs seeded by the name);
        ``None`` when nothing is declared, so NVML is asked."""
        if self.gpus is None:
            return None
        return parse_gpu_inventory(self.gpus, agent_name=self.name)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> AgentConfig:
        """Build a configuration from ``GYOZA_*`` variables (see :data:`ENV_VARS`).

        Parameters
        ----------
        environ : Mapping[str, str] | None
            The environment; :data:`os.environ` when ``None``.
        **overrides : Any
            Values from flags. ``None`` means "not given": the variable, then the default,
            applies.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, var in ENV_VARS.items():
            text = env.get(var)
            if text is not None and text != "":
                values[name] = _from_text(name, text)
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"unknown agent configuration fields: {', '.join(unknown)}")
        for path_field in ("state_dir", "ca_cert", "client_cert", "client_key"):
            if isinstance(values.get(path_field), str):
                values[path_field] = Path(values[path_field]).expanduser()
        if isinstance(values.get("labels"), str):
            values["labels"] = parse_labels(values["labels"])
        return cls(**values)

    def with_changes(self, **changes: Any) -> AgentConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


def _from_text(name: str, text: str) -> Any:
    if name == "tls":
        return text.strip().lower() in ("1", "true", "yes", "on")
    if name in ("cpu", "coalesce_ms"):
        return float(text)
    if name in ("ram_mb", "metrics_port"):
        return int(text)
    if name == "labels":
        return parse_labels(text)
    return text
