"""InMemoryStore: the Store's interface and behaviour, in process memory.

For fast unit tests of the server. It keeps the same rows the database would (encoded
by :mod:`gyoza.server.store.rows`, so values round-trip exactly as they do through SQL)
and is held to the same contract tests. Every method runs to completion without
yielding in between, which makes each write atomic; a write that fails is undone.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from gyoza.models.errors import AlreadyExists, NotFound, RunNotFinished
from gyoza.models.op_definition import OpDefinition
from gyoza.models.op_run import OpRun
from gyoza.models.resources import TERMINAL_STATES, EventEntry, OpRunState, is_active_run
from gyoza.models.timestamps import utc_now
from gyoza.server.store import paging
from gyoza.server.store.records import (
    LOG_RETENTION,
    AgentDrain,
    LogRecord,
    RunFilter,
    TopicRecord,
)
from gyoza.server.store.rows import (
    ATTEMPT_COLUMNS,
    EVENT_COLUMNS,
    RUN_COLUMNS,
    RunWrite,
    definition_from_row,
    definition_payload,
    encode_json,
    encode_run,
    event_from_row,
    log_rows,
    run_from_rows,
    utc,
)

T = TypeVar("T")
Row = dict[str, Any]
_MISSING = object()


class _Undo:
    """Undo log of one write: restores every change when the write fails."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], None]] = []

    def set(self, table: dict[Any, Any], key: Any, value: Any) -> None:
        old = table.get(key, _MISSING)
        table[key] = value
        self._steps.append(lambda: _restore(table, key, old))

    def pop(self, table: dict[Any, Any], key: Any) -> None:
        old = table.pop(key, _MISSING)
        self._steps.append(lambda: _restore(table, key, old))

    def on_undo(self, step: Callable[[], None]) -> None:
        self._steps.append(step)

    def undo(self) -> None:
        for step in reversed(self._steps):
            step()
        self._steps.clear()


def _restore(table: dict[Any, Any], key: Any, old: Any) -> None:
    if old is _MISSING:
        table.pop(key, None)
    else:
        table[key] = old


