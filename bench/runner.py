"""The benchmark's phases, in order, against one server process.

1. Lifecycles: a fleet of scripted agents (one process) and closed-loop clients that keep
   ``concurrency`` runs in flight (create, then wait for the run's terminal event on the
   ``bench`` topic, then create the next). A warm-up batch first, then the measured
   batch: completed runs / wall time. Dispatch latency (client send → agent handler) and
   topic event latency (agent emits PROGRESS → subscriber has it) come with it, under
   that full load.
2. Profile: the same load again for a fixed time with py-spy attached to the server.
3. One at a time: a single run in flight, for the latency floor (dispatch, and PROGRESS
   to the topic subscriber) with nothing queued.
4. Watch: few runs in flight, each followed by its own ``WatchOpRun``; the scripted op
   spreads its PROGRESS events over ``sleep_ms`` so that they are delivered live. Dispatch
   and event latency at light load.
5. Memory: the work fleet stops; server RSS with no agent connected, then with
   ``idle_agents`` idle agents connected (one HTTP/2 connection each), and the difference
   per agent. (RSS right after the server started is reported too.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc.aio

from bench.common import (
    Summary,
    cpu_seconds,
    load_average,
    machine_busy_seconds,
    read_json,
    thread_cpu_seconds,
)
from bench.load import (
    TOPIC_BATCH,
    BatchResult,
    TopicListener,
    dispatch_latencies_ms,
    first_errors,
    lifecycle_batch,
    open_channel,
    wait_for_agents,
    watched_lifecycles,
)
from bench.processes import FleetProcess
from bench.profile import Profiler, summarize, thread_names, thread_role
from bench.server import ServerProcess


@dataclass(frozen=True)
class BenchConfig:
    """What the benchmark does; the defaults are ``make bench``'s."""

    runs: int = 2000
    warmup_runs: int = 300
    concurrency: int = 32
    agents: int = 8
    agent_cpu: float = 8.0
    idle_agents: int = 1000
    single_runs: int = 100
    watch_runs: int = 200
    watch_concurrency: int = 4
    watch_sleep_ms: int = 200
    profile_s: int = 15
    profile: bool = True
    #: Time limits (seconds) that keep the whole run short on a slow server: a batch still
    #: going at its limit creates no more runs, and the figures say it was cut short.
    warmup_max_s: float = 10.0
    runs_max_s: float = 60.0
    watch_max_s: float = 20.0
    single_max_s: float = 10.0
    server_log_level: str = "info"
    topic_batch: int = TOPIC_BATCH
    agent_coalesce_ms: float = 1.0
    #: The cost curve: runs in flight of each point, and runs measured per point (0: none).
    curve: tuple[int, ...] = (1, 4, 32, 128)
    curve_runs: int = 400
    profile_svg: Path = Path("/tmp/gyoza-bench-profile.svg")
    profile_raw: Path = Path("/tmp/gyoza-bench-profile.txt")


def _say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


async def _rss_sample(server: ServerProcess, samples: int = 5, every_s: float = 0.2) -> int:
    values = []
    for _ in range(samples):
        values.append(server.rss())
        await asyncio.sleep(every_s)
    return int(statistics.median(values))


def _batch_dict(batch: BatchResult, cpu: dict[str, float]) -> dict[str, Any]:
    return {
        "runs": batch.runs,
        "concurrency": batch.concurrency,
        "wall_s": batch.wall_s,
        "completed": batch.completed,
        "failed": batch.failed,
        "per_second": batch.per_second,
        "cut_short": batch.cut_short,
        "create_latency": Summary.of(batch.created_ms).to_dict(),
        "errors": first_errors(batch.errors),
        "error_count": len(batch.errors),
        "cpu_percent": cpu,
    }


