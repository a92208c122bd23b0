"""Proto ↔ the agent's own types (its capacity, an assignment as the executor sees it).

Everything else the agent puts on the wire or reads from it (reported events, log
lines, constraints, Struct values, timestamps, enums) is converted by the shared
:mod:`gyoza.mapping`, so the agent and the server agree on every value.
"""

from __future__ import annotations

from gyoza import mapping
from gyoza.agent.capacity import CapacityInfo
from gyoza.agent.executor import Assignment
from gyoza.api.v1 import agent_pb2, agent_service_pb2


def capacity_to_proto(capacity: CapacityInfo) -> agent_pb2.Capacity:
    """The agent's capacity as the Hello and Heartbeat carry it."""
    return agent_pb2.Capacity(
        cpu=capacity.cpu,
        ram_mb=capacity.ram_mb,
        gpus=[
            agent_pb2.Gpu(
                index=gpu.index,
                uuid=gpu.uuid,
                name=gpu.name,
                vram_total_mb=gpu.vram_total_mb,
                vram_free_mb=gpu.vram_free_mb,
                healthy=gpu.healthy,
                health_reason=gpu.health_reason,
            )
            for gpu in capacity.gpus
        ],
    )


def assignment_from_proto(message: agent_service_pb2.Assignment) -> Assignment:
    """The executor's view of an assignment."""
    return Assignment(
        run_id=message.run_id,
        attempt=message.attempt,
        image=message.image,
        inputs=mapping.struct_from_proto(message.inputs),
        constraints=mapping.constraints_from_proto(message.constraints),
        gpu_ids=tuple(message.gpu_ids),
        gpu_uuids=tuple(message.gpu_uuids),
        op_definition=message.op_definition or None,
        op_definition_version=message.op_definition_version or None,
    )
