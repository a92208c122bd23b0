"""The docker executor: one container per attempt.

Lifecycle of an attempt::

    start()  image present? else pull ─ fail → FAILED IMAGE_MISSING
             write inputs, create the container (labels, limits, GPUs, mounts)
             start it ─ fail → remove it, FAILED EXECUTOR_ERROR
             STARTED
    follow   read its output from the log stream: marked lines → events,
             other lines → logs (batched for a few ms)
             past timeout_s → stop it (→ TIMEOUT); cancel() → stop it (→ CANCELLED)
    end      exit 0 + valid or no outputs.json → COMPLETED · exit 0 + bad outputs.json → OUTPUT_INVALID
             OOM-killed → OOM · other exit → EXIT_CODE with the last output lines
             once the terminal report is in the outbox: remove the container and files

Resume cursor (:attr:`ReportSink.cursor`): ``0`` until STARTED is stored, then
``1 + number of output lines consumed``. An agent that restarts adopts the container
found by its labels, reads its output again from the start and skips the lines the
cursor covers, so no line and no event is reported twice. Output lines are counted over
both streams in the order Docker's log holds them, which is the same on every read.

Every Docker call blocks, so each runs in this executor's thread pool; following a
container's output holds a thread of its own for the container's life.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors

from gyoza.agent.docker.contract import (
    LABEL_AGENT,
    LABEL_ATTEMPT,
    LABEL_RUN_ID,
    AttemptFiles,
    create_kwargs,
)
from gyoza.agent.docker.follow import LogReader, ReadItem
from gyoza.agent.docker.images import ImageUnavailable, ensure_image
from gyoza.agent.docker.reporting import STARTED_CURSOR, OutputReporter
from gyoza.agent.executor import Assignment, Executor, ReportSink
from gyoza.models.reports import ReportedEvent
from gyoza.models.resources import EventType, FailureClass

log = logging.getLogger(__name__)

T = TypeVar("T")


_DOCKER_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


class _StopReason(Enum):
    CANCEL = "cancel"
    TIMEOUT = "timeout"


@dataclass(eq=False)
class _Attempt:
    """What the executor knows about one attempt it holds."""

    assignment: Assignment
    sink: ReportSink
    files: AttemptFiles
    container_id: str | None = None
    started: bool = False
    stop_reason: _StopReason | None = None
    stop_message: str = ""
    reader: LogReader | None = None
    task: asyncio.Task[None] | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)


def _ended(
    kind: EventType,
    message: str,
    *,
    outputs: dict[str, Any] | None = None,
    failure_class: FailureClass | None = None,
    exit_code: int | None = None,
    duration_ms: int = 0,
) -> ReportedEvent:
    """The terminal event of an attempt; a failure's message is its error message."""
    return ReportedEvent(
        kind,
        message,
        outputs=outputs,
        failure_class=failure_class,
        exit_code=exit_code,
        error_message="" if kind is EventType.COMPLETED else message,
        duration_ms=duration_ms,
    )


