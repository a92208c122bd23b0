"""``gyoza runs``: create, list, show, watch, steer runs and read their logs."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import click

from gyoza import mapping
from gyoza.api.v1 import op_run_pb2, op_run_service_pb2
from gyoza.cli import render
from gyoza.cli.context import CliState, connection_options, fail, output_option, pass_state
from gyoza.cli.inputs import InputError, parse_inputs, parse_inputs_json
from gyoza.cli.times import TimeParam
from gyoza.cli.watch import follow_run, log_line_messages
from gyoza.client import AttemptEvent, RunFilter
from gyoza.models.op_definition import OpDefinition
from gyoza.models.resources import Constraints, EventDelivery, OpRunState

__all__ = ["runs"]

_STATES = click.Choice([s.value for s in OpRunState], case_sensitive=False)


@click.group()
def runs() -> None:
    """Runs: executions of an op, with their attempts, events and logs."""


# ----------------------------------------------------------------------------------------
# create
# ----------------------------------------------------------------------------------------


@runs.command()
@click.option("--definition", metavar="NAME", help="Run this op definition.")
@click.option(
    "--definition-version",
    type=click.IntRange(min=1),
    metavar="N",
    help="Version of the definition (default: latest).",
)
@click.option("--image", metavar="IMAGE", help="Run this image ad hoc (no definition).")
@click.option(
    "--input",
    "input_pairs",
    multiple=True,
    metavar="KEY=VALUE",
    help="An input; repeatable. VALUE is read as JSON when it parses, else as a string; "
    "a definition's input types decide when they declare KEY.",
)
@click.option(
    "--inputs-json",
    metavar="JSON|@FILE",
    help="All inputs as one JSON object (or @FILE holding one); --input values win.",
)
@click.option("--priority", type=click.IntRange(min=0), help="Higher runs first (default 0).")
@click.option("--cpu", type=click.FloatRange(min=0), help="CPU cores to reserve.")
@click.option("--ram-mb", type=click.IntRange(min=0), help="Memory in MiB (also the limit).")
@click.option(
    "--vram-mb",
    type=click.IntRange(min=0),
    help="VRAM in MiB on each GPU; runs that state it share a GPU while their VRAM fits.",
)
@click.option(
    "--gpu-count",
    type=click.IntRange(min=0),
    help="Number of GPUs. Without --vram-mb each GPU is held whole (no other run on it).",
)
@click.option("--gpu-id", type=click.IntRange(min=0), help="Pin to this GPU index.")
@click.option(
    "--timeout-s", type=click.FloatRange(min=0, min_open=True), help="Time limit per attempt."
)
@click.option(
    "--selector",
    metavar="SELECTOR",
    help="Agent labels the run requires, e.g. 'executor=docker, zone notin (eu-1)'; "
    "see docs/scheduling.md.",
)
@click.option(
    "--queue-timeout-s",
    type=click.FloatRange(min=0, min_open=True),
    help="Fail as QUEUE_TIMEOUT when not placed within this many seconds.",
)
@click.option("--topic", help="Publish the run's events on this topic.")
@click.option("--request-id", metavar="ID", help="Idempotency key: repeating it is safe.")
@click.option("--watch", is_flag=True, help="Follow the run to its end (exit 0 if COMPLETED).")
@click.option("--logs", is_flag=True, help="With --watch: show its log lines as they come.")
@connection_options
@output_option
@pass_state
def create(
    state: CliState,
    /,
    definition: str | None,
    definition_version: int | None,
    image: str | None,
    input_pairs: Sequence[str],
    inputs_json: str | None,
    priority: int | None,
    topic: str | None,
    request_id: str | None,
    watch: bool,
    logs: bool,
    output: str,
    **resources: Any,
) -> None:
    """Create a run from a definition (--definition) or an image (--image).

    A --request-id that was used before creates nothing: the command says the run
    "exists" and shows the run first created with it.
    """
    if (definition is None) == (image is None):
        fail("give either --definition NAME or --image IMAGE")
    if definition_version is not None and definition is None:
        fail("--definition-version needs --definition")
    if logs and not watch:
        fail("--logs needs --watch")
    overrides = {k: v for k, v in resources.items() if v is not None}
    client = state.client()
    # The definition is read only when the command needs it: to type --input values and
    # to start overrides from its settings (the API replaces them whole).
    op: OpDefinition | None = None
    if definition is not None and (input_pairs or overrides or topic is not None):
        op = client.get_definition(definition, definition_version)
    try:
        inputs = parse_inputs_json(inputs_json) if inputs_json is not None else {}
        inputs.update(parse_inputs(input_pairs, op.inputs if op is not None else ()))
    except InputError as error:
        fail(str(error))
    constraints = None
    if overrides:
        base = op.constraints if op is not None else Constraints()
        constraints = dataclasses.replace(base, **overrides)
    event_delivery = None
    if topic is not None:
        attributes = dict(op.event_delivery.attributes) if op is not None else {}
        event_delivery = EventDelivery(topic=topic, attributes=attributes)
    try:
        response = client.api.create_op_run(
            definition=definition,
            definition_version=definition_version,
            image=image,
            inputs=inputs,
            priority=priority or 0,
            constraints=constraints,
            event_delivery=event_delivery,
            request_id=request_id,
        )
    except (TypeError, ValueError) as error:
        fail(f"inputs: {error}")
    run = mapping.run_from_proto(response.op_run)
    said = f"exists {run.id}" if response.existing else f"created {run.id}"
    if response.existing:
        said += f" ({run.state.value}): request id {request_id} was used before"
    else:
        said += f" ({run.state.value})"
    if watch:
        if output != "json":
            click.echo(said, err=True)
        sys.exit(follow_run(client, run.id, output, logs=logs))
    if output == "json":
        render.print_message(response)
    else:
        click.echo(said)


# ----------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------


@runs.command("list")
@click.option(
    "--state", "states", multiple=True, type=_STATES, help="Only runs in this state; repeatable."
)
@click.option("--definition", metavar="NAME", help="Only runs of this definition.")
@click.option("--image", metavar="IMAGE", help="Only runs of this image.")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Most runs to show (0: all); pages on until then.",
)
@click.option("--oldest-first", is_flag=True, help="Oldest first instead of newest first.")
@click.option(
    "--created-after",
    type=TimeParam(),
    metavar="TIME",
    help="Only runs created at or after TIME: ISO 8601 (local time without an offset) "
    "or a duration ago (15m, 2h, 7d).",
)
@click.option(
    "--created-before", type=TimeParam(), metavar="TIME", help="Only runs created before TIME."
)
@click.option(
    "--page-token",
    metavar="TOKEN",
    default="",
    help="Go on where an earlier list stopped (the token it printed), with the same filters.",
)
@connection_options
@output_option
@pass_state
def list_runs(
    state: CliState,
    states: Sequence[str],
    definition: str | None,
    image: str | None,
    limit: int,
    oldest_first: bool,
    created_after: datetime | None,
    created_before: datetime | None,
    page_token: str,
    output: str,
) -> None:
    """List runs, newest first.

    When more runs match than --limit shows, the token of the next page is printed
    (on stderr; in the JSON as next_page_token): give it to --page-token to go on.
    """
    filters = RunFilter(
        states=tuple(OpRunState(s.upper()) for s in states),
        definition=definition,
        image=image,
        created_after=created_after,
        created_before=created_before,
        oldest_first=oldest_first,
    )
    api = state.client().api
    found: list[op_run_pb2.OpRun] = []
    token = page_token
    while True:
        # The last page asks for just what is left, so that its token starts right
        # after the last run shown.
        wanted = min(limit - len(found), 500) if limit else 500
        page = api.list_op_runs(filters, wanted, token)
        found.extend(page.op_runs)
        token = page.next_page_token
        if not token or (limit and len(found) >= limit):
            break
    if output == "json":
        render.print_message(
            op_run_service_pb2.ListOpRunsResponse(op_runs=found, next_page_token=token)
        )
        return
    if not found:
        click.echo("no runs", err=True)
    else:
        render.show(render.runs_table(mapping.run_from_proto(r) for r in found))
    if token:
        click.echo(f"more runs: --page-token {token}", err=True)


@runs.command()
@click.argument("run_id", metavar="ID")
@connection_options
@output_option
@pass_state
def get(state: CliState, run_id: str, output: str) -> None:
    """Show a run, its current attempt and its event timeline."""
    response = state.client().api.get_op_run(run_id)
    if output == "json":
        render.print_message(response)
        return
    run = mapping.run_from_proto(response.op_run)
    timeline = [AttemptEvent(run.current_attempt, e) for e in run.events]
    render.show(render.run_detail(run), *([render.events_table(timeline)] if timeline else []))


@runs.command()
@click.argument("run_id", metavar="ID")
@click.option(
    "--attempt", type=click.IntRange(min=1), help="Only this attempt's events (default: all)."
)
@connection_options
@output_option
@pass_state
def events(state: CliState, run_id: str, attempt: int | None, output: str) -> None:
    """List a run's events, of every attempt, in order."""
    api = state.client().api
    events: list[op_run_pb2.OpRunEvent] = []
    token = ""
    while True:
        page = api.list_op_run_events(run_id, attempt or 0, page_token=token)
        events.extend(page.events)
        token = page.next_page_token
        if not token:
            break
    if output == "json":
        render.print_message(op_run_service_pb2.ListOpRunEventsResponse(events=events))
    else:
        render.show(
            render.events_table([AttemptEvent(*mapping.event_from_proto(e)) for e in events])
        )


