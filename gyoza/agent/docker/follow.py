"""Reading a container's output with its stream kept (stdout vs stderr).

The SDK's ``logs(stream=True)`` drops which stream a frame came from, so this reads the
multiplexed log stream itself: each frame is an 8-byte header (stream id, 3 zero bytes,
big-endian length) and that many bytes.

The read runs in a thread of its own (a follow blocks for the container's whole life)
and hands frames to the event loop in batches: one loop wake-up carries every frame that
arrived since the last one, so a chatty op costs the loop little per line.
:meth:`LogReader.close` interrupts it from any thread.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

from docker.types import CancellableStream

from gyoza.agent.docker.output import STDERR, STDOUT

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">BxxxL")
_STREAMS = {1: STDOUT, 2: STDERR}

#: ``(stream, timestamp, bytes)``: one entry of the container's log (a line, or a piece
#: of a long one), with Docker's RFC 3339 nanosecond timestamp.
Frame = tuple[str, bytes, bytes]


def open_log_stream(
    api: Any, container_id: str, *, follow: bool, since: str | None = None
) -> tuple[Any, Iterator[Frame]]:
    """Open ``GET /containers/{id}/logs``; return the response and an iterator of frames
    that ends when the container stops (``follow``) or at the end of what is logged so
    far. From the start, or from the entries logged at or after ``since`` (Docker's
    ``seconds.nanoseconds``)."""
    url = api._url("/containers/{0}/logs", container_id)
    params: dict[str, Any] = {"stdout": 1, "stderr": 1, "follow": int(follow), "timestamps": 1}
    params["tail"] = "all"
    if since is not None:
        params["since"] = since
    # No read timeout: a quiet op may print nothing for hours.
    response = api._get(url, params=params, stream=True, timeout=None)
    api._raise_for_status(response)
    return response, _frames(response)


def _chunks(response: Any) -> Iterator[bytes]:
    raw = response.raw
    if raw.chunked:
        # One read per HTTP chunk (the daemon sends one a frame), not two per frame.
        yield from raw.read_chunked(decode_content=False)
    else:
        yield from raw.stream(64 * 1024, decode_content=False)


def _frames(response: Any) -> Iterator[Frame]:
    """Frames from the response body, whatever the chunk boundaries."""
    buf = b""
    for chunk in _chunks(response):
        buf = buf + chunk if buf else chunk
        start = 0
        while len(buf) - start >= _HEADER.size:
            stream_id, length = _HEADER.unpack_from(buf, start)
            end = start + _HEADER.size + length
            if end > len(buf):
                break
            if length:
                timestamp, _, data = buf[start + _HEADER.size : end].partition(b" ")
                yield _STREAMS.get(stream_id, STDOUT), timestamp, data
            start = end
        buf = buf[start:]


#: What a reader hands to the event loop, in order: frames, then ``None`` at the end of
#: the stream or the exception that ended it.
ReadItem = Frame | BaseException | None


class LogReader:
    """Reads a container's output in a daemon thread and hands it to the event loop.

    Parameters
    ----------
    api : docker.APIClient
        Low-level client.
    container_id : str
        Container to read (from its first byte).
    loop : asyncio.AbstractEventLoop
        Loop that receives the items.
    deliver : Callable[[list[ReadItem]], None]
        Called in ``loop`` with the items that arrived since its last call; the last
        item is ``None`` (end of stream) or an exception.
    follow : bool
        Keep reading until the container stops; else stop at the end of the log.
    since : str | None
        Read the entries logged at or after this time only.
    """

    def __init__(
        self,
        api: Any,
        container_id: str,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[list[ReadItem]], None],
        *,
        follow: bool = True,
        since: str | None = None,
    ) -> None:
        self._since = since
        self._api = api
        self._container_id = container_id
        self._loop = loop
        self._deliver = deliver
        self._follow = follow
        self._lock = threading.Lock()
        self._pending: list[ReadItem] = []
        self._wake_scheduled = False
        self._stream: CancellableStream | None = None
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"gyoza-logs-{container_id[:12]}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop reading (the thread ends soon after; nothing more is delivered)."""
        with self._lock:
            self._closed = True
            stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:  # already closed by the other side
                log.debug("closing the log stream of %s", self._container_id, exc_info=True)

    def _send(self, item: ReadItem) -> None:
        with self._lock:
            if self._closed:
                return
            self._pending.append(item)
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # loop closed: the agent is going away
            self._closed = True

    def _wake(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
            self._wake_scheduled = False
            if self._closed:
                return
        self._deliver(items)

    def _run(self) -> None:
        response = None
        try:
            response, frames = open_log_stream(
                self._api, self._container_id, follow=self._follow, since=self._since
            )
            with self._lock:
                if self._closed:
                    return
                self._stream = CancellableStream(frames, response)
            for frame in frames:
                if self._closed:
                    return
                self._send(frame)
            self._send(None)
        except BaseException as exc:
            self._send(exc)
        finally:
            if response is not None:
                response.close()
