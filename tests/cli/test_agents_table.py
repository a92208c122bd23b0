"""``gyoza agents list``'s table: the REPLICA column appears only when an agent has one."""

from __future__ import annotations

import pytest
from rich.console import Console

from gyoza.cli.render import agents_table
from gyoza.client.agents import Agent, AgentState

pytestmark = pytest.mark.timeout(30)


def agent(name: str, replica: str = "") -> Agent:
    return Agent(
        name=name,
        state=AgentState.CONNECTED,
        cpu=4,
        ram_mb=1024,
        cpu_reserved=0,
        ram_reserved_mb=0,
        replica=replica,
    )


def rendered(*agents: Agent) -> list[str]:
    console = Console(width=200, record=True)
    console.print(agents_table(agents))
    return console.export_text().splitlines()


def test_no_replica_column_for_a_single_server() -> None:
    header, *_ = rendered(agent("a"), agent("b"))
    assert "REPLICA" not in header


def test_the_replica_column_names_each_agents_replica() -> None:
    header, first, second = rendered(agent("a", "replica-1"), agent("b"))
    assert header.split()[:3] == ["NAME", "STATE", "REPLICA"]
    assert first.split()[:3] == ["a", "CONNECTED", "replica-1"]
    assert second.split()[:3] == ["b", "CONNECTED", "-"]
