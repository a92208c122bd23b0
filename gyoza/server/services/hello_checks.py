"""Bounds on what an agent declares: its name, labels and capacity.

The scheduler places runs by what agents declare, and ListAgents shows it; a negative,
non-finite or absurd capacity would be used for placement, and megabytes of labels
would make every fleet listing fail. A Hello (or a heartbeat's capacity) outside these
bounds is refused with INVALID_ARGUMENT and a BadRequest naming every violation.
"""

from __future__ import annotations

import math
import unicodedata

from gyoza.api.v1 import agent_pb2, agent_service_pb2
from gyoza.models.errors import FieldViolation, InvalidInput

MAX_NAME_LENGTH = 128
"""Longest agent name, in characters."""
MAX_LABELS = 64
MAX_LABEL_KEY_LENGTH = 128
MAX_LABEL_VALUE_LENGTH = 512
MAX_TEXT_LENGTH = 256
"""Longest version, GPU uuid, GPU name or health reason."""
MAX_HELD = 10_000
"""Most attempts one Hello may report holding."""
MAX_CPU = 16_384.0
"""Most CPU cores an agent may declare."""
MAX_RAM_MB = 64 * 1024 * 1024
"""Most memory an agent may declare: 64 TiB."""
MAX_GPUS = 64
MAX_VRAM_MB = 4 * 1024 * 1024
"""Most VRAM one GPU may declare: 4 TiB."""


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


def _text(value: str, field: str, limit: int, violations: list[FieldViolation]) -> None:
    if len(value) > limit:
        violations.append(FieldViolation(field, f"must be at most {limit} characters"))


def agent_name_violations(name: str, field: str = "agent_name") -> list[FieldViolation]:
    """What is wrong with *name* as an agent name (nothing: an empty list)."""
    if not name.strip():
        return [FieldViolation(field, "must not be empty")]
    if len(name) > MAX_NAME_LENGTH:
        return [FieldViolation(field, f"must be at most {MAX_NAME_LENGTH} characters")]
    if _has_control(name) or name != name.strip():
        return [FieldViolation(field, "must have no control characters or outer spaces")]
    return []


def replica_violations(replica: str | bytes, field: str) -> list[FieldViolation]:
    """What is wrong with a replica id named in the metadata (nothing: an empty list)."""
    if not isinstance(replica, str):
        return [FieldViolation(field, "must be text")]
    if len(replica) > MAX_NAME_LENGTH:
        return [FieldViolation(field, f"must be at most {MAX_NAME_LENGTH} characters")]
    if _has_control(replica) or replica != replica.strip():
        return [FieldViolation(field, "must have no control characters or outer spaces")]
    return []


def capacity_violations(capacity: agent_pb2.Capacity, field: str) -> list[FieldViolation]:
    """What is wrong with a declared capacity: every violation, each with its field."""
    violations: list[FieldViolation] = []
    cpu = capacity.cpu
    if not math.isfinite(cpu) or not 0 <= cpu <= MAX_CPU:
        violations.append(FieldViolation(f"{field}.cpu", f"must be within 0-{MAX_CPU:g} cores"))
    if not 0 <= capacity.ram_mb <= MAX_RAM_MB:
        violations.append(FieldViolation(f"{field}.ram_mb", f"must be within 0-{MAX_RAM_MB} MiB"))
    if len(capacity.gpus) > MAX_GPUS:
        violations.append(FieldViolation(f"{field}.gpus", f"must be at most {MAX_GPUS} GPUs"))
        return violations
    indexes: set[int] = set()
    for i, gpu in enumerate(capacity.gpus):
        where = f"{field}.gpus[{i}]"
        if not 0 <= gpu.index < MAX_GPUS:
            violations.append(FieldViolation(f"{where}.index", f"must be within 0-{MAX_GPUS - 1}"))
        elif gpu.index in indexes:
            violations.append(FieldViolation(f"{where}.index", "is declared twice"))
        indexes.add(gpu.index)
        if not 0 <= gpu.vram_total_mb <= MAX_VRAM_MB:
            violations.append(
                FieldViolation(f"{where}.vram_total_mb", f"must be within 0-{MAX_VRAM_MB} MiB")
            )
        if not 0 <= gpu.vram_free_mb <= max(gpu.vram_total_mb, 0):
            violations.append(
                FieldViolation(f"{where}.vram_free_mb", "must be within 0 and vram_total_mb")
            )
        _text(gpu.uuid, f"{where}.uuid", MAX_TEXT_LENGTH, violations)
        _text(gpu.name, f"{where}.name", MAX_TEXT_LENGTH, violations)
        _text(gpu.health_reason, f"{where}.health_reason", MAX_TEXT_LENGTH, violations)
    return violations


def check_capacity(capacity: agent_pb2.Capacity, field: str = "capacity") -> None:
    """Refuse a capacity outside the bounds.

    Raises
    ------
    InvalidInput
        With every violation.
    """
    violations = capacity_violations(capacity, field)
    if violations:
        raise InvalidInput(violations)


def check_hello(hello: agent_service_pb2.Hello) -> None:
    """Refuse a Hello whose name, labels, version, held attempts or capacity are out of
    bounds.

    Raises
    ------
    InvalidInput
        With every violation (the first few of a long list).
    """
    violations = agent_name_violations(hello.agent_name, "hello.agent_name")
    _text(hello.version, "hello.version", MAX_TEXT_LENGTH, violations)
    if len(hello.labels) > MAX_LABELS:
        violations.append(FieldViolation("hello.labels", f"must be at most {MAX_LABELS} labels"))
    else:
        for key, value in hello.labels.items():
            if not key or len(key) > MAX_LABEL_KEY_LENGTH:
                violations.append(
                    FieldViolation(
                        "hello.labels", f"keys must be 1-{MAX_LABEL_KEY_LENGTH} characters"
                    )
                )
                break
            if len(value) > MAX_LABEL_VALUE_LENGTH:
                violations.append(
                    FieldViolation(
                        f"hello.labels[{key}]",
                        f"must be at most {MAX_LABEL_VALUE_LENGTH} characters",
                    )
                )
    if len(hello.held) > MAX_HELD:
        violations.append(FieldViolation("hello.held", f"must be at most {MAX_HELD} attempts"))
    else:
        for i, held in enumerate(hello.held):
            if not held.run_id or len(held.run_id) > MAX_TEXT_LENGTH or held.attempt < 1:
                violations.append(
                    FieldViolation(f"hello.held[{i}]", "needs a run_id and an attempt >= 1")
                )
            elif held.last_seq < 0:
                violations.append(FieldViolation(f"hello.held[{i}].last_seq", "must be >= 0"))
    violations.extend(capacity_violations(hello.capacity, "hello.capacity"))
    if violations:
        raise InvalidInput(violations)