@runs.command()
@click.argument("run_id", metavar="ID")
@connection_options
@output_option
@pass_state
def attempts(state: CliState, run_id: str, output: str) -> None:
    """List a run's attempts, first to last."""
    response = state.client().api.list_op_run_attempts(run_id)
    if output == "json":
        render.print_message(response)
    else:
        render.show(
            render.attempts_table([mapping.attempt_from_proto(a) for a in response.attempts])
        )


@runs.command()
@click.argument("run_id", metavar="ID")
@click.option(
    "--after-sequence",
    type=click.IntRange(min=0),
    default=0,
    help="Resume after this sequence (from a previous --output json line).",
)
@click.option("--logs", is_flag=True, help="Show the run's log lines too, as they come.")
@connection_options
@output_option
@pass_state
def watch(state: CliState, run_id: str, after_sequence: int, logs: bool, output: str) -> None:
    """Follow a run live until it ends; exit 0 if it COMPLETED, 1 if not.

    A server that restarts meanwhile is waited for, and the watch goes on from the
    last change it showed. With --output json: one JSON line per change (the
    WatchOpRunResponse; only the first carries the whole run), and with --logs one
    GetOpRunLogsResponse line per log line.
    """
    sys.exit(follow_run(state.client(), run_id, output, after_sequence, logs=logs))


