"""Helpers shared by the benchmark's processes: statistics, /proc, ports, files."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Every process of the benchmark talks over loopback only.
HOST = "127.0.0.1"

#: Topic every benchmark run publishes its events on.
TOPIC = "bench"

#: Key of the PROGRESS payload field holding the agent's send time (ns since the epoch,
#: as a decimal string: a Struct number is a double and would round nanoseconds).
SENT_NS_KEY = "bench_sent_ns"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout_s: float) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:*port*.

    Raises
    ------
    TimeoutError
        When nothing listens within *timeout_s*.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listens on {HOST}:{port} after {timeout_s:.0f} s"
                ) from None
            time.sleep(0.05)


def rss_bytes(pid: int) -> int:
    """Resident set size of process *pid*, from ``/proc/<pid>/status`` (VmRSS)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def threads(pid: int) -> int:
    """Number of threads of process *pid*."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time process *pid* has used, in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    # Fields after the command: state is fields[0]; utime and stime are fields 14 and 15
    # of the whole line (1-based), i.e. indices 11 and 12 here.
    return (int(fields[11]) + int(fields[12])) / ticks


def thread_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """CPU time of each thread of process *pid*: ``{tid: (comm, seconds)}``."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue  # the thread ended
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        out[int(task.name)] = (comm, (int(fields[11]) + int(fields[12])) / ticks)
    return out


def machine_busy_seconds() -> float:
    """CPU time all processes of the machine have used (every core), from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def load_average() -> float:
    """The one-minute load average."""
    with open("/proc/loadavg", encoding="ascii") as loadavg:
        return float(loadavg.read().split()[0])


def python_speed(iterations: int = 2_000_000) -> float:
    """Millions of iterations per CPU second of a bare Python loop (``s += i * i``): how
    fast this machine runs Python, to compare figures across machines."""
    start = time.process_time()
    total = 0
    for i in range(iterations):
        total += i * i
    used = time.process_time() - start
    return iterations / used / 1e6 if used > 0 else math.inf


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The *q*-th percentile (0-100) of already sorted values, nearest rank."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class Summary:
    """Distribution of a latency sample, in milliseconds."""

    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> Summary:
        """Summarize a sample (NaN everywhere when it is empty)."""
        ordered = sorted(values_ms)
        if not ordered:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(
            count=len(ordered),
            p50_ms=percentile(ordered, 50),
            p90_ms=percentile(ordered, 90),
            p99_ms=percentile(ordered, 99),
            max_ms=ordered[-1],
            mean_ms=sum(ordered) / len(ordered),
        )

    def to_dict(self) -> dict[str, float]:
        """Plain values, for JSON."""
        return {
            "count": self.count,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "mean_ms": self.mean_ms,
        }


def write_json(path: Path, value: Any) -> None:
    """Write *value* as JSON atomically (a temporary file, then a rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value), encoding="utf-8")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    """Read a JSON file."""
    return json.loads(path.read_text(encoding="utf-8"))
