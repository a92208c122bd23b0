"""``python -m bench.forward``: what a follower's forwarder costs per forwarded message.

Three processes on loopback: an echo server standing in for the leader (a grpc.aio
server that answers each request with the same bytes, no parsing), a forwarder
(:class:`gyoza.server.forward.Forwarder` on a grpc.aio server, as a follower runs it)
in front of it, and this client. Each load runs twice, straight to the echo server and
through the forwarder, and the figures are:

- messages per second the client completes either way;
- the forwarder process's CPU time per forwarded message (``/proc``, user + system);
  one forwarded message is one request and its response, so the CPU covers two hops
  each way (in and out of the forwarder);
- for unary calls one at a time, the latency each way (p50, p99).

Loads: unary calls (``GetOpRun``'s name) one at a time and 64 in flight; the same
64 in flight on a method the forwarder has no descriptor of, which it relays as a bidi
stream; and bidi streams (``Connect``'s name), 1 and 100 of them, each with 32 requests
written ahead. Payloads are 200 bytes. Both servers run uvloop, like ``gyoza server``.
The figures are in docs/benchmarks.md (bench/notes.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import grpc.aio

from bench.common import HOST, cpu_seconds, free_port, percentile, wait_for_port

UNARY = "/gyoza.api.v1.OpRunService/GetOpRun"
BIDI = "/gyoza.api.v1.AgentService/Connect"
STREAM = "/gyoza.bench.Echo/Talk"
"""A method the forwarder has no descriptor of: relayed as a bidi stream, whatever the
caller's kind."""
PAYLOAD = b"x" * 200
WINDOW = 32


# -- the two servers (child processes) ----------------------------------------------------


class _Echo(grpc.GenericRpcHandler):
    """Answers GetOpRun with its request, and every other method as an echoing stream."""

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        if details.method == UNARY:
            return grpc.unary_unary_rpc_method_handler(self.answer)
        return grpc.stream_stream_rpc_method_handler(self.echo)

    async def answer(self, request: bytes, context: Any) -> bytes:
        return request

    async def echo(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request


async def _serve(role: str, port: int, target: str) -> None:
    from gyoza.server.forward import Forwarder

    server = grpc.aio.server()
    forwarder = None
    if role == "echo":
        server.add_generic_rpc_handlers((_Echo(),))
    else:
        forwarder = Forwarder(replica_id="bench")
        forwarder.set_target(target)
        server.add_generic_rpc_handlers((forwarder.handler(),))
    server.add_insecure_port(f"{HOST}:{port}")
    await server.start()
    await server.wait_for_termination()


def _start(role: str, target: str = "") -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.forward", "--serve", role, str(port), target],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    wait_for_port(port, 30)
    return process, f"{HOST}:{port}"


# -- the loads ------------------------------------------------------------------------------


Load = Callable[[grpc.aio.Channel, int], Awaitable[list[float]]]


async def unary_one_at_a_time(
    channel: grpc.aio.Channel, count: int, method: str = UNARY
) -> list[float]:
    """*count* unary calls in sequence; the latency of each."""
    call = channel.unary_unary(method)
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        await call(PAYLOAD)
        latencies.append(time.perf_counter() - started)
    return latencies


async def unary_in_flight(
    channel: grpc.aio.Channel, count: int, in_flight: int = 64, method: str = UNARY
) -> list[float]:
    """*count* unary calls, *in_flight* at a time."""
    call = channel.unary_unary(method)

    async def worker(share: int) -> None:
        for _ in range(share):
            await call(PAYLOAD)

    await asyncio.gather(*(worker(count // in_flight) for _ in range(in_flight)))
    return []


async def bidi(channel: grpc.aio.Channel, count: int, streams: int = 1) -> list[float]:
    """*count* messages over *streams* bidi streams, WINDOW requests written ahead."""
    talk = channel.stream_stream(BIDI)

    async def stream(share: int) -> None:
        call = talk()
        for _ in range(min(WINDOW, share)):
            await call.write(PAYLOAD)
        for sent in range(WINDOW, share + WINDOW):
            await call.read()
            if sent < share:
                await call.write(PAYLOAD)
        await call.done_writing()
        await call.code()

    await asyncio.gather(*(stream(count // streams) for _ in range(streams)))
    return []


async def bidi_100(channel: grpc.aio.Channel, count: int) -> list[float]:
    return await bidi(channel, count, streams=100)


async def unary_as_stream(channel: grpc.aio.Channel, count: int) -> list[float]:
    return await unary_in_flight(channel, count, method=STREAM)


LOADS: tuple[tuple[str, Load, int], ...] = (
    ("unary, 1 at a time", unary_one_at_a_time, 2_000),
    ("unary, 64 in flight", unary_in_flight, 10_240),
    ("unary, 64 in flight, relayed as a stream", unary_as_stream, 10_240),
    ("bidi, 1 stream", bidi, 20_000),
    ("bidi, 100 streams", bidi_100, 40_000),
)


async def measure(address: str, load: Load, count: int, pid: int | None) -> dict[str, float]:
    """Run *load* against *address* (a warm-up tenth first); rate, CPU of *pid*."""
    async with grpc.aio.insecure_channel(address) as channel:
        await load(channel, max(count // 10, 100))
        cpu = cpu_seconds(pid) if pid else 0.0
        started = time.perf_counter()
        latencies = sorted(await load(channel, count))
        elapsed = time.perf_counter() - started
        cpu = (cpu_seconds(pid) - cpu) if pid else 0.0
    return {
        "rate": count / elapsed,
        "cpu_us": cpu / count * 1e6,
        "p50_ms": percentile(latencies, 50) * 1e3 if latencies else float("nan"),
        "p99_ms": percentile(latencies, 99) * 1e3 if latencies else float("nan"),
    }


async def bench() -> list[tuple[str, dict[str, float], dict[str, float]]]:
    echo, echo_address = _start("echo")
    forward, forward_address = _start("forward", echo_address)
    try:
        rows = []
        for name, load, count in LOADS:
            direct = await measure(echo_address, load, count, None)
            forwarded = await measure(forward_address, load, count, forward.pid)
            rows.append((name, direct, forwarded))
        return rows
    finally:
        for process in (forward, echo):
            process.terminate()
            process.wait(10)


def table(rows: Sequence[tuple[str, dict[str, float], dict[str, float]]]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| load | direct msg/s | forwarded msg/s | forwarder CPU per message | latency p50 / p99 "
        "direct → forwarded |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name, direct, forwarded in rows:
        latency = (
            f"{direct['p50_ms']:.2f} / {direct['p99_ms']:.2f} ms → "
            f"{forwarded['p50_ms']:.2f} / {forwarded['p99_ms']:.2f} ms"
            if direct["p50_ms"] == direct["p50_ms"]  # not NaN
            else "-"
        )
        lines.append(
            f"| {name} | {direct['rate']:,.0f} | {forwarded['rate']:,.0f} | "
            f"{forwarded['cpu_us']:.0f} µs | {latency} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.forward", description=__doc__)
    parser.add_argument(
        "--serve", nargs=3, metavar=("ROLE", "PORT", "TARGET"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    from gyoza.server.app import run_event_loop

    if args.serve:
        role, port, target = args.serve
        run_event_loop(_serve(role, int(port), target))
        return
    print(table(asyncio.run(bench())))


if __name__ == "__main__":
    main()
