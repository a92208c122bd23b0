"""Proto ↔ agent types: the one place the agent translates wire messages.

Pairs ``x_to_proto`` / ``x_from_proto``. Enumerations map by name: the domain's
``EventType.STARTED`` is the wire's ``EVENT_TYPE_STARTED``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from gyoza.agent.capacity import CapacityInfo
from gyoza.agent.executor import Assignment
from gyoza.api.v1 import agent_pb2, agent_service_pb2, op_run_pb2, resources_pb2
from gyoza.models.resources import Constraints, EventType, FailureClass

_LOG_STREAMS = {
    "stdout": op_run_pb2.LOG_STREAM_STDOUT,
    "stderr": op_run_pb2.LOG_STREAM_STDERR,
}


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


def constraints_from_proto(message: resources_pb2.Constraints) -> Constraints:
    """Domain constraints from the wire (zero timeout means none)."""
    return Constraints(
        cpu=message.cpu,
        ram_mb=message.ram_mb,
        vram_mb=message.vram_mb,
        gpu_count=message.gpu_count,
        gpu_id=message.gpu_id if message.HasField("gpu_id") else None,
        timeout_s=message.timeout_seconds if message.timeout_seconds > 0 else None,
    )


def assignment_from_proto(message: agent_service_pb2.Assignment) -> Assignment:
    """The executor's view of an assignment."""
    return Assignment(
        run_id=message.run_id,
        attempt=message.attempt,
        image=message.image,
        inputs=dict_from_struct(message.inputs),
        constraints=constraints_from_proto(message.constraints),
        gpu_ids=tuple(message.gpu_ids),
        gpu_uuids=tuple(message.gpu_uuids),
        op_definition=message.op_definition or None,
        op_definition_version=message.op_definition_version or None,
    )


def event_type_to_proto(event_type: EventType) -> resources_pb2.EventType.ValueType:
    """``EventType.STARTED`` → ``EVENT_TYPE_STARTED``."""
    return resources_pb2.EventType.Value(f"EVENT_TYPE_{event_type.value}")


def event_type_from_proto(value: resources_pb2.EventType.ValueType) -> EventType:
    """``EVENT_TYPE_STARTED`` → ``EventType.STARTED``.

    Raises
    ------
    ValueError
        For ``EVENT_TYPE_UNSPECIFIED``.
    """
    name = resources_pb2.EventType.Name(value).removeprefix("EVENT_TYPE_")
    return EventType(name)


def failure_class_to_proto(
    failure_class: FailureClass | None,
) -> resources_pb2.FailureClass.ValueType:
    """``FailureClass.OOM`` → ``FAILURE_CLASS_OOM``; ``None`` → unspecified."""
    if failure_class is None:
        return resources_pb2.FAILURE_CLASS_UNSPECIFIED
    return resources_pb2.FailureClass.Value(f"FAILURE_CLASS_{failure_class.value}")


def log_stream_to_proto(stream: str) -> op_run_pb2.LogStream.ValueType:
    """``"stdout"`` / ``"stderr"`` → the wire enum (anything else: unspecified)."""
    return _LOG_STREAMS.get(stream.lower(), op_run_pb2.LOG_STREAM_UNSPECIFIED)


def reported_event_to_proto(
    event_type: EventType,
    message: str = "",
    *,
    progress: int = 0,
    payload: Mapping[str, Any] | None = None,
    outputs: Mapping[str, Any] | None = None,
    failure_class: FailureClass | None = None,
    exit_code: int | None = None,
    error_message: str | None = None,
    duration_ms: int | None = None,
) -> agent_service_pb2.ReportedEvent:
    """An executor's event as the agent reports it."""
    event = agent_service_pb2.ReportedEvent(
        type=event_type_to_proto(event_type),
        message=message,
        progress=progress,
        failure_class=failure_class_to_proto(failure_class),
        error_message=error_message or "",
        duration_ms=duration_ms or 0,
    )
    if payload:
        event.payload.CopyFrom(struct_from_dict(payload))
    if outputs is not None:
        event.outputs.CopyFrom(struct_from_dict(outputs))
    if exit_code is not None:
        event.exit_code = exit_code
    return event


def log_chunk_to_proto(lines: list[tuple[str, str]]) -> agent_service_pb2.LogChunk:
    """``(text, stream)`` pairs as a LogChunk (line endings stripped)."""
    return agent_service_pb2.LogChunk(
        lines=[
            agent_service_pb2.LogChunkLine(
                text=text.rstrip("\r\n"), stream=log_stream_to_proto(stream)
            )
            for text, stream in lines
        ]
    )


def timestamp_to_proto(value: datetime) -> timestamp_pb2.Timestamp:
    """An aware datetime as a Timestamp."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def struct_from_dict(value: Mapping[str, Any]) -> struct_pb2.Struct:
    """A JSON object as a Struct."""
    message = struct_pb2.Struct()
    message.update(dict(value))
    return message


def dict_from_struct(message: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a JSON object. Struct numbers are doubles; integral ones come back as
    ``int`` so that ``{"steps": 3}`` round-trips as written."""
    return {key: _integral(value) for key, value in json_format.MessageToDict(message).items()}


def _integral(value: Any) -> Any:
    if (
        isinstance(value, float)
        and math.isfinite(value)
        and value.is_integer()
        and abs(value) < 2**53
    ):
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value
