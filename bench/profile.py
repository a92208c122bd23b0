"""Profiling the server with py-spy while it is under load, and reading the result.

Two py-spy samplers attach to the server for the same window: one writes a flame graph of
every active thread (SVG, for people), the other the raw collapsed stacks
(``frame;frame;frame count``) of the thread holding the GIL, which :func:`summarize`
reads into the hottest functions (self time: the frame on top of the stack; total time:
anywhere in it). The server's Python runs on one core at a time, so the GIL holder's
stacks are what its throughput is spent on; SQLite and gRPC C code that releases the
GIL runs beside it and shows only in the flame graph.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


def py_spy() -> str | None:
    """The py-spy executable next to this Python, or on PATH; None when there is none."""
    local = Path(sys.executable).with_name("py-spy")
    if local.is_file():
        return str(local)
    return shutil.which("py-spy")


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names of process *pid* by OS thread id (``py-spy dump``); empty when
    py-spy is missing or fails."""
    executable = py_spy()
    if executable is None:
        return {}
    try:
        dump = subprocess.run(
            [executable, "dump", "--pid", str(pid)],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names: dict[int, str] = {}
    for match in re.finditer(r'^Thread (\d+) \([^)]*\): "([^"]*)"', dump, re.MULTILINE):
        names[int(match.group(1))] = match.group(2)
    return names


def thread_role(name: str) -> str:
    """A thread's role in the server, from its Python name (or its OS name)."""
    if name == "MainThread":
        return "event loop (main thread)"
    if name.startswith("gyoza-store-writer"):
        return "store writer thread"
    if name.startswith("gyoza-store-read"):
        return "store reader threads"
    if name.startswith("asyncio_"):
        return "asyncio default executor"
    return f"other: {name}"


class Profiler:
    """py-spy attached to a process for a bounded time.

    Parameters
    ----------
    pid : int
        The process to sample.
    duration_s : int
        How long to sample.
    svg : Path
        Where the flame graph goes.
    raw : Path
        Where the collapsed stacks go.
    """

    def __init__(self, pid: int, duration_s: int, svg: Path, raw: Path) -> None:
        self.pid = pid
        self.duration_s = duration_s
        self.svg = svg
        self.raw = raw
        self._processes: list[subprocess.Popen[bytes]] = []
        self.errors: list[str] = []

    def start(self) -> bool:
        """Attach the samplers; False (with :attr:`errors`) when py-spy is missing."""
        executable = py_spy()
        if executable is None:
            self.errors.append("py-spy is not installed")
            return False
        common = [executable, "record", "--pid", str(self.pid), "--duration"]
        commands = [
            # The thread holding the GIL: the server runs Python on one core at a time, so
            # this is what its throughput is made of. Blocking samples (the process is
            # paused for each) keep stacks exact.
            [
                *common,
                str(self.duration_s),
                "--gil",
                "--format",
                "raw",
                "--nolineno",
                "-o",
                str(self.raw),
            ],
            # The flame graph sampler does not pause the process a second time.
            [*common, str(self.duration_s), "--nonblocking", "-o", str(self.svg)],
        ]
        for command in commands:
            self._processes.append(
                subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            )
        return True

    def wait(self, timeout_s: float) -> None:
        """Wait for the samplers to write their files (interrupting them if they overrun)."""
        for process in self._processes:
            try:
                output, _ = process.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGINT)
                try:
                    output, _ = process.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    output, _ = process.communicate()
            if process.returncode != 0:
                text = output.decode(errors="replace").strip().splitlines()
                self.errors.append(f"py-spy exited with {process.returncode}: {text[-1:]}")
        self._processes.clear()

    def stop(self) -> None:
        """Stop any sampler still running."""
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        self.wait(10)


@dataclass
class ProfileSummary:
    """The hottest functions of a raw py-spy profile."""

    samples: int
    self_top: list[tuple[str, int]] = field(default_factory=list)
    total_top: list[tuple[str, int]] = field(default_factory=list)
    areas: list[tuple[str, int]] = field(default_factory=list)

    def share(self, count: int) -> float:
        """*count* samples as a percentage of all samples."""
        return 100.0 * count / self.samples if self.samples else 0.0

    def to_dict(self) -> dict[str, object]:
        """Plain values, for JSON."""
        return {
            "samples": self.samples,
            "self_top": [[name, n, round(self.share(n), 1)] for name, n in self.self_top],
            "total_top": [[name, n, round(self.share(n), 1)] for name, n in self.total_top],
            "areas": [[name, n, round(self.share(n), 1)] for name, n in self.areas],
        }


#: Where a leaf frame's time goes, by the file it is in (first match wins).
AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("SQLite / SQLAlchemy (store)", ("sqlalchemy/", "sqlite3/", "gyoza/server/store/")),
    ("protobuf (de)serialization and Struct", ("google/protobuf/",)),
    ("grpc.aio (C-core glue)", ("grpc/", "grpc_")),
    ("asyncio loop, and C callbacks it runs (grpc Cython, C tasks)", ("asyncio/",)),
    ("logging", ("logging/",)),
    ("gyoza server code", ("gyoza/",)),
)


#: Frames in (nearly) every stack of a thread or of the event loop: they say nothing.
PLUMBING = (
    "<module>",
    "_run_code",
    "_run_module_as_main",
    "main (",
    "main_server (",
    "Thread.",
    "_worker (concurrent",
    "Runner.run",
    "run (asyncio/",
    "BaseEventLoop.run_",
    "BaseEventLoop._run_once",
    "Handle._run",
)


def _area(frame: str) -> str:
    for name, needles in AREAS:
        if any(needle in frame for needle in needles):
            return name
    return "other (stdlib, threads...)"


def summarize(raw: Path, top: int = 15) -> ProfileSummary:
    """Read py-spy's raw output into the hottest functions.

    Raises
    ------
    OSError
        When the file cannot be read.
    """
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    area_counts: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        samples += count
        leaf = frames[-1]
        self_counts[leaf] += count
        area_counts[_area(leaf)] += count
        for frame in set(frames):
            total_counts[frame] += count
    # The entry points (module, thread bootstrap, run_forever...) are in every stack:
    # they say nothing; keep the frames below them.
    total = [(f, n) for f, n in total_counts.most_common() if not f.startswith(PLUMBING)]
    return ProfileSummary(
        samples=samples,
        self_top=self_counts.most_common(top),
        total_top=total[:top],
        areas=area_counts.most_common(),
    )
