"""``gyoza events``: follow a topic, the events of every run delivered on it."""

from __future__ import annotations

import sys

import click

from gyoza.cli import render
from gyoza.cli.context import CliState, connection_options, output_option, pass_state

__all__ = ["events"]


@click.group()
def events() -> None:
    """Events: follow the runs published on a topic (their event delivery)."""


@events.command()
@click.argument("topic")
@click.option(
    "--after-offset",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Only events after this offset of the server's event log (resume point).",
)
@click.option("--from-latest", is_flag=True, help="Only events published from now on.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="Stop after this many events (by default the stream stays open).",
)
@connection_options
@output_option
@pass_state
def subscribe(
    state: CliState,
    topic: str,
    after_offset: int,
    from_latest: bool,
    limit: int | None,
    output: str,
) -> None:
    """Print every event of every run on TOPIC, in commit order, as it is committed.

    Each line starts with the event's offset: resume with --after-offset. With
    --output json: one JSON line per event.
    """
    client = state.client()
    for count, item in enumerate(
        client.subscribe(topic, after_offset, from_latest=from_latest), start=1
    ):
        if output == "json":
            render.print_json_line(item.to_dict())
        else:
            event = item.event
            text = f"{event.msg}%" if event.type == "PROGRESS" else str(event.msg)
            state_name = item.run_state.value if item.run_state is not None else ""
            click.echo(
                f"{item.offset:>8}  {item.run_id}  #{item.attempt}  {event.type:<10} "
                f"{text}  [{state_name}]"
            )
        sys.stdout.flush()
        if limit is not None and count >= limit:
            return
