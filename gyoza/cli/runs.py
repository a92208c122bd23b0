"""``gyoza runs``: create, list, show, watch, steer runs and read their logs."""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections.abc import Sequence
from typing import Any

import click

from gyoza.cli import render
from gyoza.cli.context import CliState, connection_options, fail, output_option, pass_state
from gyoza.cli.inputs import InputError, parse_inputs, parse_inputs_json
from gyoza.cli.watch import follow_run
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
    output: str,
    **resources: Any,
) -> None:
    """Create a run from a definition (--definition) or an image (--image)."""
    if (definition is None) == (image is None):
        fail("give either --definition NAME or --image IMAGE")
    if definition_version is not None and definition is None:
        fail("--definition-version needs --definition")
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
        run = client.create_run(
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
    if watch:
        if output != "json":
            click.echo(f"created {run.id}", err=True)
        sys.exit(follow_run(client, run.id, output))
    if output == "json":
        render.print_json(render.run_json(run))
    else:
        click.echo(f"created {run.id} ({run.state.value})")


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
    output: str,
) -> None:
    """List runs, newest first."""
    filters = RunFilter(
        states=tuple(OpRunState(s.upper()) for s in states),
        definition=definition,
        image=image,
        oldest_first=oldest_first,
    )
    page_size = min(limit, 500) if limit else 500
    found = state.client().iter_runs(filters, page_size)
    items = list(itertools.islice(found, limit) if limit else found)
    if output == "json":
        render.print_json([render.run_json(r) for r in items])
    elif not items:
        click.echo("no runs", err=True)
    else:
        render.show(render.runs_table(items))


@runs.command()
@click.argument("run_id", metavar="ID")
@connection_options
@output_option
@pass_state
def get(state: CliState, run_id: str, output: str) -> None:
    """Show a run, its current attempt and its event timeline."""
    run = state.client().get_run(run_id)
    if output == "json":
        render.print_json(render.run_json(run))
        return
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
    found = state.client().list_events(run_id, attempt or 0)
    if output == "json":
        render.print_json([{"attempt": a, **e.to_dict()} for a, e in found])
    else:
        render.show(render.events_table(found))


@runs.command()
@click.argument("run_id", metavar="ID")
@connection_options
@output_option
@pass_state
def attempts(state: CliState, run_id: str, output: str) -> None:
    """List a run's attempts, first to last."""
    found = state.client().list_attempts(run_id)
    if output == "json":
        render.print_json([a.to_dict() for a in found])
    else:
        render.show(render.attempts_table(found))


@runs.command()
@click.argument("run_id", metavar="ID")
@click.option(
    "--after-sequence",
    type=click.IntRange(min=0),
    default=0,
    help="Resume after this sequence (from a previous --output json line).",
)
@connection_options
@output_option
@pass_state
def watch(state: CliState, run_id: str, after_sequence: int, output: str) -> None:
    """Follow a run live until it ends; exit 0 if it COMPLETED, 1 if not.

    With --output json: one JSON line per change.
    """
    sys.exit(follow_run(state.client(), run_id, output, after_sequence))


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
    """Print a run's log lines. With --output json: one JSON line per log line."""
    for line in state.client().logs(run_id, attempt or 0, follow=follow):
        if output == "json":
            render.print_json_line(line.to_dict())
        else:
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
    run = state.client().cancel_run(run_id, reason)
    if output == "json":
        render.print_json(render.run_json(run))
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
    state.client().delete_run(run_id)
    if output == "json":
        render.print_json({"runId": run_id})
    else:
        click.echo(f"deleted {run_id}")


@runs.command()
@click.argument("run_id", metavar="ID")
@connection_options
@output_option
@pass_state
def retry(state: CliState, run_id: str, output: str) -> None:
    """Start a new attempt of a FAILED or CANCELLED run."""
    run = state.client().retry_run(run_id)
    if output == "json":
        render.print_json(render.run_json(run))
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
    run = state.client().set_priority(run_id, priority)
    if output == "json":
        render.print_json(render.run_json(run))
    else:
        click.echo(f"{run.id} priority {run.priority}")
