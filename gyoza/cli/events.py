"""``gyoza events``: follow a topic, the events of every run delivered on it."""

from __future__ import annotations

import sys

import click

from gyoza import mapping
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
    --output json: one JSON line per event (the SubscribeEventsResponse).
    """
    api = state.client().api
    for count, response in enumerate(
        api.subscribe_events(topic, after_offset, from_latest=from_latest), start=1
    ):
        if output == "json":
            render.print_message_line(response)
        else:
            attempt, event = mapping.event_from_proto(response.event)
            state_name = (
                mapping.state_from_proto(response.run_state).value if response.run_state else ""
            )
            click.echo(
                f"{response.offset:>8}  {response.run_id}  #{attempt}  {event.type:<10} "
                f"{render.event_message(event)}  [{state_name}]"
            )
        sys.stdout.flush()
        if limit is not None and count >= limit:
            return
