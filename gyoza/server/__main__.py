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
        "--api-key", action="append", dest="api_keys", help="client API key (repeatable)"
    )
    parser.add_argument(
        "--agent-token", action="append", dest="agent_tokens", help="agent token (repeatable)"
    )
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--log-format", choices=("json", "logfmt"))
    parser.add_argument(
        "--shutdown-grace", type=float, help="seconds in-flight calls get on SIGTERM (default 10)"
    )
    parser.add_argument(
        "--starvation-s",
        type=float,
        help="seconds the first waiting run may be overtaken before an agent is held for "
        "it (default 60)",
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
        starvation_s=args.starvation_s,
    )


if __name__ == "__main__":
    main()
