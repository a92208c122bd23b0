"""``gyoza definitions``: deploy, list, show and delete op definitions."""

from __future__ import annotations

import click

from gyoza import mapping
from gyoza.api.v1 import definition_service_pb2, op_definition_pb2
from gyoza.cli import render
from gyoza.cli.context import CliState, connection_options, fail, output_option, pass_state
from gyoza.cli.op_file import OpFileError, load_op_file

__all__ = ["definitions"]


@click.group()
def definitions() -> None:
    """Op definitions: named, versioned ops that runs are created from."""


@definitions.command()
@click.option(
    "-f",
    "--file",
    "path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The op file (op.yaml).",
)
@connection_options
@output_option
@pass_state
def deploy(state: CliState, path: str, output: str) -> None:
    """Store a new version of the op an op.yaml describes.

    \b
    name: render                  # lowercase, digits, '.', '_', '-'
    image: ghcr.io/acme/render:1
    description: Renders a prompt
    inputs:                       # type: string|int|float|bool|object|array
      prompt: {type: string, required: true, description: What to draw}
      steps: {type: int, default: 30}
    outputs:                      # what a completed run's outputs must hold
      image_url: {type: string, required: true}
    constraints: {cpu: 2, ram_mb: 4096, vram_mb: 8000, gpu_count: 1, timeout_s: 600}
    retry_policy: {max_attempts: 3, initial_delay_s: 1, backoff_multiplier: 2,
                   max_delay_s: 60, retry_on: [EXIT_CODE, OOM]}
    event_delivery: {topic: renders, attributes: {team: vision}}

    The server assigns versions (1, 2, 3... per name); a `version` key is ignored.
    """
    try:
        definition = load_op_file(path)
    except OpFileError as error:
        fail("\n".join(error.lines()))
    response = state.client().api.create_op_definition(definition)
    stored = mapping.definition_from_proto(response.op_definition)
    if output == "json":
        render.print_message(response)
    else:
        click.echo(f"deployed {stored.name} version {stored.version} ({stored.image})")


@definitions.command("list")
@click.option("--name", help="Every version of this op, newest first.")
@connection_options
@output_option
@pass_state
def list_definitions(state: CliState, name: str | None, output: str) -> None:
    """List the latest version of every op (or every version of one)."""
    api = state.client().api
    found: list[op_definition_pb2.OpDefinition] = []
    token = ""
    while True:
        page = api.list_op_definitions(name, page_token=token)
        found.extend(page.op_definitions)
        token = page.next_page_token
        if not token:
            break
    if output == "json":
        render.print_message(definition_service_pb2.ListOpDefinitionsResponse(op_definitions=found))
        return
    items = [mapping.definition_from_proto(d) for d in found]
    if not items:
        click.echo("no definitions" if name is None else f"no versions of {name}", err=True)
    else:
        render.show(render.definitions_table(items))


@definitions.command()
@click.argument("name")
@click.option("--version", type=click.IntRange(min=1), help="This version (default: latest).")
@connection_options
@output_option
@pass_state
def get(state: CliState, name: str, version: int | None, output: str) -> None:
    """Show one version of an op (the latest by default)."""
    response = state.client().api.get_op_definition(name, version)
    if output == "json":
        render.print_message(response)
    else:
        render.show(render.definition_detail(mapping.definition_from_proto(response.op_definition)))


@definitions.command()
@click.argument("name")
@click.option("--version", type=click.IntRange(min=1), help="Only this version.")
@connection_options
@output_option
@pass_state
def delete(state: CliState, name: str, version: int | None, output: str) -> None:
    """Delete one version of an op, or every version. Its runs are kept."""
    response = state.client().api.delete_op_definition(name, version)
    count = response.deleted_count
    if output == "json":
        render.print_message(response)
    else:
        which = f"version {version} of {name}" if version else f"{count} version(s) of {name}"
        click.echo(f"deleted {which}")
