"""``python -m bench`` (``make bench``): gyoza's end-to-end benchmark.

Starts one server process, a process of simulated agents and grpc.aio clients, measures
full run lifecycles per second, dispatch and event latency, and server memory per idle
agent, profiles the server with py-spy, prints a table and writes ``docs/benchmarks.md``
and README's "Benchmarks" section. See :mod:`bench.runner` for the phases.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import python_speed
from bench.processes import REPO
from bench.report import table, write_docs
from bench.runner import BenchConfig, run_bench

#: Interpretation kept with the generated page (bench/notes.md).
NOTES = Path(__file__).with_name("notes.md")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags."""
    default = BenchConfig()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=default.runs, help="measured batch size")
    parser.add_argument("--warmup-runs", type=int, default=default.warmup_runs)
    parser.add_argument(
        "--concurrency", type=int, default=default.concurrency, help="runs in flight"
    )
    parser.add_argument("--agents", type=int, default=default.agents, help="working agents")
    parser.add_argument(
        "--agent-cpu",
        type=float,
        default=default.agent_cpu,
        help="CPU cores each working agent declares (each run reserves one)",
    )
    parser.add_argument("--idle-agents", type=int, default=default.idle_agents)
    parser.add_argument("--single-runs", type=int, default=default.single_runs)
    parser.add_argument("--watch-runs", type=int, default=default.watch_runs)
    parser.add_argument("--watch-concurrency", type=int, default=default.watch_concurrency)
    parser.add_argument("--watch-sleep-ms", type=int, default=default.watch_sleep_ms)
    parser.add_argument("--profile-seconds", type=int, default=default.profile_s)
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy phase")
    parser.add_argument(
        "--server-log-level", default=default.server_log_level, help="the server's --log-level"
    )
    parser.add_argument(
        "--topic-batch",
        type=int,
        default=default.topic_batch,
        help="max_batch of the clients' SubscribeEvents stream (1: one record a message)",
    )
    parser.add_argument(
        "--agent-coalesce-ms",
        type=float,
        default=default.agent_coalesce_ms,
        help="the working agents' report coalescing under load (0: off)",
    )
    parser.add_argument(
        "--curve-runs",
        type=int,
        default=default.curve_runs,
        help="runs per point of the cost curve (1, 4, 32, 128 in flight); 0: no curve",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small smoke run (few runs and agents); implies --no-docs",
    )
    parser.add_argument(
        "--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md and README"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--json",
        type=Path,
        default=REPO / ".tmp" / "bench" / "results.json",
        help="where the raw figures go",
    )
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> BenchConfig:
    """The configuration the flags describe."""
    if args.quick:
        return BenchConfig(
            runs=300,
            warmup_runs=50,
            concurrency=args.concurrency,
            agents=4,
            idle_agents=50,
            single_runs=30,
            watch_runs=40,
            watch_concurrency=args.watch_concurrency,
            watch_sleep_ms=args.watch_sleep_ms,
            profile_s=4,
            profile=not args.no_profile,
            server_log_level=args.server_log_level,
            topic_batch=args.topic_batch,
            agent_coalesce_ms=args.agent_coalesce_ms,
            curve_runs=min(args.curve_runs, 60),
        )
    return BenchConfig(
        runs=args.runs,
        warmup_runs=args.warmup_runs,
        concurrency=args.concurrency,
        agents=args.agents,
        agent_cpu=args.agent_cpu,
        idle_agents=args.idle_agents,
        single_runs=args.single_runs,
        watch_runs=args.watch_runs,
        watch_concurrency=args.watch_concurrency,
        watch_sleep_ms=args.watch_sleep_ms,
        profile_s=args.profile_seconds,
        profile=not args.no_profile,
        server_log_level=args.server_log_level,
        topic_batch=args.topic_batch,
        agent_coalesce_ms=args.agent_coalesce_ms,
        curve_runs=args.curve_runs,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; the exit status."""
    args = parse_args(argv)
    config = config_from(args)
    workdir = Path(tempfile.mkdtemp(prefix="gyoza-bench-"))
    start = time.monotonic()
    speed = python_speed()
    try:
        results = asyncio.run(run_bench(config, workdir))
    except Exception as error:
        print(f"bench failed: {error}", file=sys.stderr)
        print(f"(logs kept in {workdir})", file=sys.stderr)
        return 1
    results["elapsed_s"] = time.monotonic() - start
    results["python_speed"] = speed
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print()
    print(table(results))
    print()
    summary = results.get("profile", {}).get("summary")
    if summary:
        print("server profile, self time (top 10):")
        for name, _, share in summary["self_top"][:10]:
            print(f"  {share:5.1f}%  {name}")
        print()
    print(f"figures: {args.json}   profile: {config.profile_svg}")
    print(f"took {results['elapsed_s']:.0f} s")
    if not (args.no_docs or args.quick):
        notes = NOTES.read_text(encoding="utf-8") if NOTES.is_file() else ""
        write_docs(results, REPO, notes)
        print("wrote docs/benchmarks.md and README.md's Benchmarks section")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