async def _curve(
    config: BenchConfig, channel: grpc.aio.Channel, listener: TopicListener, meter: CpuMeter
) -> list[dict[str, Any]]:
    """Lifecycles/s, CPU per lifecycle and latencies at each point of ``config.curve``."""
    points: list[dict[str, Any]] = []
    for concurrency in config.curve:
        _say(f"curve: {config.curve_runs} runs, {concurrency} in flight")
        listener.progress_latency_ms.clear()
        listener.measuring = True
        meter.start()
        batch = await lifecycle_batch(
            channel,
            listener,
            runs=config.curve_runs,
            concurrency=concurrency,
            deadline_s=config.runs_max_s,
        )
        cpu = meter.stop()
        listener.measuring = False
        point = _batch_dict(batch, cpu)
        point["topic_event_latency"] = Summary.of(list(listener.progress_latency_ms)).to_dict()
        per_lifecycle_ms = {
            role: cpu[role] / 100 * batch.wall_s / max(batch.completed, 1) * 1000
            for role in ("server", "agents")
        }
        point["cpu_ms_per_lifecycle"] = per_lifecycle_ms
        points.append(point)
        _say(
            f"  {concurrency} in flight: {batch.per_second:.0f}/s, server "
            f"{per_lifecycle_ms['server']:.2f} ms + agents {per_lifecycle_ms['agents']:.2f} ms "
            f"per lifecycle, PROGRESS->topic p99 {point['topic_event_latency']['p99_ms']:.1f} ms, "
            f"create p99 {point['create_latency']['p99_ms']:.1f} ms"
        )
    return points


class CpuMeter:
    """CPU use over a window, in % of one core: the server, the fleet, this process, and
    every other process of the machine (which would be competing for the cores)."""

    def __init__(self, server: ServerProcess, fleet: FleetProcess) -> None:
        self.server = server
        self.fleet = fleet
        self._start = (0.0, 0.0, 0.0, 0.0, 0.0)

    def _now(self) -> tuple[float, float, float, float, float]:
        return (
            time.monotonic(),
            self.server.cpu_seconds(),
            self.fleet.cpu_seconds(),
            cpu_seconds(os.getpid()),
            machine_busy_seconds(),
        )

    def start(self) -> None:
        """Open the window."""
        self._start = self._now()

    def stop(self) -> dict[str, float]:
        """Close the window: percent of one core for each."""
        end = self._now()
        wall = end[0] - self._start[0]
        if wall <= 0:
            return {}
        server, agents, clients, machine = (
            100 * (end[i] - self._start[i]) / wall for i in range(1, 5)
        )
        return {
            "server": round(server, 1),
            "agents": round(agents, 1),
            "clients": round(clients, 1),
            "others": round(max(0.0, machine - server - agents - clients), 1),
            "load_average": load_average(),
        }


