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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gyoza.models.op_attempt import OpAttempt
from gyoza.models.op_definition import OpDefinition
from gyoza.models.op_run import OpRun
from gyoza.models.outputs import OutputSpec
from gyoza.models.resources import (
    Constraints,
    EventDelivery,
    EventEntry,
    ExecutionSummary,
    OpRunState,
    RetryPolicy,
)
from gyoza.models.timestamps import parse_timestamp
from gyoza.server.store.records import LOG_STREAMS, LogRecord, TopicRecord
from gyoza.server.store.tables import op_attempts, op_events, op_runs, topic_log

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


dumps: Callable[[Any], str] = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, separators=(",", ":")
).encode
"""Compact JSON text of a value; NaN and infinities are refused (no database stores
them). One encoder for every call: ``json.dumps`` with options builds one per call."""


def encode_json(value: Any) -> EncodedJSON:
    """Serialise *value* (see :func:`dumps`)."""
    return EncodedJSON(dumps(value))


def json_serializer(value: Any) -> str:
    """The engines' JSON serialiser: passes :class:`EncodedJSON` through."""
    if isinstance(value, EncodedJSON):
        return value.text
    return dumps(value)


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

Stamp = Callable[[datetime], Any]
"""How a write stores a timestamp: :func:`utc` (an aware datetime) for PostgreSQL and
the in-memory store, :func:`sqlite_stamp` (text) for SQLite."""

# Column order of the tuples a RunWrite holds (the tables' order; an attempt row
# without log_lines, which only append_logs writes).
RUN_COLUMNS = tuple(c.name for c in op_runs.columns)
ATTEMPT_COLUMNS = tuple(c.name for c in op_attempts.columns if c.name != "log_lines")
EVENT_COLUMNS = tuple(c.name for c in op_events.columns)
TOPIC_COLUMNS = tuple(c.name for c in topic_log.columns if c.name != "offset")
LOG_COLUMNS = ("stream", "text", "t")
"""A log row, before the writer gives it its run, attempt and number."""


_STAMPS: dict[datetime, str] = {}
_STAMPS_KEPT = 4096


def sqlite_stamp(value: datetime) -> str:
    """*value* as SQLite keeps it: naive UTC text, as SQLAlchemy's DateTime writes it.

    Remembered (a run's creation and start times are written with every save): equal
    aware datetimes are one instant, which has one text.
    """
    text = _STAMPS.get(value)
    if text is None:
        if value.tzinfo is not UTC:
            value = utc(value)
        # "YYYY-MM-DD HH:MM:SS.ffffff" and the "+00:00" cut off.
        text = value.isoformat(" ", "microseconds")[:26]
        if len(_STAMPS) >= _STAMPS_KEPT:
            _STAMPS.clear()
        _STAMPS[value] = text
    return text


class JsonMemo:
    """The JSON last written of each run's documents, to skip encoding them again.

    Keyed by (run id, document); a document is encoded again when it compares unequal
    to the one remembered (``==``: a change between equal values of different types,
    as 1 to 1.0, would not be seen; the documents given are ``to_dict()`` results,
    whose types the domain fixes). Used by one thread; forgets everything when full.
    """

    def __init__(self, size: int = 50_000) -> None:
        self._size = size
        self._docs: dict[tuple[str, str], tuple[Any, str]] = {}

    def dumps(self, run_id: str, name: str, value: Any) -> str:
        key = (run_id, name)
        hit = self._docs.get(key)
        if hit is not None and hit[0] == value:
            return hit[1]
        text = dumps(value)
        if len(self._docs) >= self._size:
            self._docs.clear()
        self._docs[key] = (value, text)
        return text


def _optional(stamp: Stamp, value: datetime | None) -> Any:
    return None if value is None else stamp(value)


