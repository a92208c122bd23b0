"""``python -m gyoza.agent``: run an agent without the ``gyoza`` CLI.

Flags mirror ``gyoza agent``; each falls back to its ``GYOZA_*`` environment variable
(:data:`gyoza.agent.config.ENV_VARS`), then to the default.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from gyoza.agent.config import ENV_VARS, EXECUTORS, AgentConfig
from gyoza.agent.daemon import AgentError, run_agent
from gyoza.logformat import configure_logging


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m gyoza.agent``."""
    parser = argparse.ArgumentParser(prog="python -m gyoza.agent", description=__doc__)

    def flag(name: str, field: str, help: str, **kwargs: object) -> None:
        parser.add_argument(name, dest=field, help=f"{help} [{ENV_VARS[field]}]", **kwargs)  # type: ignore[arg-type]

    flag(
        "--server",
        "server",
        "HOST:PORT of the gyoza server, or A,B,C: the replicas' addresses, tried in turn "
        "(127.0.0.1:50051)",
    )
    flag("--name", "name", "unique agent name (the host name)")
    flag("--token", "token", "agent token, sent as a bearer token")
    flag("--state-dir", "state_dir", "directory of the outbox")
    flag("--executor", "executor", "how attempts run (docker)", choices=EXECUTORS)
    flag("--gpus", "gpus", "declared GPU inventory, e.g. 2x80G (overrides NVML)")
    flag(
        "--labels",
        "labels",
        "labels as KEY=VALUE,KEY=VALUE (runs select agents by them; executor, gpu.model, "
        "gpu.count and agent.version are added)",
    )
    flag("--network", "network", "Docker network of the containers (none)")
    flag("--cpu", "cpu", "CPU cores to declare", type=float)
    flag("--ram-mb", "ram_mb", "memory in MiB to declare", type=int)
    flag("--tls", "tls", "use TLS with the system roots", action="store_const", const=True)
    flag("--ca-cert", "ca_cert", "PEM file of the server's CA (turns TLS on)")
    flag("--client-cert", "client_cert", "PEM certificate of this agent (mutual TLS)")
    flag("--client-key", "client_key", "PEM private key of this agent (mutual TLS)")
    flag(
        "--coalesce-ms",
        "coalesce_ms",
        "under load, wait this long for more reports before a batch goes out (1; 0: never)",
        type=float,
    )
    parser.add_argument(
        "--shutdown-timeout",
        dest="shutdown_timeout_s",
        type=float,
        help="seconds to let held attempts end on SIGTERM (0)",
    )
    parser.add_argument(
        "--on-stop",
        dest="on_stop",
        choices=("leave", "drain"),
        help="on SIGTERM: leave containers running, or drain first (leave) [GYOZA_ON_STOP]",
    )
    flag("--metrics-port", "metrics_port", "serve Prometheus metrics on this port", type=int)
    parser.add_argument("--log-level", default="INFO", help="logging level (INFO)")
    parser.add_argument(
        "--log-format", default="text", choices=("json", "logfmt", "text"), help="(text)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, run the agent until a signal; return the exit status."""
    args = vars(build_parser().parse_args(argv))
    level = str(args.pop("log_level")).lower()
    configure_logging(level, str(args.pop("log_format")))
    try:
        config = AgentConfig.from_env(**args)
    except (TypeError, ValueError) as exc:
        print(f"gyoza agent: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run_agent(config))
    except AgentError as exc:
        print(f"gyoza agent: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