async def run_bench(config: BenchConfig, workdir: Path) -> dict[str, Any]:
    """Run every phase; the figures as a JSON-able dictionary."""
    results: dict[str, Any] = {"config": _config_dict(config)}
    server = ServerProcess(workdir, log_level=config.server_log_level)
    _say(f"starting the server: {' '.join(server.command)}")
    server.start()
    results["server_command"] = server.command
    fleet: FleetProcess | None = None
    idle: FleetProcess | None = None
    channel: grpc.aio.Channel | None = None
    listener: TopicListener | None = None
    try:
        await asyncio.sleep(1.0)
        results["rss_start"] = await _rss_sample(server)
        results["threads_start"] = server.threads()
        channel = open_channel(server.address)

        # -- 1. lifecycles ------------------------------------------------------------
        fleet = FleetProcess(
            server.address,
            config.agents,
            workdir / "agents",
            "bench",
            record=workdir / "agents-record.json",
            cpu=config.agent_cpu,
            coalesce_ms=config.agent_coalesce_ms,
        )
        _say(f"starting {config.agents} agents")
        await fleet.start()
        await wait_for_agents(channel, "bench-", config.agents, 60, fleet.alive)
        listener = TopicListener(channel, batch=config.topic_batch)
        await listener.start()

        _say(f"warm-up: {config.warmup_runs} runs")
        warmup = await lifecycle_batch(
            channel,
            listener,
            runs=config.warmup_runs,
            concurrency=config.concurrency,
            deadline_s=config.warmup_max_s,
        )
        if warmup.completed == 0:
            raise RuntimeError(
                "no run completed in the warm-up: "
                f"{first_errors(warmup.errors)}\n{server.log_tail()}\n{fleet.log_tail()}"
            )

        _say(f"lifecycles: {config.runs} runs, {config.concurrency} in flight")
        meter = CpuMeter(server, fleet)
        listener.progress_latency_ms.clear()
        listener.measuring = True
        threads_before = thread_cpu_seconds(server.pid)
        meter.start()
        batch = await lifecycle_batch(
            channel,
            listener,
            runs=config.runs,
            concurrency=config.concurrency,
            deadline_s=config.runs_max_s,
        )
        cpu = meter.stop()
        threads_after = thread_cpu_seconds(server.pid)
        listener.measuring = False
        topic_latency = list(listener.progress_latency_ms)
        results["lifecycles"] = _batch_dict(batch, cpu)
        results["lifecycles"]["topic_event_latency"] = Summary.of(topic_latency).to_dict()
        results["lifecycles"]["server_threads_cpu_percent"] = _thread_shares(
            server.pid, threads_before, threads_after, batch.wall_s
        )
        _say(
            f"  {batch.completed} completed in {batch.wall_s:.2f} s: "
            f"{batch.per_second:.0f}/s (cpu {cpu})"
        )
        _say(f"  server threads: {results['lifecycles']['server_threads_cpu_percent']}")

        server.check()

        # -- 2. profile ---------------------------------------------------------------
        profiled: BatchResult | None = None
        if config.profile:
            _say(f"profile: py-spy on the server for {config.profile_s} s under the same load")
            profiler = Profiler(
                server.pid, config.profile_s, config.profile_svg, config.profile_raw
            )
            if profiler.start():
                await asyncio.sleep(0.5)  # let py-spy attach
                meter.start()
                profiled = await lifecycle_batch(
                    channel,
                    listener,
                    runs=10**9,
                    concurrency=config.concurrency,
                    deadline_s=config.profile_s - 0.5,
                )
                cpu = meter.stop()
                await asyncio.to_thread(profiler.wait, 30.0)
                results["profile"] = {
                    "svg": str(config.profile_svg),
                    "raw": str(config.profile_raw),
                    "errors": profiler.errors,
                    "batch": _batch_dict(profiled, cpu),
                }
                with contextlib.suppress(OSError):
                    results["profile"]["summary"] = summarize(config.profile_raw).to_dict()
            else:
                results["profile"] = {"errors": profiler.errors}

        server.check()

        # -- 2b. the cost curve ---------------------------------------------------------
        if config.curve_runs > 0:
            results["curve"] = await _curve(config, channel, listener, meter)

        # -- 3. one run at a time -------------------------------------------------------
        _say(f"one at a time: {config.single_runs} runs, 1 in flight")
        listener.progress_latency_ms.clear()
        listener.measuring = True
        meter.start()
        single = await lifecycle_batch(
            channel,
            listener,
            runs=config.single_runs,
            concurrency=1,
            deadline_s=config.single_max_s,
        )
        cpu = meter.stop()
        listener.measuring = False
        results["single"] = _batch_dict(single, cpu)
        results["single"]["topic_event_latency"] = Summary.of(
            list(listener.progress_latency_ms)
        ).to_dict()
        server.check()

        # -- 4. watch -----------------------------------------------------------------
        _say(
            f"watch: {config.watch_runs} runs, {config.watch_concurrency} in flight, "
            f"each with its own WatchOpRun (sleep_ms {config.watch_sleep_ms})"
        )
        meter.start()
        watch = await watched_lifecycles(
            channel,
            runs=config.watch_runs,
            concurrency=config.watch_concurrency,
            sleep_ms=config.watch_sleep_ms,
            deadline_s=config.watch_max_s,
        )
        cpu = meter.stop()
        results["watch"] = {
            "runs": watch.runs,
            "cut_short": watch.runs < config.watch_runs,
            "completed": watch.completed,
            "wall_s": watch.wall_s,
            "per_second": watch.runs / watch.wall_s if watch.wall_s else 0.0,
            "event_latency": Summary.of(watch.event_latency_ms).to_dict(),
            "errors": first_errors(watch.errors),
            "error_count": len(watch.errors),
            "cpu_percent": cpu,
        }

        server.check()
        await listener.stop()
        listener = None
        _say("stopping the work agents")
        stopped = await fleet.stop()
        fleet = None
        record = read_json(workdir / "agents-record.json")
        assigned: dict[str, int] = record["assigned_ns"]
        results["lifecycles"]["dispatch_latency"] = Summary.of(
            dispatch_latencies_ms(batch.sent_ns, assigned)
        ).to_dict()
        results["watch"]["dispatch_latency"] = Summary.of(
            dispatch_latencies_ms(watch.sent_ns, assigned)
        ).to_dict()
        results["single"]["dispatch_latency"] = Summary.of(
            dispatch_latencies_ms(single.sent_ns, assigned)
        ).to_dict()
        results["fleet_stop"] = stopped

        # -- 5. memory ----------------------------------------------------------------
        await asyncio.sleep(1.0)
        rss_zero = await _rss_sample(server)
        idle_cpu_zero = await _cpu_rate(server, IDLE_CPU_WINDOW_S / 2)
        _say(f"memory: starting {config.idle_agents} idle agents")
        idle = FleetProcess(server.address, config.idle_agents, workdir / "idle", "idle")
        started = await idle.start(timeout_s=120)
        connect_s = await wait_for_agents(channel, "idle-", config.idle_agents, 120, idle.alive)
        await asyncio.sleep(2.0)  # let the connections settle
        rss_idle = await _rss_sample(server, samples=10)
        idle_cpu = await _cpu_rate(server, IDLE_CPU_WINDOW_S)
        heartbeats_per_s = config.idle_agents / HEARTBEAT_INTERVAL_S
        results["memory"] = {
            "rss_start": results["rss_start"],
            "rss_zero_agents": rss_zero,
            "rss_idle_agents": rss_idle,
            "idle_agents": config.idle_agents,
            "per_agent": (rss_idle - rss_zero) / config.idle_agents,
            "threads_start": results["threads_start"],
            "threads_idle_agents": server.threads(),
            "agents_open_s": started.get("open_s"),
            "agents_connect_s": connect_s,
            "server_cpu_percent_zero_agents": idle_cpu_zero * 100,
            "server_cpu_percent_idle_agents": idle_cpu * 100,
            "heartbeat_cpu_us": max(idle_cpu - idle_cpu_zero, 0.0) / heartbeats_per_s * 1e6,
        }
        _say(
            f"  {config.idle_agents} idle agents: server RSS {rss_idle / 2**20:.1f} MiB, "
            f"CPU {idle_cpu * 100:.1f}% of a core ({idle_cpu_zero * 100:.1f}% with none), "
            f"{results['memory']['heartbeat_cpu_us']:.0f} us per heartbeat"
        )
        _say("stopping the idle agents")
        await idle.stop()
        idle = None
    finally:
        if listener is not None:
            await listener.stop()
        for process in (fleet, idle):
            if process is not None:
                await process.stop(timeout_s=20)
        if channel is not None:
            await channel.close()
        _say("stopping the server")
        server.stop()
    return results


