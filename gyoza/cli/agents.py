"""``gyoza agents``: the fleet as the server sees it."""

from __future__ import annotations

import click

from gyoza.cli import render
from gyoza.cli.context import CliState, connection_options, output_option, pass_state
from gyoza.client.agents import agent_from_proto

__all__ = ["agents"]


@click.group()
def agents() -> None:
    """Agents: the GPU nodes that run ops."""


@agents.command("list")
@click.option("--all", "include_all", is_flag=True, help="Include disconnected agents.")
@connection_options
@output_option
@pass_state
def list_agents(state: CliState, include_all: bool, output: str) -> None:
    """List agents with their capacity, GPUs (VRAM free for new runs) and runs."""
    response = state.client().api.list_all_agents(include_disconnected=include_all)
    if output == "json":
        render.print_message(response)
        return
    found = [agent_from_proto(a) for a in response.agents]
    if not found:
        click.echo("no agents", err=True)
    else:
        render.show(render.agents_table(found))


@agents.command()
@click.argument("name")
@connection_options
@output_option
@pass_state
def drain(state: CliState, name: str, output: str) -> None:
    """Tell an agent to take no new work and finish what it holds.

    The drain lasts across the agent's restarts and the server's, until
    `gyoza agents undrain NAME`.
    """
    response = state.client().api.drain_agent(name)
    agent = agent_from_proto(response.agent)
    if output == "json":
        render.print_message(response)
    else:
        click.echo(f"draining {agent.name}: {len(agent.runs)} run(s) to finish")


@agents.command()
@click.argument("name")
@connection_options
@output_option
@pass_state
def undrain(state: CliState, name: str, output: str) -> None:
    """End an agent's drain: it takes new work again."""
    response = state.client().api.undrain_agent(name)
    agent = agent_from_proto(response.agent)
    if output == "json":
        render.print_message(response)
    else:
        click.echo(f"{agent.name} takes new work again")
