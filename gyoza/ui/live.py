"""The run page's live feed: ``WatchOpRun`` and ``GetOpRunLogs`` as server-sent events.

One feed per open run page. Two followers run side by side: one watches the run and one
follows the current attempt's log. Both resume from where they were (the watch from its
last sequence, the log from its last line) after a stream's deadline or after the
server went away, retrying with a capped backoff, so a page stays live across a server
restart without reloading. Changes that arrive together are rendered once.

Events sent to the page:

``run``
    JSON object of fragment id -> HTML for the parts of the page that changed.
``log``
    JSON list of ``{attempt, number, text, stream}`` lines to append.
``log-reset``
    JSON ``{attempt}``: a new attempt began; the log shown so far is the previous one's.
``status``
    JSON ``{live: bool, message}``: whether the feed is connected to the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from gyoza.client import GyozaClientError, LogLine, NotFoundError
from gyoza.models.op_run import OpRun
from gyoza.ui.gateway import STREAM_WINDOW_S, Gateway

__all__ = ["RunFeed", "sse"]

#: How often the page gets a rendered change at most, in seconds.
RENDER_INTERVAL_S = 0.2
#: The longest wait between reconnection attempts, in seconds.
MAX_BACKOFF_S = 5.0
#: Comment line sent when nothing happened for this long, so proxies keep the stream.
KEEPALIVE_S = 15.0

# Codes after which a follower resumes: the stream's own deadline, the server gone.
_RESUMABLE = {
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}

Renderer = Callable[[OpRun], Awaitable[dict[str, str]]]


def sse(event: str, data: Any) -> str:
    """One server-sent event whose data is *data* as JSON."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class RunFeed:
    """The live feed of one run page.

    Parameters
    ----------
    gateway : Gateway
        The way to the server.
    run_id : str
        The run.
    render : Renderer
        Renders the page's fragments for a run (it may call the server).
    """

    def __init__(self, gateway: Gateway, run_id: str, render: Renderer) -> None:
        self._gateway = gateway
        self._run_id = run_id
        self._render = render
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    async def events(self) -> AsyncIterator[str]:
        """The feed's server-sent events, until the client goes away."""
        followers = [
            asyncio.create_task(self._watch(), name=f"ui-watch-{self._run_id}"),
            asyncio.create_task(self._follow_logs(), name=f"ui-logs-{self._run_id}"),
        ]
        try:
            while True:
                try:
                    first = await asyncio.wait_for(self._queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield ": keepalive\n\n"
                    continue
                batch = [first]
                while not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                for chunk in await self._flush(batch):
                    yield chunk
                await asyncio.sleep(RENDER_INTERVAL_S)
        finally:
            for task in followers:
                task.cancel()
            await asyncio.gather(*followers, return_exceptions=True)

    async def _flush(self, batch: list[tuple[str, Any]]) -> list[str]:
        """The events for a batch, in its order; the run's changes in a row are rendered
        once, as the last of them."""
        chunks: list[str] = []
        lines: list[dict[str, Any]] = []
        latest: OpRun | None = None

        async def settle() -> None:
            nonlocal lines, latest
            if lines:
                chunks.append(sse("log", lines))
                lines = []
            if latest is not None:
                try:
                    fragments = await self._render(latest)
                except GyozaClientError as error:
                    chunks.append(sse("status", {"live": False, "message": str(error)}))
                else:
                    chunks.append(sse("run", fragments))
                latest = None

        for kind, value in batch:
            if kind == "log":
                if latest is not None:
                    await settle()
                lines.append(value)
            elif kind == "run":
                if lines:
                    await settle()
                latest = value
            else:
                await settle()
                chunks.append(sse(kind, value))
        await settle()
        return chunks

    def _put(self, kind: str, value: Any) -> None:
        self._queue.put_nowait((kind, value))

    def _status(self, live: bool, message: str = "") -> None:
        self._put("status", {"live": live, "message": message})

    async def _watch(self) -> None:
        client = self._gateway.client
        sequence = 0
        backoff = _Backoff()
        while True:
            last: OpRun | None = None
            try:
                watch = functools.partial(
                    client.watch_run,
                    self._run_id,
                    after_sequence=sequence,
                    timeout=STREAM_WINDOW_S,
                )
                async for change in self._gateway.stream(watch):
                    if backoff.failed:
                        self._status(True)
                    backoff.reset()
                    sequence = change.sequence
                    last = change.run
                    self._put("run", change.run)
            except NotFoundError as error:
                self._status(False, str(error))
                return
            except GyozaClientError as error:
                if error.code not in _RESUMABLE:
                    self._status(False, str(error))
                    return
                if error.code is not grpc.StatusCode.DEADLINE_EXCEEDED:
                    self._status(False, f"reconnecting to {self._gateway.target}: {error}")
                    await backoff.wait()
                continue
            if last is not None and last.state.is_terminal:
                return  # the watch ended with the run: nothing more will change

    async def _follow_logs(self) -> None:
        client = self._gateway.client
        attempt = 0
        after_line = 0
        backoff = _Backoff()
        while True:
            try:
                run = await self._gateway.call(client.get_run, self._run_id)
                if run.current_attempt != attempt:
                    if attempt:
                        self._put("log-reset", {"attempt": run.current_attempt})
                    attempt, after_line = run.current_attempt, 0
                follow = functools.partial(
                    client.logs,
                    self._run_id,
                    attempt,
                    follow=True,
                    after_line=after_line,
                    timeout=STREAM_WINDOW_S,
                )
                async for line in self._gateway.stream(follow):
                    backoff.reset()
                    after_line = line.number
                    self._put("log", _line(line))
            except NotFoundError:
                return
            except GyozaClientError as error:
                if error.code not in _RESUMABLE:
                    return
                if error.code is not grpc.StatusCode.DEADLINE_EXCEEDED:
                    await backoff.wait()
                continue
            # The follow ended: the attempt is over. Stop with the run, or follow the next.
            if run.state.is_terminal:
                with contextlib.suppress(GyozaClientError):
                    again = await self._gateway.call(client.get_run, self._run_id)
                    if again.state.is_terminal and again.current_attempt == attempt:
                        return
            await asyncio.sleep(0.5)


def _line(line: LogLine) -> dict[str, Any]:
    return {
        "attempt": line.attempt,
        "number": line.number,
        "text": line.text,
        "stream": line.stream,
    }


class _Backoff:
    """Doubling waits from 0.25 s up to :data:`MAX_BACKOFF_S`."""

    def __init__(self) -> None:
        self._delay = 0.0

    @property
    def failed(self) -> bool:
        return self._delay > 0

    def reset(self) -> None:
        self._delay = 0.0

    async def wait(self) -> None:
        self._delay = min(MAX_BACKOFF_S, max(0.25, self._delay * 2))
        await asyncio.sleep(self._delay)
