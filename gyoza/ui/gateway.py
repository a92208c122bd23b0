"""The dashboard's way to the server: the synchronous client, used from asyncio.

Unary calls run in a small thread pool of their own (so a slow server never starves
the event loop or other requests). A stream runs in a thread of its own that hands each
item to the event loop; the thread stops within one stream window after the page that
wanted it has gone, because every stream is opened with a deadline and re-opened from
where it was while someone still reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from gyoza.client import Client

__all__ = ["STREAM_WINDOW_S", "Gateway"]

T = TypeVar("T")

#: Deadline of each stream call; a stream nobody reads any more ends within it.
STREAM_WINDOW_S = 15.0

_END = object()


class Gateway:
    """Asynchronous access to one :class:`~gyoza.client.Client`.

    Parameters
    ----------
    client : Client
        The connected client; closed by :meth:`close`.
    workers : int
        Threads for unary calls.
    """

    def __init__(self, client: Client, workers: int = 8) -> None:
        self.client = client
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gyoza-ui-call")

    @property
    def target(self) -> str:
        """The server's address."""
        return self.client.target

    async def call(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one blocking client call in the pool; its result or its error."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: method(*args, **kwargs))

    async def stream(self, open_stream: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
        """Iterate a blocking stream from asyncio.

        ``open_stream()`` is called in a new thread and iterated there; its items (and
        its error, raised here) reach the caller in order. When the caller stops
        early, the thread stops at the next item or when the stream's deadline ends it.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stopped = threading.Event()

        def hand_over(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody reads
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def pump() -> None:
            try:
                for item in open_stream():
                    if stopped.is_set():
                        return  # leaving the loop closes the stream (cancels the call)
                    hand_over(item)
            except BaseException as error:  # handed to the reader, who raises it
                hand_over(_Failure(error))
            finally:
                hand_over(_END)

        threading.Thread(target=pump, name="gyoza-ui-stream", daemon=True).start()
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            stopped.set()

    def close(self) -> None:
        """Stop the call threads and close the client."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error
