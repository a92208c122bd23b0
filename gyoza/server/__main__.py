"""``python -m gyoza.server``: the server without the CLI (same flags as ``gyoza server``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from gyoza.server.app import main_server


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The server's flags; see :mod:`gyoza.server.config` for the environment variables."""
    parser = argparse.ArgumentParser(
        prog="python -m gyoza.server", description="Run the gyoza control plane."
    )
    parser.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:50051)")
    parser.add_argument("--database", help="database URL or SQLite file (default ./gyoza.db)")
    parser.add_argument("--tls-cert", help="PEM certificate of the server (enables TLS)")
    parser.add_argument("--tls-key", help="PEM private key of the server")
    parser.add_argument("--tls-client-ca", help="PEM CA of client certificates (enables mTLS)")
    parser.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        help="client API key (repeatable; shows in the process list: prefer the file or "
        "GYOZA_API_KEYS)",
    )
    parser.add_argument(
        "--agent-token",
        action="append",
        dest="agent_tokens",
        help="agent token, [PATTERN:]TOKEN (repeatable; shows in the process list: prefer "
        "the file or GYOZA_AGENT_TOKENS)",
    )
    parser.add_argument("--api-keys-file", help="file of client API keys, one a line")
    parser.add_argument(
        "--agent-tokens-file", help="file of agent tokens, one [PATTERN:]TOKEN a line"
    )
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--log-format", choices=("json", "logfmt", "text"))
    parser.add_argument(
        "--shutdown-grace", type=float, help="seconds in-flight calls get on SIGTERM (default 10)"
    )
    parser.add_argument(
        "--retention",
        help="delete finished runs older than this, e.g. 30d or 12h (default: keep them)",
    )
    parser.add_argument(
        "--starvation-s",
        type=float,
        help="seconds the first waiting run may be overtaken before an agent is held for "
        "it (default 60)",
    )
    parser.add_argument(
        "--replica-id",
        help="name of this replica among those on one PostgreSQL database "
        "(default <hostname>-<pid>-<random4>)",
    )
    parser.add_argument(
        "--peer-listen",
        help="extra HOST:PORT served and advertised to the other replicas for forwarding; "
        "port 0 picks one (default: advertise --listen)",
    )
    parser.add_argument(
        "--leader-lease-s", type=float, help="seconds of the leadership lease (default 10)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="run N replica processes sharing --listen (PostgreSQL only; a fixed port)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the flags and run the server until SIGTERM."""
    args = parse_args(argv)
    main_server(
        listen=args.listen,
        database=args.database,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        api_keys=args.api_keys,
        agent_tokens=args.agent_tokens,
        metrics_port=args.metrics_port,
        log_level=args.log_level,
        log_format=args.log_format,
        shutdown_grace=args.shutdown_grace,
        api_keys_file=args.api_keys_file,
        agent_tokens_file=args.agent_tokens_file,
        retention=args.retention,
        starvation_s=args.starvation_s,
        replica_id=args.replica_id,
        peer_listen=args.peer_listen,
        leader_lease_s=args.leader_lease_s,
        workers=args.workers,
    )


if __name__ == "__main__":
    main()
