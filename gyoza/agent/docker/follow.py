"""Following a container's output with its stream kept (stdout vs stderr).

The SDK's ``logs(stream=True)`` drops which stream a frame came from, so this reads the
multiplexed log stream itself: each frame is an 8-byte header (stream id, 3 zero bytes,
big-endian length) and that many bytes.

The follow runs in a thread of its own (it blocks for the container's whole life);
:meth:`LogFollower.close` interrupts it from any thread.
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


def open_log_stream(
    api: Any, container_id: str, *, follow: bool
) -> tuple[Any, Iterator[tuple[str, bytes]]]:
    """Open ``GET /containers/{id}/logs`` from the start; return the response and an
    iterator of ``(stream, bytes)`` frames that ends when the container stops (``follow``)
    or at the end of what is logged so far."""
    url = api._url("/containers/{0}/logs", container_id)
    params = {"stdout": 1, "stderr": 1, "follow": int(follow), "timestamps": 0, "tail": "all"}
    # No read timeout: a quiet op may print nothing for hours.
    response = api._get(url, params=params, stream=True, timeout=None)
    api._raise_for_status(response)
    return response, _frames(response)


def _frames(response: Any) -> Iterator[tuple[str, bytes]]:
    raw = response.raw
    while True:
        header = raw.read(_HEADER.size)
        if not header or len(header) < _HEADER.size:
            return
        stream_id, length = _HEADER.unpack(header)
        if not length:
            continue
        data = raw.read(length)
        if not data:
            return
        yield _STREAMS.get(stream_id, STDOUT), data


#: What a follower hands to the event loop: a frame, ``None`` at the end of the stream,
#: or the exception that ended it.
FollowItem = tuple[str, bytes] | BaseException | None


class LogFollower:
    """Reads a container's output in a daemon thread and hands each frame to the loop.

    Parameters
    ----------
    api : docker.APIClient
        Low-level client.
    container_id : str
        Container to follow (from its first byte).
    loop : asyncio.AbstractEventLoop
        Loop that receives the frames.
    deliver : Callable[[FollowItem], None]
        Called in ``loop`` for each frame, then once with ``None`` (end of stream) or an
        exception.
    follow : bool
        Keep reading until the container stops; else stop at the end of the log.
    """

    def __init__(
        self,
        api: Any,
        container_id: str,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[FollowItem], None],
        *,
        follow: bool = True,
    ) -> None:
        self._follow = follow
        self._api = api
        self._container_id = container_id
        self._loop = loop
        self._deliver = deliver
        self._lock = threading.Lock()
        self._stream: CancellableStream | None = None
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"gyoza-logs-{container_id[:12]}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop following (the thread ends soon after; nothing more is delivered)."""
        with self._lock:
            self._closed = True
            stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:  # already closed by the other side
                log.debug("closing the log stream of %s", self._container_id, exc_info=True)

    def _send(self, item: FollowItem) -> None:
        if self._closed:
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver, item)
        except RuntimeError:  # loop closed: the agent is going away
            self._closed = True

    def _run(self) -> None:
        response = None
        try:
            response, frames = open_log_stream(self._api, self._container_id, follow=self._follow)
            with self._lock:
                if self._closed:
                    response.close()
                    return
                self._stream = CancellableStream(frames, response)
            for frame in frames:
                if self._closed:
                    break
                self._send(frame)
            self._send(None)
        except BaseException as exc:
            self._send(exc)
        finally:
            if response is not None:
                response.close()
