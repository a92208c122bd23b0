"""One attempt's output frames → reports to its sink, with the resume cursor kept exact.

Output lines are numbered in the order Docker's log holds them (both streams together),
which is the same order on every read of the log. A reporter created with ``skip=N``
counts the first N lines without reporting them: an earlier reader (or an agent before
a restart) reported them. Marked stdout lines become events; the others go into log
reports: a line goes out at once when the previous log report is at least ``flush_s``
old, else with the lines that follow it once it is (or once the batch is full). A quiet
op's lines arrive with no delay and a chatty op's in few reports. Each report carries
the cursor ``1 + lines consumed`` (``1`` standing for STARTED).
"""

from __future__ import annotations

import calendar
import logging
import re
import time
from collections import deque

from gyoza.agent.docker.follow import Frame
from gyoza.agent.docker.output import STDOUT, LineSplitter, parse_event_line
from gyoza.agent.executor import ReportSink
from gyoza.op import EVENT_MARKER

log = logging.getLogger(__name__)

#: Cursor value once STARTED is stored and no output line is consumed yet.
STARTED_CURSOR = 1
#: How many of the last output lines a failure quotes.
TAIL_LINES = 20
#: How far before the last frame seen a catch-up read starts (frames of the two streams
#: can reach the log slightly out of timestamp order).
CATCH_UP_MARGIN_S = 5

_TIMESTAMP = re.compile(rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z$")


class OutputReporter:
    """Turns an attempt's output frames into event and log reports.

    Parameters
    ----------
    sink : ReportSink
        Where the attempt's reports go.
    name : str
        The attempt, for log messages.
    skip : int
        Output lines already reported.
    flush_s, batch_lines, batch_bytes
        At most one log report per ``flush_s`` unless a batch reaches this many lines or
        characters.
    """

    def __init__(
        self,
        sink: ReportSink,
        name: str,
        skip: int,
        *,
        flush_s: float,
        batch_lines: int,
        batch_bytes: int,
    ) -> None:
        self._sink = sink
        self._name = name
        self._consumed = skip
        self._flush_s = flush_s
        self._batch_lines = batch_lines
        self._batch_max_bytes = batch_bytes
        self._seen = 0
        self._splitter = LineSplitter()
        self._last_frame: Frame | None = None
        self._skip_until: Frame | None = None
        self._batch: list[tuple[str, str]] = []
        self._batch_bytes = 0
        self._last_flush = -float("inf")
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)

    @property
    def cursor(self) -> int:
        """``1 + output lines consumed``: what a new reporter would skip after a restart."""
        return STARTED_CURSOR + self._consumed

    def restart(self) -> None:
        """A new read of the output from its first byte begins."""
        self._seen = 0
        self._splitter = LineSplitter()
        self._last_frame = None
        self._skip_until = None
        self.tail.clear()

    def catch_up_since(self) -> str | None:
        """Prepare to go on from the last frame seen with a read of the log from a time
        (Docker's ``since``, which this returns): frames up to that one are dropped.
        ``None`` when there is no such point (nothing seen): read from the start, after
        :meth:`restart`."""
        if self._last_frame is None:
            return None
        match = _TIMESTAMP.match(self._last_frame[1])
        if match is None:
            return None
        whole, fraction = match.groups()
        seconds = calendar.timegm(time.strptime(whole.decode(), "%Y-%m-%dT%H:%M:%S"))
        nanos = (fraction or b"0").decode().ljust(9, "0")
        self._skip_until = self._last_frame
        return f"{seconds - CATCH_UP_MARGIN_S}.{nanos}"

    @property
    def caught_up(self) -> bool:
        """False while a catch-up read has not reached the last frame seen before it."""
        return self._skip_until is None

    async def feed(self, frames: list[Frame]) -> None:
        for frame in frames:
            if self._skip_until is not None:
                if frame == self._skip_until:
                    self._skip_until = None
                continue
            self._last_frame = frame
            stream, _, data = frame
            for text, name in self._splitter.feed(stream, data):
                await self._line(text, name)

    async def finish(self) -> None:
        """The output is complete: report an unterminated last line and the batch."""
        for text, name in self._splitter.finish():
            await self._line(text, name)
        await self.flush()

    def flush_wait(self) -> float | None:
        """Seconds until the batch is due (``None``: no batch)."""
        if not self._batch:
            return None
        return max(0.0, self._last_flush + self._flush_s - time.monotonic())

    async def flush_due(self) -> None:
        wait = self.flush_wait()
        if wait is not None and wait <= 0:
            await self.flush()

    async def flush(self) -> None:
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        self._batch_bytes = 0
        self._last_flush = time.monotonic()
        await self._sink.logs(batch, cursor=self.cursor)

    async def _line(self, text: str, stream: str) -> None:
        index = self._seen
        self._seen += 1
        event = None
        if stream == STDOUT and text.startswith(EVENT_MARKER):
            try:
                event = parse_event_line(text)
            except ValueError as exc:
                if index >= self._consumed:
                    log.warning("%s: malformed event line kept as log text: %s", self._name, exc)
        if event is None:
            self.tail.append(text)
        if index < self._consumed:
            return
        if event is not None:
            await self.flush()  # the lines before it go first
            self._consumed = index + 1
            await self._sink.event(event, cursor=self.cursor)
            return
        self._consumed = index + 1
        self._batch.append((text, stream))
        self._batch_bytes += len(text)
        if len(self._batch) >= self._batch_lines or self._batch_bytes >= self._batch_max_bytes:
            await self.flush()
