"""What every client command shares: the connection, the output format, error handling.

The global options (``--server``, ``--api-key``, TLS, ``--timeout``, ``--output``) are
accepted both before the command (``gyoza --server H:P runs list``) and after it
(``gyoza runs list --server H:P``; after wins); the environment (``GYOZA_SERVER``,
``GYOZA_API_KEY``, ``GYOZA_TLS_*``, ``GYOZA_TIMEOUT``) supplies what neither gives.

A command whose standard output is closed early (``gyoza runs list | head -1``) stops
quietly with exit code 141.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import click
import grpc

from gyoza.cli.exit_codes import ExitCode, exit_code_for_status
from gyoza.client import DEFAULT_SERVER, Client, GyozaClientError

__all__ = [
    "CliError",
    "CliState",
    "GyozaGroup",
    "connection_options",
    "describe_client_error",
    "fail",
    "output_option",
    "pass_state",
]

F = TypeVar("F", bound=Callable[..., Any])


class CliError(Exception):
    """A failure to report as ``gyoza: <message>`` lines on stderr, with an exit code.

    :class:`GyozaGroup` reports it; raise it (or call :func:`fail`) from any command.
    """

    def __init__(self, message: str, exit_code: int = ExitCode.USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = int(exit_code)

    def show(self) -> None:
        """Print the message on stderr, each line prefixed with ``gyoza:``."""
        for line in self.message.splitlines() or [""]:
            click.echo(f"gyoza: {line}", err=True)


def fail(message: str, exit_code: int = ExitCode.USAGE) -> NoReturn:
    """Stop the command with *message* on stderr and *exit_code*."""
    raise CliError(message, exit_code)


@dataclass
class CliState:
    """The connection settings of one ``gyoza`` invocation and its client.

    The client is opened on first use and closed when the command ends.
    """

    server: str = DEFAULT_SERVER
    api_key: str | None = None
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    timeout: float = 30.0
    output: str = "table"
    _client: Client | None = field(default=None, repr=False)

    def client(self) -> Client:
        """The client, connected to :attr:`server` (opened once)."""
        if self._client is None:
            try:
                self._client = Client(
                    self.server,
                    api_key=self.api_key,
                    tls=self.tls,
                    tls_ca=self.tls_ca,
                    tls_cert=self.tls_cert,
                    tls_key=self.tls_key,
                    timeout=self.timeout,
                )
            except ValueError as error:
                fail(str(error))
            except OSError as error:
                fail(f"cannot read a TLS file: {error.filename}: {error.strerror}")
        return self._client

    def close(self) -> None:
        """Close the client, if one was opened."""
        if self._client is not None:
            self._client.close()
            self._client = None


pass_state = click.make_pass_decorator(CliState, ensure=True)


def describe_client_error(error: GyozaClientError, server: str) -> str:
    """One line saying what went wrong with a call, for people."""
    code = error.code
    text = str(error)
    if code is grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach the gyoza server at {server}: {text}"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the gyoza server at {server} did not answer in time: {text}"
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return (
            f"the gyoza server at {server} refused the credentials: {text} "
            "(give --api-key or GYOZA_API_KEY)"
        )
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return f"permission denied by the gyoza server at {server}: {text}"
    reason = f" [{error.reason}]" if error.reason else ""
    return f"{code.name.lower().replace('_', ' ')}: {text}{reason}"


class GyozaGroup(click.Group):
    """The root group: turns every failure into one line on stderr and an exit code.

    Set ``GYOZA_DEBUG=1`` to see the traceback of an unexpected error instead.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _stop_writing_stdout()
            raise click.exceptions.Exit(ExitCode.OUTPUT_CLOSED) from None
        except CliError as error:
            failure = error
        except GyozaClientError as error:
            state = ctx.find_object(CliState) or CliState()
            failure = CliError(
                describe_client_error(error, state.server), exit_code_for_status(error.code)
            )
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as error:
            if os.environ.get("GYOZA_DEBUG"):
                raise
            failure = CliError(
                f"unexpected error: {type(error).__name__}: {error} "
                "(set GYOZA_DEBUG=1 for the traceback)",
                ExitCode.RUN_FAILED,
            )
        failure.show()
        raise click.exceptions.Exit(failure.exit_code)


def _stop_writing_stdout() -> None:
    """Point standard output at /dev/null: what is still buffered, and Python's flush at
    exit, then go nowhere instead of raising BrokenPipeError again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


def _store(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is not None and value is not False:
            setattr(ctx.ensure_object(CliState), name, value)

    return callback


# The connection options a client command also accepts: (flag, metavar, help).
_CONNECTION_OPTIONS = (
    ("--server", "HOST:PORT", "Server address (also GYOZA_SERVER)."),
    ("--api-key", "KEY", "API key (also GYOZA_API_KEY)."),
    ("--tls-ca", "PEM", "CA of the server's certificate."),
    ("--tls-cert", "PEM", "Client certificate (mutual TLS)."),
    ("--tls-key", "PEM", "Client key (mutual TLS)."),
)


def connection_options(command: F) -> F:
    """Accept the connection options and ``--timeout`` after a client command too (they
    win)."""
    command = click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        expose_value=False,
        callback=_store("timeout"),
        help="Seconds each call may take (streams excepted).",
    )(command)
    command = click.option(
        "--tls",
        is_flag=True,
        default=None,
        expose_value=False,
        callback=_store("tls"),
        help="Use TLS with the system's roots.",
    )(command)
    for flag, metavar, help_text in reversed(_CONNECTION_OPTIONS):
        command = click.option(
            flag,
            metavar=metavar,
            expose_value=False,
            callback=_store(flag.removeprefix("--").replace("-", "_")),
            help=help_text,
        )(command)
    return command


OUTPUT_FORMATS = ("table", "json")
OUTPUT_HELP = (
    "table for people; json for programs: the API's messages in protobuf's canonical "
    "JSON, as grpcurl prints them."
)


def _output(ctx: click.Context, param: click.Parameter, value: str | None) -> str:
    state = ctx.ensure_object(CliState)
    if value is not None:
        state.output = value
    return state.output


def output_option(command: F) -> F:
    """``-o/--output table|json`` after the command, passed as ``output``; when it is not
    given, the one given before the command (default ``table``)."""
    return click.option(
        "-o",
        "--output",
        type=click.Choice(OUTPUT_FORMATS),
        default=None,
        callback=_output,
        help=f"Output format [default: table]: {OUTPUT_HELP}",
    )(command)
