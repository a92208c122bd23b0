"""``gyoza server``, ``gyoza agent`` and ``gyoza dev``: thin commands over the pieces.

Each imports its piece only when it runs, so the client commands start fast and do not
need the server's or the agent's dependencies. A flag that is not given is passed as
``None``: the piece's own configuration then reads its ``GYOZA_*`` variable or default,
so the command line, ``python -m gyoza.server`` and the environment agree.

The functions called:

* ``gyoza.server.app.main_server(*, listen, database, tls_cert, tls_key, tls_client_ca,
  api_keys, agent_tokens, metrics_port, log_level, log_format, shutdown_grace,
  starvation_s, retention, replica_id, peer_listen, leader_lease_s, workers)``
* ``gyoza.agent.daemon.run_agent(AgentConfig)`` (async), the configuration built by
  ``gyoza.agent.config.AgentConfig.from_env(**flags)``
* ``gyoza.dev.main_dev(*, database, listen, state_dir, executor, ui_listen)``
"""

from __future__ import annotations

import asyncio
import importlib
from types import ModuleType
from typing import Any

import click
import grpc

from gyoza.cli.context import fail
from gyoza.cli.exit_codes import ExitCode

__all__ = ["agent", "dev", "server"]

_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
_LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)


def _load(module: str, command: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        fail(
            f"{command} is not available in this installation ({module}: {error})",
            ExitCode.RUN_FAILED,
        )


@click.command()
@click.option(
    "--listen",
    metavar="HOST:PORT",
    help="Address to serve on; port 0 picks one [env GYOZA_LISTEN; default 127.0.0.1:50051].",
)
@click.option(
    "--database",
    metavar="URL",
    help="sqlite:///PATH or postgresql+psycopg://... "
    "[env GYOZA_DATABASE_URL; default sqlite:///gyoza.db in the working directory].",
)
@click.option("--tls-cert", metavar="PEM", help="Server certificate; turns TLS on.")
@click.option("--tls-key", metavar="PEM", help="Server private key.")
@click.option(
    "--tls-client-ca", metavar="PEM", help="CA of client certificates; turns mutual TLS on."
)
@click.option(
    "--metrics-port", type=click.IntRange(0, 65535), help="Serve Prometheus metrics here."
)
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    metavar="KEY",
    help="A client API key; repeatable [env GYOZA_API_KEYS=a,b]. None: clients are open. "
    "A flag shows in the process list: prefer --api-keys-file or the environment.",
)
@click.option(
    "--api-keys-file",
    metavar="FILE",
    help="Client API keys, one a line, # comments [env GYOZA_API_KEYS_FILE].",
)
@click.option(
    "--agent-token",
    "agent_tokens",
    multiple=True,
    metavar="TOKEN",
    help="An agent token, PATTERN:TOKEN to bind it to agent names (gpu-*:s3cret); "
    "repeatable [env GYOZA_AGENT_TOKENS=a,b]. None: agents are open. A flag shows in the "
    "process list: prefer --agent-tokens-file or the environment.",
)
@click.option(
    "--agent-tokens-file",
    metavar="FILE",
    help="Agent tokens, one [PATTERN:]TOKEN a line, # comments [env GYOZA_AGENT_TOKENS_FILE].",
)
@click.option("--log-level", type=_LOG_LEVELS, help="[env GYOZA_LOG_LEVEL; default info]")
@click.option(
    "--log-format",
    type=click.Choice(["json", "logfmt", "text"]),
    help="One event a line [env GYOZA_LOG_FORMAT; default json].",
)
@click.option(
    "--shutdown-grace",
    type=click.FloatRange(min=0),
    help="Seconds in-flight calls get on SIGTERM [env GYOZA_SHUTDOWN_GRACE; default 10].",
)
@click.option(
    "--retention",
    metavar="AGE",
    help="Delete finished runs (with their events, logs and topic records) whose last "
    "change is older than AGE, e.g. 30d, 12h, 90m [env GYOZA_RETENTION; default: keep].",
)
@click.option(
    "--starvation-s",
    type=click.FloatRange(min=0),
    help="Bounded wait: once the first waiting run (highest priority, oldest) has been "
    "overtaken this long, the agent where it fits soonest is held for it and takes no "
    "new run until it starts [env GYOZA_STARVATION_S; default 60].",
)
@click.option(
    "--replica-id",
    metavar="NAME",
    help="Name of this replica among those sharing one PostgreSQL database "
    "[env GYOZA_REPLICA_ID; default <hostname>-<pid>-<random4>].",
)
@click.option(
    "--peer-listen",
    metavar="HOST:PORT",
    help="Also serve here, and advertise it to the other replicas for forwarding; port 0 "
    "picks one [env GYOZA_PEER_LISTEN; default: advertise --listen].",
)
@click.option(
    "--leader-lease-s",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds of the leadership lease, renewed every third of it "
    "[env GYOZA_LEADER_LEASE_S; default 10].",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    metavar="N",
    help="Run N replica processes sharing the --listen address (SO_REUSEPORT), restarted "
    "when they die; PostgreSQL only, with a fixed port [env GYOZA_WORKERS].",
)
def server(**options: Any) -> None:
    """Run the gyoza server (the control plane) until SIGTERM or Ctrl-C."""
    app = _load("gyoza.server.app", "gyoza server")
    for name in ("api_keys", "agent_tokens"):
        options[name] = options[name] or None  # not given: the environment decides
    if options["log_level"] is not None:
        options["log_level"] = options["log_level"].lower()
    app.main_server(**options)


