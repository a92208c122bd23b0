"""Domain objects to table rows and back.

Writes are encoded on the caller's thread, before they are queued: the writer thread
then works on a snapshot (plain dicts, JSON already serialised) and never reads a run
that the event loop may be changing meanwhile. JSON values are serialised once, here,
and handed to the driver as :class:`EncodedJSON`, which :func:`json_serializer` passes
through.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gyoza.models.op_attempt import OpAttempt
from gyoza.models.op_definition import OpDefinition
from gyoza.models.op_run import OpRun
from gyoza.models.resources import (
    Constraints,
    EventDelivery,
    EventEntry,
    ExecutionSummary,
    OpRunState,
    RetryPolicy,
)
from gyoza.server.store.records import LOG_STREAMS, LogRecord, TopicRecord

# A row: a dict, or what SQLAlchemy's .mappings() gives.
Row = Mapping[Any, Any]


class EncodedJSON:
    """A JSON document serialised already (the driver stores its text as it is)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"EncodedJSON({self.text!r})"

    def decode(self) -> Any:
        return json.loads(self.text)


def encode_json(value: Any) -> EncodedJSON:
    """Serialise *value*; NaN and infinities are refused (no database stores them)."""
    return EncodedJSON(json.dumps(value, ensure_ascii=False, allow_nan=False))


def json_serializer(value: Any) -> str:
    """The engines' JSON serialiser: passes :class:`EncodedJSON` through."""
    if isinstance(value, EncodedJSON):
        return value.text
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def decode_json(value: Any) -> Any:
    """A JSON column's value as Python objects (drivers may give text or objects)."""
    if isinstance(value, EncodedJSON):
        return value.decode()
    if isinstance(value, str | bytes):
        return json.loads(value)
    return value


def utc(value: datetime) -> datetime:
    """*value* in UTC; naive datetimes are refused, as the domain never makes them."""
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: the store takes aware datetimes only")
    return value.astimezone(UTC)


def optional_utc(value: datetime | None) -> datetime | None:
    return None if value is None else utc(value)


# ----------------------------------------------------------------------
# Definitions
# ----------------------------------------------------------------------


def definition_payload(
    definition: OpDefinition, version: int, created_at: datetime
) -> dict[str, Any]:
    """The stored document of a definition with its assigned version and time."""
    payload = definition.to_dict()
    payload["version"] = version
    payload["createdAt"] = utc(created_at).isoformat()
    return payload


def definition_from_row(row: Row) -> OpDefinition:
    definition = OpDefinition.from_dict(decode_json(row["payload"]))
    definition.version = int(row["version"])
    definition.created_at = row["created_at"]
    return definition


# ----------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------


@dataclass
class RunWrite:
    """Everything one save of a run writes, encoded.

    ``topics`` holds one record per topic row, its ``offset`` still 0: the repository
    returns copies with the offsets the database assigned.
    """

    run_id: str
    request_id: str | None
    run: dict[str, Any]
    attempts: list[dict[str, Any]]
    events: list[dict[str, Any]]
    topic_rows: list[dict[str, Any]] = field(default_factory=list)
    topics: list[TopicRecord] = field(default_factory=list)


def encode_run(run: OpRun, new_events: Iterable[tuple[int, EventEntry]]) -> RunWrite:
    """Snapshot a run, every attempt of it, and the events that are new."""
    new = list(new_events)
    write = RunWrite(
        run_id=run.id,
        request_id=run.request_id,
        run=run_row(run),
        attempts=[attempt_row(run, a) for a in run.attempts],
        events=[event_row(run.id, attempt, e) for attempt, e in new],
    )
    topic = run.event_delivery.topic
    if topic:
        attributes = dict(run.event_delivery.attributes)
        attributes_json = encode_json(attributes)
        for attempt, entry in new:
            event = _copy_event(entry)
            write.topic_rows.append(
                {
                    "topic": topic,
                    "run_id": run.id,
                    "attempt": attempt,
                    "seq": event.seq,
                    "type": event.type,
                    "event": encode_json(event.to_dict()),
                    "attributes": attributes_json,
                    "run_state": run.state.value,
                    "op_definition": run.op_definition,
                    "t": utc(event.t),
                }
            )
            write.topics.append(
                TopicRecord(
                    offset=0,
                    topic=topic,
                    run_id=run.id,
                    attempt=attempt,
                    event=event,
                    attributes=dict(attributes),
                    run_state=run.state,
                    op_definition=run.op_definition,
                )
            )
    return write


def run_row(run: OpRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "state": OpRunState(run.state).value,
        "priority": run.priority,
        "image": run.image,
        "inputs": encode_json(run.inputs),
        "constraints": encode_json(run.constraints.to_dict()),
        "retry_policy": encode_json(run.retry_policy.to_dict()),
        "event_delivery": encode_json(run.event_delivery.to_dict()),
        "op_definition": run.op_definition,
        "op_definition_version": run.op_definition_version,
        "request_id": run.request_id,
        "cancel_requested": bool(run.cancel_requested),
        "next_retry_at": optional_utc(run.next_retry_at),
        "current_attempt": run.current_attempt,
        "created_at": utc(run.created_at),
        "updated_at": utc(run.updated_at),
    }


def attempt_row(run: OpRun, attempt: OpAttempt) -> dict[str, Any]:
    return {
        "run_id": run.id,
        "attempt": attempt.attempt,
        "state": OpRunState(attempt.state).value,
        "progress": attempt.progress,
        "outputs": encode_json(attempt.outputs),
        "execution_summary": encode_json(attempt.execution_summary.to_dict()),
        # Stored only when they differ from the run's (they are copies of them).
        "inputs": None if attempt.inputs == run.inputs else encode_json(attempt.inputs),
        "constraints": (
            None
            if attempt.constraints == run.constraints
            else encode_json(attempt.constraints.to_dict())
        ),
        "reported_seq": attempt.reported_seq,
        "created_at": utc(attempt.created_at),
        "started_at": optional_utc(attempt.started_at),
        "finished_at": optional_utc(attempt.finished_at),
    }


