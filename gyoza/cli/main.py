"""The ``gyoza`` command.

``gyoza server``, ``gyoza agent``, ``gyoza dev`` and ``gyoza ui`` run the pieces; ``gyoza definitions``,
``gyoza runs`` and ``gyoza agents`` talk to a server. Exit codes are documented in
:mod:`gyoza.cli.exit_codes`.
"""

from __future__ import annotations

import click

from gyoza.cli.agents import agents
from gyoza.cli.context import OUTPUT_FORMATS, OUTPUT_HELP, CliState, GyozaGroup
from gyoza.cli.definitions import definitions
from gyoza.cli.events import events
from gyoza.cli.runs import runs
from gyoza.cli.services import agent, dev, server
from gyoza.cli.ui import ui
from gyoza.client import DEFAULT_SERVER

__all__ = ["cli", "main"]


@click.group(cls=GyozaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--server",
    envvar="GYOZA_SERVER",
    default=DEFAULT_SERVER,
    show_default=True,
    metavar="HOST:PORT",
    help="Address of the gyoza server (env GYOZA_SERVER).",
)
@click.option(
    "--api-key", envvar="GYOZA_API_KEY", metavar="KEY", help="API key (env GYOZA_API_KEY)."
)
@click.option(
    "--tls",
    is_flag=True,
    envvar="GYOZA_TLS",
    help="Use TLS with the system's root certificates (env GYOZA_TLS).",
)
@click.option(
    "--tls-ca",
    envvar="GYOZA_TLS_CA",
    metavar="PEM",
    help="CA certificate of the server; turns TLS on (env GYOZA_TLS_CA).",
)
@click.option(
    "--tls-cert",
    envvar="GYOZA_TLS_CERT",
    metavar="PEM",
    help="Client certificate for mutual TLS (env GYOZA_TLS_CERT).",
)
@click.option(
    "--tls-key",
    envvar="GYOZA_TLS_KEY",
    metavar="PEM",
    help="Client private key for mutual TLS (env GYOZA_TLS_KEY).",
)
@click.option(
    "--timeout",
    envvar="GYOZA_TIMEOUT",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds each call may take (streams excepted).",
)
@click.option(
    "-o",
    "--output",
    type=click.Choice(OUTPUT_FORMATS),
    default="table",
    show_default=True,
    help=f"Output format of every command: {OUTPUT_HELP}",
)
@click.version_option(package_name="gyoza", prog_name="gyoza")
@click.pass_context
def cli(
    ctx: click.Context,
    server: str,
    api_key: str | None,
    tls: bool,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    timeout: float,
    output: str,
) -> None:
    """gyoza: run containerized ops on a fleet of GPU machines.

    Global options (--server, --api-key, TLS, --timeout, --output) may also follow the
    command: gyoza runs list -o json --server HOST:PORT.

    \b
    Exit codes: 0 success (for watch: the run COMPLETED), 1 the run FAILED or was
    CANCELLED, 2 bad usage or input, 3 server unreachable or credentials refused,
    141 standard output closed early (| head).
    """
    state = ctx.ensure_object(CliState)
    state.server = server
    state.api_key = api_key or None
    state.tls = tls
    state.tls_ca = tls_ca
    state.tls_cert = tls_cert
    state.tls_key = tls_key
    state.timeout = timeout
    state.output = output
    ctx.call_on_close(state.close)


cli.add_command(server)
cli.add_command(agent)
cli.add_command(dev)
cli.add_command(definitions)
cli.add_command(runs)
cli.add_command(agents)
cli.add_command(events)
cli.add_command(ui)


def main() -> None:
    """Entry point of the ``gyoza`` console script."""
    cli.main(prog_name="gyoza")
