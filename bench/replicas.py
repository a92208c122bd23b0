"""Replicas on PostgreSQL: throughput, latency and takeover time (``make bench-replicas``).

Each scenario gets a fresh PostgreSQL database and its own server processes on
127.0.0.1, a scripted fleet (one process) and closed-loop clients (this process), as in
``make bench``'s lifecycle phase:

- ``one``: one replica; clients and agents on it;
- ``two-split``: two replicas; clients on the leader, agents on the follower;
- ``two-follower``: two replicas; clients and agents both on the follower (every call
  and every agent message forwarded);
- ``workers-2``: ``gyoza server --workers 2``: two replicas behind one address, clients
  and agents spread over them by the kernel;

then the takeover: the leader is killed (``kill -9``) with agents on both replicas and a
client on the follower; the times to the new leader serving, to the first run created
after the kill completing (its assignment comes from the new scheduler), and to every
agent of the dead leader being connected again.

The database: ``GYOZA_BENCH_POSTGRES_URL``, else ``GYOZA_TEST_POSTGRES_URL`` (the
server of ``scripts/start-postgres.sh``); each scenario creates and drops a database.

Usage: ``python -m bench.replicas [--runs N] [--concurrency N] [--agents N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql
from sqlalchemy.engine import make_url

from bench.common import HOST, Summary, cpu_seconds, free_port, python_speed, read_json
from bench.load import (
    TopicListener,
    create_request,
    dispatch_latencies_ms,
    first_errors,
    lifecycle_batch,
    open_channel,
    wait_for_agents,
)
from bench.processes import FleetProcess
from gyoza.api.v1 import op_run_service_pb2, op_run_service_pb2_grpc, resources_pb2

LEADER_LEASE_S = 5.0


def _say(text: str) -> None:
    print(f"[bench-replicas {time.strftime('%H:%M:%S')}] {text}", flush=True)


def _admin_url(url: str) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    return parsed.set(database="postgres").render_as_string(hide_password=False)


class Database:
    """A fresh database on the benchmark's PostgreSQL server, dropped afterwards."""

    def __init__(self, base_url: str) -> None:
        self.name = f"gyoza_bench_{uuid.uuid4().hex[:10]}"
        self._admin = _admin_url(base_url)
        self.url = make_url(base_url).set(database=self.name).render_as_string(hide_password=False)

    def __enter__(self) -> Database:
        with psycopg.connect(self._admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
        return self

    def __exit__(self, *exc: object) -> None:
        with psycopg.connect(self._admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name))
            )

    def leadership(self) -> tuple[str, int]:
        with psycopg.connect(_libpq(self.url), autocommit=True) as conn:
            row = conn.execute(
                "SELECT holder, term FROM leadership WHERE name = 'control' AND expires_at > now()"
            ).fetchone()
        return (str(row[0]), int(row[1])) if row else ("", 0)


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Replica:
    """One ``python -m gyoza.server`` replica process."""

    def __init__(self, index: int, workdir: Path, database: str, extra: Sequence[str] = ()) -> None:
        self.extra = list(extra)
        self.replica_id = f"bench-replica-{index}"
        self.port = free_port()
        self.address = f"{HOST}:{self.port}"
        self.log_path = workdir / f"{self.replica_id}.log"
        self.database = database
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("wb")
        env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            GYOZA_REPLICA_ID=self.replica_id,
            GYOZA_LEADER_LEASE_S=str(LEADER_LEASE_S),
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gyoza.server", "--listen", self.address,
             "--database", self.database, "--log-level", "warning", *self.extra],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        log.close()

    async def wait_serving(self, timeout_s: float = 60.0) -> float:
        """Seconds until the health service says SERVING."""
        started = time.monotonic()
        async with grpc.aio.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - started
                except grpc.aio.AioRpcError:
                    pass
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"{self.replica_id} exited:\n{self.log_tail()}")
                if time.monotonic() - started > timeout_s:
                    raise RuntimeError(f"{self.replica_id} not serving:\n{self.log_tail()}")
                await asyncio.sleep(0.02)

    def cpu_seconds(self) -> float:
        """CPU time of the process and its children (the workers of a supervisor)."""
        assert self.process is not None
        return sum(_cpu_or_zero(pid) for pid in _tree(self.process.pid))

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])