@click.command()
@click.option(
    "--server",
    metavar="HOST:PORT[,...]",
    help="Server address, or the addresses of all replicas as a comma-separated list: the "
    "agent uses one and moves to the next when it fails [env GYOZA_SERVER; 127.0.0.1:50051].",
)
@click.option("--name", help="Unique agent name [env GYOZA_AGENT_NAME; default the host name].")
@click.option("--token", metavar="TOKEN", help="Agent token [env GYOZA_TOKEN].")
@click.option(
    "--state-dir",
    metavar="DIR",
    help="Where the outbox lives [env GYOZA_STATE_DIR; ~/.local/state/gyoza/agent].",
)
@click.option(
    "--executor",
    type=click.Choice(["docker", "scripted"]),
    help="docker: one container a run; scripted: plays an op from its inputs "
    "[env GYOZA_EXECUTOR; default docker].",
)
@click.option(
    "--gpus",
    metavar="SPEC",
    help="Declared GPUs instead of NVML, e.g. 2x80G or 1x24576M [env GYOZA_GPUS].",
)
@click.option(
    "--labels",
    metavar="K=V,...",
    help="Labels runs select agents by (constraints.selector); the agent adds executor, "
    "gpu.model, gpu.count and agent.version itself [env GYOZA_LABELS].",
)
@click.option(
    "--network", help="Docker network of the containers [env GYOZA_NETWORK; default none]."
)
@click.option("--cpu", type=click.FloatRange(min=0, min_open=True), help="Declared CPU cores.")
@click.option("--ram-mb", type=click.IntRange(min=1), help="Declared memory in MiB.")
@click.option("--tls", is_flag=True, default=None, help="Use TLS with the system's roots.")
@click.option("--tls-ca", metavar="PEM", help="CA of the server's certificate; turns TLS on.")
@click.option("--tls-cert", metavar="PEM", help="Agent certificate (mutual TLS).")
@click.option("--tls-key", metavar="PEM", help="Agent private key (mutual TLS).")
@click.option(
    "--on-stop",
    type=click.Choice(["leave", "drain"]),
    help="On SIGTERM: leave = stop at once, leaving containers running for the next agent "
    "process to adopt; drain = take no new work and wait until the runs it holds have "
    "finished and been reported (a second signal stops at once) "
    "[env GYOZA_ON_STOP; default leave].",
)
@click.option(
    "--shutdown-timeout",
    "shutdown_timeout_s",
    type=click.FloatRange(min=0),
    help="Seconds to wait for held runs on SIGTERM; with --on-stop drain, 0 waits as long "
    "as they take [default 0].",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    help="Serve Prometheus metrics (outbox depth, reconnects, executor outcomes) on this "
    "port [env GYOZA_AGENT_METRICS_PORT; default off].",
)
@click.option("--log-level", type=_LOG_LEVELS, default="info", show_default=True)
@click.option(
    "--log-format",
    type=click.Choice(["json", "logfmt", "text"]),
    default="text",
    show_default=True,
    help="One event a line, as the server writes them (json, logfmt) or for a terminal.",
)
def agent(
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    log_level: str,
    log_format: str,
    **flags: Any,
) -> None:
    """Run a gyoza agent on this node until SIGTERM or Ctrl-C.

    On SIGTERM the agent stops at once and its containers keep running: the next agent
    process with the same state directory adopts them (--on-stop drain waits for them).
    """
    config_module = _load("gyoza.agent.config", "gyoza agent")
    daemon = _load("gyoza.agent.daemon", "gyoza agent")
    try:
        config = config_module.AgentConfig.from_env(
            ca_cert=tls_ca, client_cert=tls_cert, client_key=tls_key, **flags
        )
    except (ValueError, TypeError) as error:
        fail(str(error))
    from gyoza.logformat import configure_logging

    configure_logging(log_level, log_format)
    try:
        asyncio.run(daemon.run_agent(config))
    except KeyboardInterrupt:
        pass
    except daemon.AgentError as error:
        refused = error.code in _REFUSED
        fail(f"agent stopped: {error}", ExitCode.UNREACHABLE if refused else ExitCode.RUN_FAILED)


@click.command()
@click.option("--database", metavar="URL", help="Store of the dev server (default ./gyoza.db).")
@click.option("--listen", metavar="HOST:PORT", help="Address of the dev server.")
@click.option("--state-dir", metavar="DIR", help="State directory of the local agent.")
@click.option(
    "--executor",
    type=click.Choice(["docker", "scripted"]),
    help="Executor of the local agent (default docker).",
)
@click.option(
    "--ui-listen",
    metavar="HOST:PORT",
    default="127.0.0.1:8080",
    show_default=True,
    help="Address of the web dashboard; port 0 picks one.",
)
@click.option("--no-ui", is_flag=True, help="Do not start the web dashboard.")
def dev(no_ui: bool, **options: Any) -> None:
    """Run a server, a local agent and the web dashboard in one process, for trying
    gyoza out.

    Their logs go to server.log and agent.log in the state directory (./.gyoza-dev by
    default), not to the terminal.
    """
    module = _load("gyoza.dev", "gyoza dev")
    if no_ui:
        options["ui_listen"] = None
    module.main_dev(**options)