class DockerExecutor(Executor):
    """Runs each attempt in its own container on the local Docker engine.

    Parameters
    ----------
    state_dir : Path
        The agent's state directory; each attempt's inputs and outputs live in
        ``state_dir/attempts/<run>.<attempt>/`` (bind-mounted, so the path must be the
        Docker host's).
    agent_name : str
        This agent's name: the ``gyoza.agent`` label and the worker id in STARTED.
    network : str
        Containers' ``network_mode``; ``"none"`` unless ops need a network.
    stop_grace_s : float
        Time between TERM and KILL when an attempt is cancelled or times out (whole
        seconds; Docker rounds up).
    client : docker.DockerClient | None
        Client to use (not closed by :meth:`close`); by default one from the
        environment, made on first use.
    pull_stall_timeout_s : float
        A pull fails once the daemon has sent nothing for this long.
    log_flush_s : float
        Least time between two log reports of an attempt: a line goes out at once after
        a quiet spell, and waits at most this long in a burst.
    log_batch_lines : int
        Most log lines in one report.
    on_created : Callable[[str], Awaitable[None]] | None
        Awaited with the container id after a container is created and before it is
        started (inspection, tests).
    """

    name = "docker"

    def __init__(
        self,
        state_dir: Path,
        agent_name: str,
        network: str = "none",
        stop_grace_s: float = 10,
        client: docker.DockerClient | None = None,
        *,
        pull_stall_timeout_s: float = 120.0,
        log_flush_s: float = 0.05,
        log_batch_lines: int = 500,
        on_created: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._state_dir = Path(state_dir)
        self._agent_name = agent_name
        self._network = network
        self._stop_grace_s = stop_grace_s
        self._client = client
        self._owns_client = client is None
        self._api_client: Any = client.api if client is not None else None
        self._client_lock = asyncio.Lock()
        self._pull_stall_timeout_s = pull_stall_timeout_s
        self._log_flush_s = log_flush_s
        self._log_batch_lines = log_batch_lines
        self._log_batch_bytes = 256 * 1024
        self._on_created = on_created
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="gyoza-docker")
        self._attempts: dict[tuple[str, int], _Attempt] = {}
        self._background: set[asyncio.Task[None]] = set()

    # -- Executor -----------------------------------------------------------------------

    async def start(self, assignment: Assignment, sink: ReportSink) -> None:
        key = assignment.key
        if key in self._attempts:
            log.info("attempt %s/%d is already held; start ignored", *key)
            return
        attempt = _Attempt(assignment, sink, self.attempt_files(*key))
        self._attempts[key] = attempt
        try:
            await self._start(attempt, time.monotonic())
        finally:
            if attempt.task is None:  # it ended before it was followed
                self._forget(attempt)

    async def cancel(self, run_id: str, attempt: int, reason: str) -> None:
        held = self._attempts.get((run_id, attempt))
        if held is None:
            return
        if held.stop_reason is None:
            held.stop_reason = _StopReason.CANCEL
            held.stop_message = reason
        if held.started:
            await self._stop(held)
        # Not started yet: start() sees the reason before it starts the container.
        await held.ended.wait()

    async def adopt(self, assignment: Assignment, sink: ReportSink) -> bool:
        key = assignment.key
        if key in self._attempts:
            return True
        api = await self._api()
        filters = {
            "label": [
                f"{LABEL_RUN_ID}={assignment.run_id}",
                f"{LABEL_ATTEMPT}={assignment.attempt}",
                f"{LABEL_AGENT}={self._agent_name}",
            ]
        }
        found = await self._call(api.containers, all=True, filters=filters)
        if not found:
            return False
        container_id = str(found[0]["Id"])
        attempt = _Attempt(assignment, sink, self.attempt_files(*key), container_id)
        self._attempts[key] = attempt
        try:
            state = (await self._call(api.inspect_container, container_id))["State"]
            if state.get("Status") == "created":
                # The agent died between creating and starting it.
                await self._call(api.start, container_id)
                state = (await self._call(api.inspect_container, container_id))["State"]
            attempt.started = True
            cursor = sink.cursor
            if cursor < STARTED_CURSOR:
                await sink.event(
                    ReportedEvent(
                        EventType.STARTED,
                        "container started",
                        payload=self._started_payload(attempt, pulled=False),
                    ),
                    cursor=STARTED_CURSOR,
                )
                cursor = STARTED_CURSOR
        except BaseException:
            self._forget(attempt)
            raise
        log.info(
            "adopted %s/%d: container %s is %s; resuming after %d output lines",
            *key,
            container_id[:12],
            state.get("Status"),
            cursor - STARTED_CURSOR,
        )
        # A container that exited while the agent was down ended by itself: its time
        # limit no longer applies.
        timeout_from = _parse_docker_time(state.get("StartedAt")) if state.get("Running") else None
        attempt.task = asyncio.create_task(
            self._follow(attempt, cursor - STARTED_CURSOR, timeout_from)
        )
        return True

    async def close(self) -> None:
        """Stop following; containers keep running and are adopted on the next start."""
        attempts = list(self._attempts.values())
        for attempt in attempts:
            if attempt.reader is not None:
                attempt.reader.close()
        tasks = [a.task for a in attempts if a.task is not None] + list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for attempt in attempts:
            attempt.ended.set()  # nothing more happens to it in this process
        self._attempts.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._owns_client and self._client is not None:
            self._client.close()

    async def __aenter__(self) -> DockerExecutor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- extras for the agent ---------------------------------------------------------------

    @property
    def held(self) -> list[tuple[str, int]]:
        """The ``(run_id, attempt)`` of every attempt this executor is running."""
        return list(self._attempts)

    async def join(self, run_id: str, attempt: int) -> None:
        """Wait until the attempt is over: its terminal report stored and its container
        removed. Returns at once when the attempt is not held."""
        held = self._attempts.get((run_id, attempt))
        if held is not None:
            await held.ended.wait()

    def attempt_files(self, run_id: str, attempt: int) -> AttemptFiles:
        """The host folder of an attempt (inputs.json, outputs/)."""
        return AttemptFiles.under(self._state_dir, run_id, attempt)

    async def prune(self, keep: Collection[tuple[str, int]]) -> list[tuple[str, int]]:
        """Remove this agent's containers (and their files) of attempts that are neither
        in ``keep`` nor held; return their ``(run_id, attempt)``.

        For after a restart: a container whose terminal report was stored just before
        the agent died is otherwise never removed.
        """
        api = await self._api()
        found = await self._call(
            api.containers, all=True, filters={"label": f"{LABEL_AGENT}={self._agent_name}"}
        )
        removed: list[tuple[str, int]] = []
        for container in found:
            container_labels = container.get("Labels") or {}
            try:
                key = (container_labels[LABEL_RUN_ID], int(container_labels[LABEL_ATTEMPT]))
            except (KeyError, ValueError):
                continue
            if key in keep or key in self._attempts:
                continue
            await self._remove_container(str(container["Id"]))
            await self._call(self.attempt_files(*key).remove)
            removed.append(key)
        return removed

    # -- starting ---------------------------------------------------------------------------

    async def _start(self, attempt: _Attempt, began: float) -> None:
        assignment = attempt.assignment
        api = await self._api()

        async def end(kind: EventType, failure: FailureClass, message: str) -> None:
            if attempt.container_id is not None:
                await self._remove_container(attempt.container_id)
            await self._call(attempt.files.remove)
            await self._report_end(
                attempt,
                _ended(kind, message, failure_class=failure, duration_ms=_ms_since(began)),
                cursor=None,
            )

        try:
            pulled = await self._call(
                ensure_image, api, assignment.image, stall_timeout_s=self._pull_stall_timeout_s
            )
        except ImageUnavailable as exc:
            return await end(EventType.FAILED, FailureClass.IMAGE_MISSING, str(exc))
        except docker.errors.DockerException as exc:
            return await end(EventType.FAILED, FailureClass.EXECUTOR_ERROR, f"image: {exc}")
        if attempt.stop_reason is not None:
            return await end(EventType.CANCELLED, FailureClass.CANCELLED, attempt.stop_message)
        try:
            inputs_json = json.dumps(assignment.inputs, allow_nan=False)
            await self._call(attempt.files.prepare, inputs_json)
            kwargs = create_kwargs(
                api,
                assignment,
                agent_name=self._agent_name,
                files=attempt.files,
                inputs_json=inputs_json,
                network=self._network,
            )
            created = await self._call(api.create_container, **kwargs)
        except (docker.errors.DockerException, OSError, ValueError, TypeError) as exc:
            return await end(EventType.FAILED, FailureClass.EXECUTOR_ERROR, f"create: {exc}")
        attempt.container_id = str(created["Id"])
        if self._on_created is not None:
            try:
                await self._on_created(attempt.container_id)
            except Exception:
                log.exception("on_created hook failed for %s", attempt.container_id[:12])
        if attempt.stop_reason is not None:
            return await end(EventType.CANCELLED, FailureClass.CANCELLED, attempt.stop_message)
        try:
            await self._call(api.start, attempt.container_id)
        except docker.errors.DockerException as exc:
            reason = getattr(exc, "explanation", None) or str(exc)
            return await end(EventType.FAILED, FailureClass.EXECUTOR_ERROR, f"start: {reason}")
        attempt.started = True
        try:
            await attempt.sink.event(
                ReportedEvent(
                    EventType.STARTED,
                    "container started",
                    payload=self._started_payload(attempt, pulled=pulled),
                ),
                cursor=STARTED_CURSOR,
            )
        except Exception:
            # Nothing can be reported for it: do not leave it running unseen. (When this
            # task is cancelled instead, the agent is stopping: the container stays for
            # the next start to adopt.)
            await self._remove_container(attempt.container_id)
            await self._call(attempt.files.remove)
            raise
        attempt.task = asyncio.create_task(self._follow(attempt, 0, datetime.now(UTC)))

    def _started_payload(self, attempt: _Attempt, *, pulled: bool) -> dict[str, Any]:
        assignment = attempt.assignment
        return {
            "worker_id": self._agent_name,
            "agent": self._agent_name,
            "container_id": attempt.container_id,
            "image": assignment.image,
            "image_pulled": pulled,
            "gpu_ids": list(assignment.gpu_ids),
            "gpu_uuids": list(assignment.gpu_uuids),
        }

    # -- following ------------------------------------------------------------------------

    async def _follow(self, attempt: _Attempt, skip: int, timeout_from: datetime | None) -> None:
        """Report the container's output from line ``skip`` on, then how it ended."""
        try:
            reporter = OutputReporter(
                attempt.sink,
                "{}/{}".format(*attempt.assignment.key),
                skip,
                flush_s=self._log_flush_s,
                batch_lines=self._log_batch_lines,
                batch_bytes=self._log_batch_bytes,
            )
            state = await self._report_until_exit(attempt, reporter, timeout_from)
            await reporter.finish()
            outcome = self._outcome(attempt, state, reporter.tail)
            await self._report_end(attempt, outcome, cursor=reporter.cursor)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The report could not be stored (or Docker failed us): keep the container,
            # so that the attempt can be adopted again.
            log.exception("following %s/%d failed", *attempt.assignment.key)
            self._forget(attempt)
            return
        finally:
            if attempt.reader is not None:
                attempt.reader.close()
        # The terminal report is durable: nothing in the container is needed any more.
        try:
            assert attempt.container_id is not None
            await self._remove_container(attempt.container_id)
            await self._call(attempt.files.remove)
        finally:
            self._forget(attempt)

    async def _report_until_exit(
        self, attempt: _Attempt, reporter: OutputReporter, timeout_from: datetime | None
    ) -> dict[str, Any] | None:
        """Report the output until the container has exited; return its State (``None``
        when the container is gone). ``timeout_from`` is when the time limit started to
        run (``None``: none applies, the container has already exited)."""
        assert attempt.container_id is not None
        api = await self._api()
        timeout_s = attempt.assignment.constraints.timeout_s
        deadline = None
        if timeout_s and timeout_from is not None:
            elapsed = max(0.0, (datetime.now(UTC) - timeout_from).total_seconds())
            deadline = time.monotonic() + timeout_s - elapsed
        if attempt.stop_reason is not None:  # cancelled while it was starting
            self._stop_in_background(attempt)
        failures = 0
        while True:
            reporter.restart()
            broke = await self._read_log(attempt, reporter, deadline, follow=True)
            try:
                info = await self._call(api.inspect_container, attempt.container_id)
            except docker.errors.NotFound:
                return None
            except docker.errors.DockerException as exc:
                broke = exc
                info = None
            if info is not None:
                state: dict[str, Any] = info["State"]
                if not state.get("Running") and state.get("Status") != "created":
                    # Docker's follow can end before the last lines of a container that
                    # just exited are in its log (a trailing partial line most of all):
                    # read on from the last frame seen, to the end of the log.
                    since = reporter.catch_up_since()
                    if since is None:
                        reporter.restart()
                    broke = await self._read_log(attempt, reporter, None, since=since)
                    if broke is None and not reporter.caught_up:
                        log.warning(
                            "%s/%d: catch-up read missed the last line seen; reading all",
                            *attempt.assignment.key,
                        )
                        reporter.restart()
                        broke = await self._read_log(attempt, reporter, None)
                    if broke is None:
                        return state
            if broke is None:
                # The stream ended while the container runs (daemon restart): again.
                await asyncio.sleep(0.2)
            else:
                failures += 1
                log.warning("reading %s/%d: %s", *attempt.assignment.key, broke)
                await asyncio.sleep(min(5.0, 0.2 * 2**failures))

    async def _read_log(
        self,
        attempt: _Attempt,
        reporter: OutputReporter,
        deadline: float | None,
        *,
        follow: bool = False,
        since: str | None = None,
    ) -> BaseException | None:
        """One read of the container's log into ``reporter``; stops the container once
        past ``deadline`` (monotonic). Returns what broke the read (``None``: its end)."""
        assert attempt.container_id is not None
        api = await self._api()
        queue: asyncio.Queue[list[ReadItem]] = asyncio.Queue()
        reader = LogReader(
            api,
            attempt.container_id,
            asyncio.get_running_loop(),
            queue.put_nowait,
            follow=follow,
            since=since,
        )
        attempt.reader = reader
        reader.start()
        try:
            while True:
                waits = [reporter.flush_wait()]
                if deadline is not None and attempt.stop_reason is None:
                    waits.append(deadline - time.monotonic())
                wait = min((w for w in waits if w is not None), default=None)
                try:
                    # Not asyncio.wait_for: on 3.11 it can swallow a cancellation that
                    # arrives as the items do, and close() relies on cancelling this.
                    async with asyncio.timeout(wait):
                        items = await queue.get()
                except TimeoutError:
                    items = []
                frames = [item for item in items if isinstance(item, tuple)]
                await reporter.feed(frames)
                await reporter.flush_due()
                if (
                    deadline is not None
                    and attempt.stop_reason is None
                    and time.monotonic() >= deadline
                ):
                    limit = attempt.assignment.constraints.timeout_s
                    attempt.stop_reason = _StopReason.TIMEOUT
                    attempt.stop_message = f"exceeded its time limit of {limit:g} s"
                    self._stop_in_background(attempt)
                if len(frames) < len(items):  # the last item ends the read
                    end = items[-1]
                    return end if isinstance(end, BaseException) else None
        finally:
            reader.close()

    def _outcome(
        self, attempt: _Attempt, state: dict[str, Any] | None, tail: deque[str]
    ) -> ReportedEvent:
        """How the attempt ended, as the terminal event to report."""
        if state is None:
            if attempt.stop_reason is _StopReason.CANCEL:
                return _ended(
                    EventType.CANCELLED,
                    attempt.stop_message or "cancelled",
                    failure_class=FailureClass.CANCELLED,
                )
            return _ended(
                EventType.FAILED,
                "the container disappeared (removed outside gyoza?)",
                failure_class=FailureClass.EXECUTOR_ERROR,
            )
        exit_code = int(state.get("ExitCode", -1))
        started = _parse_docker_time(state.get("StartedAt"))
        finished = _parse_docker_time(state.get("FinishedAt"))
        duration_ms = 0
        if started is not None and finished is not None:
            duration_ms = max(0, round((finished - started).total_seconds() * 1000))

        def failed(failure: FailureClass, message: str) -> ReportedEvent:
            return _ended(
                EventType.FAILED,
                message,
                failure_class=failure,
                exit_code=exit_code,
                duration_ms=duration_ms,
            )

        if attempt.stop_reason is _StopReason.CANCEL:
            return _ended(
                EventType.CANCELLED,
                attempt.stop_message or "cancelled",
                failure_class=FailureClass.CANCELLED,
                exit_code=exit_code,
                duration_ms=duration_ms,
            )
        if attempt.stop_reason is _StopReason.TIMEOUT:
            return failed(FailureClass.TIMEOUT, f"{attempt.stop_message}; stopped")
        if exit_code == 0:
            try:
                outputs = attempt.files.read_outputs()
            except ValueError as exc:
                return failed(FailureClass.OUTPUT_INVALID, str(exc))
            return _ended(
                EventType.COMPLETED,
                "completed",
                outputs=outputs,
                exit_code=0,
                duration_ms=duration_ms,
            )
        last = "\n".join(tail)
        detail = f"; last output lines:\n{last}" if last else "; no output"
        if state.get("Error"):
            detail = f" ({state['Error']}){detail}"
        if state.get("OOMKilled"):
            limit = attempt.assignment.constraints.ram_mb
            what = f"its memory limit of {limit} MiB" if limit else "the memory available"
            return failed(
                FailureClass.OOM,
                f"killed for running out of memory ({what}); exit code {exit_code}{detail}",
            )
        return failed(FailureClass.EXIT_CODE, f"exited with code {exit_code}{detail}")

    # -- ending -----------------------------------------------------------------------------

    async def _report_end(
        self, attempt: _Attempt, outcome: ReportedEvent, cursor: int | None
    ) -> None:
        await attempt.sink.event(outcome, cursor=cursor)
        log.info(
            "%s/%d %s%s",
            *attempt.assignment.key,
            outcome.type.value,
            f" ({outcome.failure_class.value})" if outcome.failure_class else "",
        )

    def _forget(self, attempt: _Attempt) -> None:
        if self._attempts.get(attempt.assignment.key) is attempt:
            del self._attempts[attempt.assignment.key]
        attempt.ended.set()

    async def _stop(self, attempt: _Attempt) -> None:
        assert attempt.container_id is not None
        api = await self._api()
        try:
            await self._call(api.stop, attempt.container_id, timeout=math.ceil(self._stop_grace_s))
        except docker.errors.NotFound:
            pass
        except docker.errors.DockerException as exc:
            log.warning("stop %s: %s", attempt.container_id[:12], exc)

    def _stop_in_background(self, attempt: _Attempt) -> None:
        task = asyncio.create_task(self._stop(attempt))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _remove_container(self, container_id: str) -> None:
        api = await self._api()
        try:
            await self._call(api.remove_container, container_id, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.DockerException as exc:
            log.warning("remove %s: %s", container_id[:12], exc)

    # -- plumbing -------------------------------------------------------------------------

    async def _api(self) -> Any:
        if self._api_client is None:
            async with self._client_lock:
                if self._api_client is None:
                    client = await self._call(docker.from_env, max_pool_size=64)
                    self._client = client
                    self._api_client = client.api
        return self._api_client

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))


def _ms_since(began: float) -> int:
    return round((time.monotonic() - began) * 1000)


def _parse_docker_time(text: Any) -> datetime | None:
    """Docker's RFC 3339 times have nanoseconds; ``0001-01-01...`` means unset."""
    if not isinstance(text, str) or text.startswith("0001-"):
        return None
    match = _DOCKER_TIME.match(text)
    if match is None:
        return None
    whole, fraction, zone = match.groups()
    micros = (fraction or "0")[:6].ljust(6, "0")
    offset = "+00:00" if zone == "Z" else zone
    return datetime.fromisoformat(f"{whole}.{micros}{offset}")