def _tree(pid: int) -> list[int]:
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as children:
            for child in children.read().split():
                pids += _tree(int(child))
    except OSError:
        pass
    return pids


def _cpu_or_zero(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


async def lifecycle_scenario(
    name: str,
    base_url: str,
    workdir: Path,
    *,
    replicas: int,
    client_on: int,
    agents_on: int,
    args: argparse.Namespace,
    workers: int = 0,
) -> dict[str, Any]:
    """Lifecycles with *args.concurrency* in flight; figures as a dictionary."""
    scenario_dir = workdir / name
    scenario_dir.mkdir()
    with Database(base_url) as database:
        extra = ["--workers", str(workers)] if workers else []
        nodes = [Replica(i, scenario_dir, database.url, extra) for i in range(replicas)]
        fleet: FleetProcess | None = None
        channel: grpc.aio.Channel | None = None
        listener: TopicListener | None = None
        try:
            for node in nodes:  # the first one leads
                node.start()
                await node.wait_serving()
            client, agent_side = nodes[client_on], nodes[agents_on]
            channel = open_channel(client.address)
            record = scenario_dir / "agents-record.json"
            fleet = FleetProcess(
                agent_side.address, args.agents, scenario_dir / "agents", "bench", record=record
            )
            await fleet.start()
            await wait_for_agents(channel, "bench-", args.agents, 60, fleet.alive)
            listener = TopicListener(channel)
            await listener.start()
            await lifecycle_batch(
                channel, listener, runs=args.warmup_runs, concurrency=args.concurrency,
                deadline_s=20,
            )  # fmt: skip
            listener.progress_latency_ms.clear()
            listener.measuring = True
            cpu_before = [n.cpu_seconds() for n in nodes]
            fleet_before = fleet.cpu_seconds()
            batch = await lifecycle_batch(
                channel, listener, runs=args.runs, concurrency=args.concurrency, deadline_s=90
            )
            server_cpu = sum(n.cpu_seconds() - b for n, b in zip(nodes, cpu_before, strict=True))
            fleet_cpu = fleet.cpu_seconds() - fleet_before
            listener.measuring = False
            topic = list(listener.progress_latency_ms)
            await listener.stop()
            listener = None
            await fleet.stop()
            assigned = read_json(record)["assigned_ns"]
            fleet = None
            per_run = max(batch.completed, 1)
            result = {
                "scenario": name,
                "replicas": workers or replicas,
                "completed": batch.completed,
                "failed": batch.failed,
                "errors": first_errors(batch.errors),
                "per_second": round(batch.per_second, 1),
                "server_cpu_ms_per_lifecycle": round(1000 * server_cpu / per_run, 2),
                "agents_cpu_ms_per_lifecycle": round(1000 * fleet_cpu / per_run, 2),
                "dispatch": Summary.of(dispatch_latencies_ms(batch.sent_ns, assigned)).to_dict(),
                "topic": Summary.of(topic).to_dict(),
            }
            _say(json.dumps(result))
            return result
        finally:
            if listener is not None:
                await listener.stop()
            if channel is not None:
                await channel.close()
            if fleet is not None:
                await fleet.stop()
            for node in nodes:
                node.stop()


async def takeover_scenario(
    base_url: str, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """kill -9 the leader; how long until the follower leads, a new run completes, and
    the dead leader's agents are back."""
    scenario_dir = workdir / "takeover"
    scenario_dir.mkdir()
    with Database(base_url) as database:
        nodes = [Replica(i, scenario_dir, database.url) for i in range(2)]
        fleets: list[FleetProcess] = []
        channel: grpc.aio.Channel | None = None
        try:
            for node in nodes:
                node.start()
                await node.wait_serving()
            leader, follower = nodes
            both = f"{leader.address},{follower.address}"
            for prefix in ("near", "far"):
                fleet = FleetProcess(both if prefix == "near" else follower.address,
                                     args.agents // 2 or 1, scenario_dir / prefix, prefix)  # fmt: skip
                await fleet.start()
                fleets.append(fleet)
            channel = open_channel(follower.address)
            for prefix in ("near", "far"):
                await wait_for_agents(
                    channel, f"{prefix}-", args.agents // 2 or 1, 60, lambda: True
                )
            _, term = database.leadership()
            killed = time.monotonic()
            leader.kill9()
            stub = op_run_service_pb2_grpc.OpRunServiceStub(channel)
            serving = await follower.wait_serving()
            while database.leadership()[1] <= term:  # noqa: ASYNC110 (the database's row)
                await asyncio.sleep(0.01)
            led = time.monotonic() - killed
            request = create_request(sleep_ms=0, progress_steps=1)
            request.request_id = f"after-kill-{uuid.uuid4().hex[:8]}"
            while True:
                try:
                    run = (await stub.CreateOpRun(request, timeout=5)).op_run
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.01)
            while True:
                got = await stub.GetOpRun(op_run_service_pb2.GetOpRunRequest(run_id=run.id))
                if got.op_run.state == resources_pb2.OP_RUN_STATE_COMPLETED:
                    break
                await asyncio.sleep(0.01)
            first_run = time.monotonic() - killed
            await wait_for_agents(channel, "near-", args.agents // 2 or 1, 60, lambda: True)
            agents_back = time.monotonic() - killed
            result = {
                "scenario": "takeover",
                "leader_lease_s": LEADER_LEASE_S,
                "new_leader_s": round(led, 3),
                "follower_serving_s": round(serving, 3),
                "first_run_completed_s": round(first_run, 3),
                "agents_back_s": round(agents_back, 3),
            }
            _say(json.dumps(result))
            return result
        finally:
            if channel is not None:
                await channel.close()
            for fleet in fleets:
                await fleet.stop()
            for node in nodes:
                node.stop()


def markdown(speed: float, results: list[dict[str, Any]]) -> str:
    lines = [
        f"python speed: {speed:.1f} M iterations/s",
        "",
        "| scenario | replicas | lifecycles/s | server CPU / lifecycle | agents CPU / lifecycle "
        "| dispatch p50 / p99 | topic p50 / p99 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if r["scenario"] == "takeover":
            continue
        d, t = r["dispatch"], r["topic"]
        lines.append(
            f"| {r['scenario']} | {r['replicas']} | {r['per_second']} "
            f"| {r['server_cpu_ms_per_lifecycle']} ms | {r['agents_cpu_ms_per_lifecycle']} ms "
            f"| {d['p50_ms']:.1f} / {d['p99_ms']:.1f} ms "
            f"| {t['p50_ms']:.1f} / {t['p99_ms']:.1f} ms |"
        )
    for r in results:
        if r["scenario"] == "takeover":
            lines += [
                "",
                f"Takeover after kill -9 of the leader (leader lease {r['leader_lease_s']} s): "
                f"new leader in {r['new_leader_s']} s, first run created after the kill "
                f"completed at {r['first_run_completed_s']} s, the dead leader's agents all "
                f"connected again at {r['agents_back_s']} s.",
            ]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    base_url = os.environ.get("GYOZA_BENCH_POSTGRES_URL") or os.environ.get(
        "GYOZA_TEST_POSTGRES_URL"
    )
    if not base_url:
        print("set GYOZA_BENCH_POSTGRES_URL (scripts/start-postgres.sh prints one)")
        return 2
    speed = python_speed()
    _say(f"python speed: {speed:.1f} M iterations/s")
    results = []
    with tempfile.TemporaryDirectory(prefix="gyoza-bench-replicas-") as tmp:
        workdir = Path(tmp)
        for name, replicas, client_on, agents_on in (
            ("one", 1, 0, 0),
            ("two-split", 2, 0, 1),
            ("two-follower", 2, 1, 1),
            ("workers-2", 1, 0, 0),
        ):
            _say(f"scenario {name}")
            results.append(
                await lifecycle_scenario(
                    name,
                    base_url,
                    workdir,
                    replicas=replicas,
                    client_on=client_on,
                    agents_on=agents_on,
                    args=args,
                    workers=2 if name.startswith("workers") else 0,
                )
            )
        _say("scenario takeover")
        results.append(await takeover_scenario(base_url, workdir, args))
    table = markdown(speed, results)
    print(table)
    if args.json:
        await asyncio.to_thread(
            Path(args.json).write_text, json.dumps({"python_speed": speed, "results": results})
        )
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__)
    parser.add_argument("--runs", type=int, default=1500)
    parser.add_argument("--warmup-runs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