@dataclass
class RunWrite:
    """Everything one save of a run writes, encoded: tuples in the ``*_COLUMNS`` order,
    JSON as text, timestamps as *stamp* made them.

    ``topics`` holds one record per topic row, its ``offset`` still 0: the repository
    returns copies with the offsets the database assigned.
    """

    run_id: str
    request_id: str | None
    stamp: Stamp
    run: tuple[Any, ...]
    attempts: list[tuple[Any, ...]]
    events: list[tuple[Any, ...]]
    topic_rows: list[tuple[Any, ...]] = field(default_factory=list)
    topics: list[TopicRecord] = field(default_factory=list)


def encode_run(
    run: OpRun,
    new_events: Iterable[tuple[int, EventEntry]],
    *,
    stamp: Stamp,
    memo: JsonMemo | None = None,
) -> RunWrite:
    """Snapshot a run, every attempt of it, and the events that are new.

    *memo* (fresh documents of the run, its settings and attempt summaries, are
    compared with the last ones encoded instead of being encoded again) must be used
    by one thread only.
    """
    if memo is None:
        memo = JsonMemo()
    run_id = run.id
    events = []
    encoded = []
    for attempt, entry in new_events:
        row, payload = event_row(run_id, attempt, entry, stamp)
        events.append(row)
        encoded.append((attempt, entry, payload))
    write = RunWrite(
        run_id=run_id,
        request_id=run.request_id,
        stamp=stamp,
        run=run_row(run, stamp, memo),
        attempts=[attempt_row(run, a, stamp, memo) for a in run.attempts],
        events=events,
    )
    topic = run.event_delivery.topic
    if topic:
        attributes = dict(run.event_delivery.attributes)
        attributes_json = dumps(attributes)
        state = OpRunState(run.state)
        definition = run.op_definition
        for attempt, entry, payload in encoded:
            t = utc(entry.t)
            applied = None if entry.applied_at is None else utc(entry.applied_at)
            applied_json = "" if applied is None else f',"applied_at":{dumps(applied.isoformat())}'
            event_json = (
                f'{{"seq":{entry.seq},"t":{dumps(t.isoformat())},"type":{dumps(entry.type)},'
                f'"msg":{dumps(entry.msg)},"payload":{payload}{applied_json}}}'
            )
            write.topic_rows.append(
                (
                    topic,
                    run_id,
                    attempt,
                    entry.seq,
                    entry.type,
                    event_json,
                    attributes_json,
                    state.value,
                    definition,
                    stamp(t),
                )
            )
            event = EventEntry(
                t=t,
                type=entry.type,
                msg=entry.msg,
                payload=json.loads(payload),
                seq=entry.seq,
                applied_at=applied,
            )
            write.topics.append(
                TopicRecord(
                    offset=0,
                    topic=topic,
                    run_id=run_id,
                    attempt=attempt,
                    event=event,
                    attributes=dict(attributes),
                    run_state=state,
                    op_definition=definition,
                )
            )
    return write


def run_row(run: OpRun, stamp: Stamp, memo: JsonMemo) -> tuple[Any, ...]:
    """The op_runs row of *run*, in :data:`RUN_COLUMNS` order."""
    run_id = run.id
    return (
        run_id,
        OpRunState(run.state).value,
        run.priority,
        run.image,
        dumps(run.inputs),
        memo.dumps(run_id, "constraints", run.constraints.to_dict()),
        memo.dumps(run_id, "retry_policy", run.retry_policy.to_dict()),
        memo.dumps(run_id, "event_delivery", run.event_delivery.to_dict()),
        run.op_definition,
        run.op_definition_version,
        run.request_id,
        bool(run.cancel_requested),
        _optional(stamp, run.next_retry_at),
        run.current_attempt,
        stamp(run.created_at),
        stamp(run.updated_at),
        # Never changes once the run exists: encoded once per run, not per save.
        memo.dumps(run_id, "output_specs", [s.to_dict() for s in run.output_specs])
        if run.output_specs
        else None,
    )