def event_row(run_id: str, attempt: int, event: EventEntry) -> dict[str, Any]:
    if event.seq < 1:
        raise ValueError(f"event {event.type} of run {run_id} has no seq")
    msg = event.msg
    is_int = isinstance(msg, int) and not isinstance(msg, bool)
    return {
        "run_id": run_id,
        "attempt": attempt,
        "seq": event.seq,
        "type": event.type,
        "msg": str(msg),
        "msg_int": msg if is_int else None,
        "payload": encode_json(event.payload),
        "t": utc(event.t),
    }


def event_from_row(row: Row) -> EventEntry:
    msg_int = row["msg_int"]
    return EventEntry(
        t=row["t"],
        type=row["type"],
        msg=str(row["msg"]) if msg_int is None else int(msg_int),
        payload=decode_json(row["payload"]),
        seq=int(row["seq"]),
    )


def run_from_rows(
    row: Row,
    attempts: Sequence[Row],
    events: Mapping[int, list[EventEntry]] | None = None,
) -> OpRun:
    """Rebuild a run; *events* by attempt number (``None``: leave them empty)."""
    inputs = decode_json(row["inputs"])
    constraints = Constraints.from_dict(decode_json(row["constraints"]))
    run_id = str(row["id"])
    built = [
        _attempt_from_row(
            run_id,
            a,
            inputs,
            constraints,
            [] if events is None else events.get(int(a["attempt"]), []),
        )
        for a in attempts
    ]
    return OpRun.rehydrate(
        id=run_id,
        state=OpRunState(row["state"]),
        priority=int(row["priority"]),
        image=str(row["image"]),
        attempts=built,
        inputs=inputs,
        constraints=constraints,
        retry_policy=RetryPolicy.from_dict(decode_json(row["retry_policy"])),
        event_delivery=EventDelivery.from_dict(decode_json(row["event_delivery"])),
        op_definition=row["op_definition"],
        op_definition_version=(
            None if row["op_definition_version"] is None else int(row["op_definition_version"])
        ),
        cancel_requested=bool(row["cancel_requested"]),
        next_retry_at=row["next_retry_at"],
        request_id=row["request_id"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _attempt_from_row(
    run_id: str,
    row: Row,
    run_inputs: dict[str, Any],
    run_constraints: Constraints,
    events: list[EventEntry],
) -> OpAttempt:
    number = int(row["attempt"])
    inputs = row["inputs"]
    constraints = row["constraints"]
    return OpAttempt(
        id=f"{run_id}_att_{number}",
        op_run_id=run_id,
        attempt=number,
        state=OpRunState(row["state"]),
        progress=int(row["progress"]),
        events=events,
        inputs=copy.deepcopy(run_inputs) if inputs is None else decode_json(inputs),
        outputs=decode_json(row["outputs"]),
        execution_summary=ExecutionSummary.from_dict(decode_json(row["execution_summary"])),
        constraints=(
            copy.deepcopy(run_constraints)
            if constraints is None
            else Constraints.from_dict(decode_json(constraints))
        ),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        reported_seq=int(row["reported_seq"]),
        created_at=row["created_at"],
    )


def group_events(rows: Iterable[Row]) -> dict[tuple[str, int], list[EventEntry]]:
    """Events by (run id, attempt), in the order given."""
    grouped: dict[tuple[str, int], list[EventEntry]] = {}
    for row in rows:
        grouped.setdefault((str(row["run_id"]), int(row["attempt"])), []).append(
            event_from_row(row)
        )
    return grouped


def _copy_event(event: EventEntry) -> EventEntry:
    return EventEntry(
        t=utc(event.t),
        type=event.type,
        msg=event.msg,
        payload=copy.deepcopy(event.payload),
        seq=event.seq,
    )


# ----------------------------------------------------------------------
# Topic log and logs
# ----------------------------------------------------------------------


def topic_record_from_row(row: Row) -> TopicRecord:
    event_data = decode_json(row["event"])
    return TopicRecord(
        offset=int(row["offset"]),
        topic=str(row["topic"]),
        run_id=str(row["run_id"]),
        attempt=int(row["attempt"]),
        event=EventEntry.from_dict(event_data),
        attributes={str(k): str(v) for k, v in decode_json(row["attributes"]).items()},
        run_state=OpRunState(row["run_state"]),
        op_definition=row["op_definition"],
    )


def log_rows(
    run_id: str, attempt: int, lines: Sequence[tuple[str, str, datetime]]
) -> list[dict[str, Any]]:
    """Rows of new log lines, not numbered yet (the writer numbers them).

    PostgreSQL text cannot hold NUL characters: they become U+FFFD on both databases.
    """
    rows = []
    for text, stream, t in lines:
        if stream not in LOG_STREAMS:
            raise ValueError(f"log stream must be stdout or stderr, not {stream!r}")
        rows.append(
            {
                "run_id": run_id,
                "attempt": attempt,
                "stream": stream,
                "text": str(text).replace("\x00", "\ufffd"),
                "t": utc(t),
            }
        )
    return rows


def log_record_from_row(row: Row) -> LogRecord:
    return LogRecord(
        number=int(row["number"]), text=str(row["text"]), stream=str(row["stream"]), t=row["t"]
    )
