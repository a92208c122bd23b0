"""The labels an agent publishes in its Hello: the operator's and automatic ones.

Runs select agents by these labels (``constraints.selector``). The automatic labels say
what the agent is, so that a selector such as ``executor = docker`` can be trusted: an
operator's ``--labels`` cannot override them.

========================  ==============================================
label                     value
========================  ==============================================
``executor``              ``docker`` or ``scripted``
``gpu.model``             model name of the first GPU (absent without GPUs)
``gpu.count``             number of GPUs (``0`` without)
``agent.version``         version of the agent software
========================  ==============================================
"""

from __future__ import annotations

from collections.abc import Mapping

from gyoza.api.v1 import agent_pb2

#: Keys the agent sets itself; an operator label with one of these keys is replaced.
AUTOMATIC_KEYS = ("executor", "gpu.model", "gpu.count", "agent.version")


def agent_labels(
    operator_labels: Mapping[str, str],
    *,
    executor: str,
    capacity: agent_pb2.Capacity,
    version: str,
) -> dict[str, str]:
    """The operator's labels with the automatic ones set over them."""
    labels = {k: v for k, v in operator_labels.items() if k not in AUTOMATIC_KEYS}
    labels["executor"] = executor
    labels["gpu.count"] = str(len(capacity.gpus))
    if capacity.gpus:
        first = min(capacity.gpus, key=lambda g: g.index)
        if first.name:
            labels["gpu.model"] = first.name
    labels["agent.version"] = version
    return labels
