"""``gyoza ui``: serve the web dashboard of a server."""

from __future__ import annotations

import click

from gyoza.cli.context import CliState, connection_options, pass_state
from gyoza.cli.services import _load

__all__ = ["ui"]


@click.command()
@click.option(
    "--listen",
    metavar="HOST:PORT",
    default="127.0.0.1:8080",
    show_default=True,
    envvar="GYOZA_UI_LISTEN",
    help="Address of the dashboard; port 0 picks one [env GYOZA_UI_LISTEN].",
)
@connection_options
@pass_state
def ui(state: CliState, listen: str) -> None:
    """Serve the web dashboard of the server (fleet, runs, definitions), live.

    \b
    It is an ordinary client of the server, with the connection options of every
    client command (--server, --api-key, TLS), and acts with that API key: keep it on
    127.0.0.1 or behind your own authentication.
    """
    module = _load("gyoza.ui.serve", "gyoza ui")
    module.main_ui(
        server=state.server,
        listen=listen,
        api_key=state.api_key,
        tls=state.tls,
        tls_ca=state.tls_ca,
        tls_cert=state.tls_cert,
        tls_key=state.tls_key,
        timeout=state.timeout,
    )
