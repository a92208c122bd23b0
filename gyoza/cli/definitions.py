"""``gyoza definitions``: deploy, list, show and delete op definitions."""

from __future__ import annotations

import click

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
    stored = state.client().create_definition(definition)
    if output == "json":
        render.print_json(stored.to_dict())
    else:
        click.echo(f"deployed {stored.name} version {stored.version} ({stored.image})")


@definitions.command("list")
@click.option("--name", help="Every version of this op, newest first.")
@connection_options
@output_option
@pass_state
def list_definitions(state: CliState, name: str | None, output: str) -> None:
    """List the latest version of every op (or every version of one)."""
    items = list(state.client().iter_definitions(name=name))
    if output == "json":
        render.print_json([d.to_dict() for d in items])
    elif not items:
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
    definition = state.client().get_definition(name, version)
    if output == "json":
        render.print_json(definition.to_dict())
    else:
        render.show(render.definition_detail(definition))


@definitions.command()
@click.argument("name")
@click.option("--version", type=click.IntRange(min=1), help="Only this version.")
@connection_options
@output_option
@pass_state
def delete(state: CliState, name: str, version: int | None, output: str) -> None:
    """Delete one version of an op, or every version. Its runs are kept."""
    count = state.client().delete_definition(name, version)
    if output == "json":
        render.print_json({"name": name, "version": version, "deleted_count": count})
    else:
        which = f"version {version} of {name}" if version else f"{count} version(s) of {name}"
        click.echo(f"deleted {which}")