@runs.command()
@click.argument("run_id", metavar="ID")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until it ends.")
@click.option(
    "--attempt", type=click.IntRange(min=1), help="This attempt's logs (default: current)."
)
@connection_options
@output_option
@pass_state
def logs(state: CliState, run_id: str, follow: bool, attempt: int | None, output: str) -> None:
    """Print a run's log lines. With --output json: one JSON line per log line (a
    GetOpRunLogsResponse holding that line)."""
    for response in state.client().api.get_op_run_logs(run_id, attempt or 0, follow=follow):
        if output == "json":
            for message in log_line_messages(response):
                render.print_message_line(message)
            continue
        for line in response.lines:
            click.echo(line.text)
        if follow:
            sys.stdout.flush()


# ----------------------------------------------------------------------------------------
# steering
# ----------------------------------------------------------------------------------------


@runs.command()
@click.argument("run_id", metavar="ID")
@click.option("--reason", default="", help="Why; recorded in the run's events.")
@connection_options
@output_option
@pass_state
def cancel(state: CliState, run_id: str, reason: str, output: str) -> None:
    """Cancel a run (an active run stops once its agent stopped the container)."""
    response = state.client().api.cancel_op_run(run_id, reason)
    run = mapping.run_from_proto(response.op_run)
    if output == "json":
        render.print_message(response)
    elif run.state is OpRunState.CANCELLED:
        click.echo(f"cancelled {run.id}")
    else:
        click.echo(f"cancel requested for {run.id} ({run.state.value}); its agent stops it")


@runs.command()
@click.argument("run_id", metavar="ID")
@connection_options
@output_option
@pass_state
def delete(state: CliState, run_id: str, output: str) -> None:
    """Delete a finished run with its events, logs and topic records.

    Only COMPLETED, FAILED or CANCELLED runs (not waiting for an automatic retry) can be
    deleted; cancel an active run first.
    """
    response = state.client().api.delete_op_run(run_id)
    if output == "json":
        render.print_message(response)
    else:
        click.echo(f"deleted {run_id}")


@runs.command()
@click.argument("run_id", metavar="ID")
@connection_options
@output_option
@pass_state
def retry(state: CliState, run_id: str, output: str) -> None:
    """Start a new attempt of a FAILED or CANCELLED run."""
    response = state.client().api.retry_op_run(run_id)
    run = mapping.run_from_proto(response.op_run)
    if output == "json":
        render.print_message(response)
    else:
        click.echo(f"retrying {run.id}: attempt {run.current_attempt} is {run.state.value}")


@runs.command()
@click.argument("run_id", metavar="ID")
@click.argument("priority", type=click.IntRange(min=0))
@connection_options
@output_option
@pass_state
def priority(state: CliState, run_id: str, priority: int, output: str) -> None:
    """Change a run's priority (higher runs first)."""
    response = state.client().api.update_op_run_priority(run_id, priority)
    run = mapping.run_from_proto(response.op_run)
    if output == "json":
        render.print_message(response)
    else:
        click.echo(f"{run.id} priority {run.priority}")