def attempt_row(run: OpRun, attempt: OpAttempt, stamp: Stamp, memo: JsonMemo) -> tuple[Any, ...]:
    """The op_attempts row of *attempt*, in :data:`ATTEMPT_COLUMNS` order."""
    return (
        run.id,
        attempt.attempt,
        OpRunState(attempt.state).value,
        attempt.progress,
        dumps(attempt.outputs),
        memo.dumps(run.id, f"summary {attempt.attempt}", attempt.execution_summary.to_dict()),
        # Stored only when they differ from the run's (they are copies of them).
        None if attempt.inputs == run.inputs else dumps(attempt.inputs),
        None if attempt.constraints == run.constraints else dumps(attempt.constraints.to_dict()),
        attempt.reported_seq,
        stamp(attempt.created_at),
        _optional(stamp, attempt.started_at),
        _optional(stamp, attempt.finished_at),
    )


def event_row(
    run_id: str, attempt: int, event: EventEntry, stamp: Stamp
) -> tuple[tuple[Any, ...], str]:
    """The op_events row of *event* (:data:`EVENT_COLUMNS` order), and its payload JSON."""
    if event.seq < 1:
        raise ValueError(f"event {event.type} of run {run_id} has no seq")
    msg = event.msg
    is_int = isinstance(msg, int) and not isinstance(msg, bool)
    payload = dumps(event.payload)
    row = (
        run_id,
        attempt,
        event.seq,
        event.type,
        str(msg),
        msg if is_int else None,
        payload,
        stamp(event.t),
        _optional(stamp, event.applied_at),
    )
    return row, payload


def event_from_row(row: Row) -> EventEntry:
    msg_int = row["msg_int"]
    return EventEntry(
        t=row["t"],
        type=row["type"],
        msg=str(row["msg"]) if msg_int is None else int(msg_int),
        payload=decode_json(row["payload"]),
        seq=int(row["seq"]),
        applied_at=row["applied_at"],
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
        output_specs=[
            OutputSpec.from_dict(spec) for spec in decode_json(row["output_specs"] or "[]")
        ],
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


# ----------------------------------------------------------------------
# Topic log and logs
# ----------------------------------------------------------------------


def topic_record_from_row(row: Row) -> TopicRecord:
    return topic_record(
        row["offset"],
        row["topic"],
        row["run_id"],
        row["attempt"],
        row["event"],
        row["attributes"],
        row["run_state"],
        row["op_definition"],
    )


def topic_record(
    offset: int,
    topic: str,
    run_id: str,
    attempt: int,
    event_json: Any,
    attributes_json: Any,
    run_state: str,
    op_definition: str | None,
) -> TopicRecord:
    """A topic record from its columns (JSON as text or as decoded by the driver)."""
    data = decode_json(event_json)
    payload = data.get("payload")
    msg = data.get("msg")
    seq = data.get("seq")
    applied = data.get("applied_at")
    return TopicRecord(
        offset=int(offset),
        topic=str(topic),
        run_id=str(run_id),
        attempt=int(attempt),
        # *data* is a fresh object: its payload needs no copy.
        event=EventEntry(
            t=parse_timestamp(data["t"]),
            type=str(data["type"]),
            msg="" if msg is None else msg,
            payload={} if payload is None else payload,
            seq=0 if seq is None else int(seq),
            applied_at=None if applied is None else parse_timestamp(applied),
        ),
        attributes={str(k): str(v) for k, v in decode_json(attributes_json).items()},
        run_state=OpRunState(run_state),
        op_definition=op_definition,
    )


def log_rows(
    run_id: str, attempt: int, lines: Sequence[tuple[str, str, datetime]], *, stamp: Stamp
) -> list[tuple[str, str, Any]]:
    """(stream, text, t) rows of new log lines of *run_id*'s *attempt* (the writer
    numbers them).

    PostgreSQL text cannot hold NUL characters: they become U+FFFD on both databases.
    """
    rows = []
    for text, stream, t in lines:
        if stream not in LOG_STREAMS:
            raise ValueError(f"log stream must be stdout or stderr, not {stream!r}")
        text = str(text)
        if "\x00" in text:
            text = text.replace("\x00", "\ufffd")
        rows.append((stream, text, stamp(t)))
    return rows


def log_record_from_row(row: Row) -> LogRecord:
    return LogRecord(
        number=int(row["number"]), text=str(row["text"]), stream=str(row["stream"]), t=row["t"]
    )