class InMemoryStore:
    """A :class:`~gyoza.server.store.store.Store` that keeps everything in memory.

    Parameters
    ----------
    log_retention : int
        Log lines kept per attempt, the newest.
    """

    def __init__(self, *, log_retention: int = LOG_RETENTION) -> None:
        if log_retention < 1:
            raise ValueError("log_retention must be at least 1")
        self.log_retention = log_retention
        self._closed = False
        self._definitions: dict[tuple[str, int], Row] = {}
        self._last_versions: dict[str, int] = {}
        self._runs: dict[str, Row] = {}
        self._request_ids: dict[str, str] = {}
        self._attempts: dict[str, dict[int, Row]] = {}
        self._events: dict[str, dict[tuple[int, int], Row]] = {}
        self._log_lines: dict[tuple[str, int], int] = {}
        self._logs: dict[tuple[str, int], deque[LogRecord]] = {}
        # Indexed by offset - 1; a deleted run's records leave None (offsets stay).
        self._topic_log: list[TopicRecord | None] = []
        self._agents_seen: dict[str, datetime] = {}
        self._windows: dict[str, datetime] = {}
        self._drains: dict[str, AgentDrain] = {}

    @property
    def url(self) -> str:
        return "memory://"

    async def close(self) -> None:
        self._closed = True

    async def __aenter__(self) -> InMemoryStore:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def _enter(self) -> None:
        if self._closed:
            raise RuntimeError("the store is closed")
        # Let other tasks run, as a real store's await would.
        await asyncio.sleep(0)

    def _atomic(self, write: Callable[[_Undo], T]) -> T:
        undo = _Undo()
        try:
            return write(undo)
        except BaseException:
            undo.undo()
            raise

    # ------------------------------------------------------------------
    # Definitions
    # ------------------------------------------------------------------

    async def create_definition(self, d: OpDefinition) -> OpDefinition:
        await self._enter()
        created_at = utc_now()
        payload = definition_payload(d, 0, created_at)
        version = self._last_versions.get(d.name, 0) + 1
        self._last_versions[d.name] = version
        payload["version"] = version
        row = {
            "name": d.name,
            "version": version,
            "payload": encode_json(payload),
            "created_at": created_at,
        }
        self._definitions[(d.name, version)] = row
        return definition_from_row(row)

    async def get_definition(self, name: str, version: int | None = None) -> OpDefinition:
        await self._enter()
        if version is None:
            versions = [v for (n, v) in self._definitions if n == name]
            version = max(versions) if versions else None
        row = None if version is None else self._definitions.get((name, version))
        if row is None:
            which = "any version" if version is None else f"version {version}"
            raise NotFound(f"op definition {name!r} has no {which}")
        return definition_from_row(row)

    async def list_definitions(
        self, *, name: str | None = None, page_size: int = 50, page_token: str = ""
    ) -> tuple[list[OpDefinition], str]:
        paging.check_page_size(page_size)
        if name is None:
            after_name = paging.name_position(paging.decode_token(page_token, "defs", ""))
            await self._enter()
            latest: dict[str, int] = {}
            for n, v in self._definitions:
                if after_name is None or n > after_name:
                    latest[n] = max(v, latest.get(n, 0))
            keys = sorted(latest.items())[: page_size + 1]
            found = [definition_from_row(self._definitions[k]) for k in keys]
            page = found[:page_size]
            more = len(found) > page_size
            return page, paging.encode_token("defs", "", [page[-1].name]) if more else ""
        before = paging.version_position(paging.decode_token(page_token, "def_versions", name))
        await self._enter()
        versions = sorted(
            (v for (n, v) in self._definitions if n == name and (before is None or v < before)),
            reverse=True,
        )[: page_size + 1]
        found = [definition_from_row(self._definitions[(name, v)]) for v in versions]
        page = found[:page_size]
        more = len(found) > page_size
        return page, paging.encode_token("def_versions", name, [page[-1].version]) if more else ""

    async def delete_definition(self, name: str, version: int | None = None) -> int:
        await self._enter()
        keys = [(n, v) for (n, v) in self._definitions if n == name and version in (None, v)]
        if not keys:
            which = "any version" if version is None else f"version {version}"
            raise NotFound(f"op definition {name!r} has no {which}")
        for key in keys:
            del self._definitions[key]
        return len(keys)

    # ------------------------------------------------------------------
    # Runs
    # ------------------------------------------------------------------

    async def create_run(self, run: OpRun) -> OpRun:
        write = encode_run(run, [(a.attempt, e) for a in run.attempts for e in a.events], stamp=utc)
        await self._enter()
        if write.request_id is not None and write.request_id in self._request_ids:
            raise AlreadyExists(
                f"request id {write.request_id!r} was used already by run "
                f"{self._request_ids[write.request_id]}"
            )
        if write.run_id in self._runs:
            raise AlreadyExists(f"run {write.run_id} exists already")
        self._atomic(lambda undo: self._save(undo, write))
        return run

    async def get_run(self, run_id: str) -> OpRun:
        await self._enter()
        if run_id not in self._runs:
            raise NotFound(f"run {run_id} does not exist")
        return self._load(run_id, with_events=True)

    async def get_run_by_request_id(self, request_id: str) -> OpRun | None:
        await self._enter()
        run_id = self._request_ids.get(request_id)
        return None if run_id is None else self._load(run_id, with_events=True)

    async def list_runs(
        self, f: RunFilter, *, page_size: int = 50, page_token: str = ""
    ) -> tuple[list[OpRun], str]:
        paging.check_page_size(page_size)
        paging.check_run_filter(f)
        fingerprint = paging.run_filter_fingerprint(f)
        after = paging.run_position(paging.decode_token(page_token, "runs", fingerprint))
        await self._enter()
        states = {OpRunState(s).value for s in f.states}
        rows = [
            r
            for r in self._runs.values()
            if (not states or r["state"] in states)
            and (f.op_definition is None or r["op_definition"] == f.op_definition)
            and (f.image is None or r["image"] == f.image)
            and (f.created_after is None or r["created_at"] >= f.created_after)
            and (f.created_before is None or r["created_at"] < f.created_before)
            and (
                after is None
                or (
                    (r["created_at"], r["id"]) > after
                    if f.oldest_first
                    else (r["created_at"], r["id"]) < after
                )
            )
        ]
        rows.sort(key=lambda r: (r["created_at"], r["id"]), reverse=not f.oldest_first)
        found = [self._load(r["id"], with_events=False) for r in rows[: page_size + 1]]
        page = found[:page_size]
        token = ""
        if len(found) > page_size:
            last = page[-1]
            token = paging.encode_token("runs", fingerprint, [last.created_at.isoformat(), last.id])
        return page, token

    async def load_active_runs(self) -> list[OpRun]:
        await self._enter()
        rows = [
            r
            for r in self._runs.values()
            if is_active_run(OpRunState(r["state"]), r["next_retry_at"])
        ]
        rows.sort(key=lambda r: (r["created_at"], r["id"]))
        return [self._load(r["id"], with_events=True) for r in rows]

    async def record_agents_seen(self, seen: Mapping[str, datetime]) -> None:
        await self._enter()
        for name, when in seen.items():
            if name not in self._agents_seen or self._agents_seen[name] < when:
                self._agents_seen[name] = when

    async def open_reconnect_windows(
        self, fallback: Mapping[str, datetime], now: datetime
    ) -> dict[str, tuple[datetime, datetime]]:
        await self._enter()
        result = {}
        for name, default in fallback.items():
            last = self._agents_seen.setdefault(name, default)
            window = self._windows.get(name)
            if window is None or window < last:
                window = self._windows[name] = now
            result[name] = (last, window)
        return result

    async def agents_last_seen(self, names: Sequence[str]) -> dict[str, datetime]:
        await self._enter()
        return {n: self._agents_seen[n] for n in names if n in self._agents_seen}

    async def event_counts(self, run_ids: Sequence[str]) -> dict[str, int]:
        await self._enter()
        return {run_id: len(self._events[run_id]) for run_id in run_ids if self._events.get(run_id)}

    async def save_run(
        self, run: OpRun, new_events: Sequence[tuple[int, EventEntry]]
    ) -> list[TopicRecord]:
        write = encode_run(run, new_events, stamp=utc)
        await self._enter()
        return self._atomic(lambda undo: self._save(undo, write))

    async def save_run_with_logs(
        self,
        run: OpRun,
        new_events: Sequence[tuple[int, EventEntry]],
        attempt: int,
        lines: Sequence[tuple[str, str, datetime]],
    ) -> tuple[list[TopicRecord], int]:
        write = encode_run(run, new_events, stamp=utc)
        rows = log_rows(run.id, attempt, lines, stamp=utc)  # refuses a bad stream first
        await self._enter()

        def save(undo: _Undo) -> tuple[list[TopicRecord], int]:
            records = self._save(undo, write)
            if (run.id, attempt) not in self._log_lines:
                raise NotFound(f"run {run.id} has no attempt {attempt}")
            return records, self._append(run.id, attempt, rows)  # last: it cannot fail

        return self._atomic(save)

    async def save_runs(
        self, items: Sequence[tuple[OpRun, Sequence[tuple[int, EventEntry]]]]
    ) -> list[list[TopicRecord]]:
        writes = [encode_run(run, events, stamp=utc) for run, events in items]
        await self._enter()
        return self._atomic(lambda undo: [self._save(undo, w) for w in writes])

    async def list_events(
        self,
        run_id: str,
        *,
        attempt: int | None = None,
        after: tuple[int, int] = (0, 0),
        limit: int = 500,
    ) -> list[tuple[int, EventEntry]]:
        await self._enter()
        events = self._events.get(run_id, {})
        keys = sorted(k for k in events if k > after and attempt in (None, k[0]))[:limit]
        return [(key[0], event_from_row(events[key])) for key in keys]

    async def delete_run(self, run_id: str) -> None:
        await self._enter()
        row = self._runs.get(run_id)
        if row is None:
            raise NotFound(f"run {run_id} does not exist")
        if not _finished(row):
            waits = row["next_retry_at"] is not None
            raise RunNotFinished(
                f"run {run_id} is FAILED and waits for an automatic retry; only finished "
                "runs can be deleted"
                if waits
                else f"run {run_id} is {row['state']}; only COMPLETED, FAILED or CANCELLED "
                "runs can be deleted"
            )
        self._delete(run_id)

    async def delete_finished_before(
        self, before: datetime, *, limit: int = 100, exclude: Collection[str] = ()
    ) -> list[str]:
        await self._enter()
        old = sorted(
            (
                r
                for r in self._runs.values()
                if _finished(r) and r["updated_at"] < before and r["id"] not in exclude
            ),
            key=lambda r: r["updated_at"],
        )[:limit]
        for row in old:
            self._delete(row["id"])
        return [row["id"] for row in old]

    def _delete(self, run_id: str) -> None:
        row = self._runs.pop(run_id)
        if row["request_id"] is not None:
            self._request_ids.pop(row["request_id"], None)
        for attempt in self._attempts.pop(run_id, {}):
            self._log_lines.pop((run_id, attempt), None)
            self._logs.pop((run_id, attempt), None)
        self._events.pop(run_id, None)
        for index, record in enumerate(self._topic_log):
            if record is not None and record.run_id == run_id:
                self._topic_log[index] = None

    def _save(self, undo: _Undo, write: RunWrite) -> list[TopicRecord]:
        run_id = write.run_id
        owner = None if write.request_id is None else self._request_ids.get(write.request_id)
        if owner is not None and owner != run_id:
            raise AlreadyExists(f"request id {write.request_id!r} was used already by another run")
        old = self._runs.get(run_id)
        run_row = dict(zip(RUN_COLUMNS, write.run, strict=True))
        if old is not None:
            run_row["created_at"] = old["created_at"]
            if old["request_id"] is not None and old["request_id"] != write.request_id:
                undo.pop(self._request_ids, old["request_id"])
        undo.set(self._runs, run_id, run_row)
        if write.request_id is not None:
            undo.set(self._request_ids, write.request_id, run_id)
        attempts = self._attempts.setdefault(run_id, {})
        for values in write.attempts:
            row = stored = dict(zip(ATTEMPT_COLUMNS, values, strict=True))
            previous = attempts.get(row["attempt"])
            if previous is not None:
                stored["created_at"] = previous["created_at"]
            undo.set(attempts, row["attempt"], stored)
            if (run_id, row["attempt"]) not in self._log_lines:
                undo.set(self._log_lines, (run_id, row["attempt"]), 0)
        events = self._events.setdefault(run_id, {})
        for values in write.events:
            row = dict(zip(EVENT_COLUMNS, values, strict=True))
            key = (row["attempt"], row["seq"])
            if row["attempt"] not in attempts:
                raise ValueError(f"run {run_id}: a new event names an attempt the run lacks")
            if key in events:
                raise AlreadyExists(f"run {run_id}: event (attempt, seq) {key} is stored already")
            undo.set(events, key, row)
        records = []
        for record in write.topics:
            stored_record = dataclasses.replace(record, offset=len(self._topic_log) + 1)
            self._topic_log.append(stored_record)
            undo.on_undo(self._drop_newest_topic_record)
            records.append(_copy_record(stored_record))
        return records

    def _drop_newest_topic_record(self) -> None:
        self._topic_log.pop()

    def _load(self, run_id: str, *, with_events: bool) -> OpRun:
        row = self._runs[run_id]
        attempts = [self._attempts[run_id][n] for n in sorted(self._attempts.get(run_id, {}))]
        events: dict[int, list[EventEntry]] | None = None
        if with_events:
            events = {}
            stored = self._events.get(run_id, {})
            for key in sorted(stored):
                events.setdefault(key[0], []).append(event_from_row(stored[key]))
        return run_from_rows(row, attempts, events)

    # ------------------------------------------------------------------
    # Logs
    # ------------------------------------------------------------------

    async def append_logs(
        self, run_id: str, attempt: int, lines: Sequence[tuple[str, str, datetime]]
    ) -> int:
        rows = log_rows(run_id, attempt, lines, stamp=utc)
        await self._enter()
        if (run_id, attempt) not in self._log_lines:
            raise NotFound(f"run {run_id} has no attempt {attempt}")
        return self._append(run_id, attempt, rows)

    def _append(self, run_id: str, attempt: int, rows: Sequence[tuple[str, str, Any]]) -> int:
        key = (run_id, attempt)
        kept = self._logs.setdefault(key, deque(maxlen=self.log_retention))
        number = self._log_lines[key]
        for stream, text, t in rows:
            number += 1
            kept.append(LogRecord(number=number, text=text, stream=stream, t=t))
        self._log_lines[key] = number
        return number

    async def read_logs(
        self, run_id: str, attempt: int, *, after_line: int = 0, limit: int = 1000
    ) -> tuple[list[LogRecord], int]:
        await self._enter()
        kept = self._logs.get((run_id, attempt), deque())
        records = [r for r in kept if r.number > after_line][:limit]
        dropped = records[0].number - after_line - 1 if records else 0
        return records, max(dropped, 0)

    # ------------------------------------------------------------------
    # Topic log
    # ------------------------------------------------------------------

    async def read_topic(
        self, topic: str, *, after_offset: int = 0, limit: int = 500
    ) -> list[TopicRecord]:
        await self._enter()
        found = [
            _copy_record(r)
            for r in self._topic_log[max(after_offset, 0) :]
            if r is not None and r.topic == topic
        ]
        return found[:limit]

    async def latest_offset(self) -> int:
        await self._enter()
        return len(self._topic_log)

    # ------------------------------------------------------------------
    # Agent drains
    # ------------------------------------------------------------------

    async def list_drains(self) -> list[AgentDrain]:
        await self._enter()
        return [self._drains[name] for name in sorted(self._drains)]

    async def set_drain(self, drain: AgentDrain) -> None:
        await self._enter()
        self._drains[drain.name] = drain

    async def clear_drain(self, name: str) -> bool:
        await self._enter()
        return self._drains.pop(name, None) is not None


def _finished(row: Row) -> bool:
    return row["state"] in {s.value for s in TERMINAL_STATES} and row["next_retry_at"] is None


def _copy_record(record: TopicRecord) -> TopicRecord:
    """A record the caller may change without changing the log."""
    event = EventEntry.from_dict(record.event.to_dict())
    return dataclasses.replace(record, event=event, attributes=dict(record.attributes))