IDLE_CPU_WINDOW_S = 10.0
"""How long the server's CPU is measured with the idle agents connected."""

HEARTBEAT_INTERVAL_S = 5.0
"""The server's default heartbeat interval (``ControlSettings.heartbeat_interval_s``)."""


async def _cpu_rate(server: ServerProcess, window_s: float) -> float:
    """The server's CPU over the next *window_s*, in cores."""
    before, start = cpu_seconds(server.pid), time.monotonic()
    await asyncio.sleep(window_s)
    return (cpu_seconds(server.pid) - before) / (time.monotonic() - start)


def _thread_shares(
    pid: int,
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    wall_s: float,
) -> dict[str, float]:
    """CPU of the server's threads over a window, by role, in % of one core."""
    if wall_s <= 0:
        return {}
    names = thread_names(pid)
    shares: dict[str, float] = {}
    for tid, (comm, seconds) in after.items():
        used = seconds - before.get(tid, (comm, 0.0))[1]
        role = thread_role(names.get(tid, comm))
        shares[role] = shares.get(role, 0.0) + 100 * used / wall_s
    return {role: round(v, 1) for role, v in sorted(shares.items(), key=lambda kv: -kv[1])}


def _config_dict(config: BenchConfig) -> dict[str, Any]:
    return {
        key: str(value) if isinstance(value, Path) else value
        for key, value in config.__dict__.items()
    }
