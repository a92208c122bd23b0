"""The benchmark's figures as a console table, ``docs/benchmarks.md`` and README's
"Benchmarks" section."""

from __future__ import annotations

import math
import os
import platform
import re
import sqlite3
from importlib import metadata
from pathlib import Path
from typing import Any

#: Targets the figures are held against.
TARGET_LIFECYCLES = 2000.0
TARGET_P99_MS = 10.0

#: The command that produced the figures.
COMMAND = "make bench"


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            kib = int(meminfo.readline().split()[1])
            memory = f"{kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "?"

    return {
        "cpu": f"{model}, {os.cpu_count()} cores",
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
        "sqlalchemy": version("sqlalchemy"),
        "sqlite": sqlite3.sqlite_version,
    }


def _ms(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def _mib(value: float) -> str:
    return f"{value / 1024 / 1024:.1f} MiB"


def _kib(value: float) -> str:
    return f"{value / 1024:.0f} KiB"


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _latency_row(what: str, summary: dict[str, float]) -> tuple[str, str, str]:
    p99 = summary["p99_ms"]
    return (
        f"{what}, p50 / p99",
        f"{_ms(summary['p50_ms'])} / {_ms(p99)}",
        f"p99 <= {TARGET_P99_MS:.0f} ms: {_verdict(p99 <= TARGET_P99_MS)}",
    )


def rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(what, figure, target)`` rows of the summary table."""
    config = results["config"]
    life = results["lifecycles"]
    single = results["single"]
    watch = results["watch"]
    memory = results["memory"]
    cpu = life["cpu_percent"]
    batch = f"{life['completed']} runs"
    if life.get("cut_short"):
        batch += f" in the {config['runs_max_s']:.0f} s limit"
    in_flight = f"{config['concurrency']} in flight"
    light = f"{config['watch_concurrency']} in flight, sleep_ms {config['watch_sleep_ms']}"

    def per_lifecycle(key: str) -> str:
        if not life["per_second"]:
            return "n/a"
        return f"{10 * cpu.get(key, 0) / life['per_second']:.1f} ms"

    out = [
        (
            f"full lifecycles/s ({batch}, {in_flight}, {config['agents']} agents)",
            f"{life['per_second']:.0f}/s",
            f">= {TARGET_LIFECYCLES:.0f}/s: {_verdict(life['per_second'] >= TARGET_LIFECYCLES)}",
        ),
        (
            "  CPU meanwhile, % of a core: server / agents / clients / other processes",
            " / ".join(f"{cpu.get(k, 0):.0f}%" for k in ("server", "agents", "clients", "others")),
            "",
        ),
        (
            "  CPU per lifecycle: server / agents",
            f"{per_lifecycle('server')} / {per_lifecycle('agents')}",
            "",
        ),
    ]
    batch_profiled = results.get("profile", {}).get("batch")
    if batch_profiled:
        out.append(
            (
                "  lifecycles/s with py-spy attached to the server",
                f"{batch_profiled['per_second']:.0f}/s",
                "",
            )
        )
    out += [
        _latency_row(f"dispatch latency, {in_flight}", life["dispatch_latency"]),
        _latency_row(f"PROGRESS → topic subscriber, {in_flight}", life["topic_event_latency"]),
        (
            f"CreateOpRun call, {in_flight}, p50 / p99",
            f"{_ms(life['create_latency']['p50_ms'])} / {_ms(life['create_latency']['p99_ms'])}",
            "",
        ),
        _latency_row(f"dispatch latency, {light}", watch["dispatch_latency"]),
        _latency_row(f"PROGRESS → WatchOpRun client, {light}", watch["event_latency"]),
        _latency_row("dispatch latency, 1 in flight", single["dispatch_latency"]),
        _latency_row("PROGRESS → topic subscriber, 1 in flight", single["topic_event_latency"]),
        (
            "whole lifecycle, 1 in flight (create → COMPLETED on the topic)",
            _ms(1000 / single["per_second"]) if single["per_second"] else "n/a",
            "",
        ),
        ("server RSS just started, no agent", _mib(memory["rss_start"]), ""),
        ("server RSS, no agent connected (after the runs)", _mib(memory["rss_zero_agents"]), ""),
        (
            f"server RSS, {memory['idle_agents']} idle agents connected",
            _mib(memory["rss_idle_agents"]),
            "",
        ),
        ("  server RSS per idle agent", _kib(memory["per_agent"]), ""),
    ]
    if "heartbeat_cpu_us" in memory:
        out.append(
            (
                f"server CPU, {memory['idle_agents']} idle agents (heartbeats every 5 s)",
                f"{memory['server_cpu_percent_idle_agents']:.1f}% of a core "
                f"({memory['heartbeat_cpu_us']:.0f} us per heartbeat)",
                "",
            )
        )
    return out


def table(results: dict[str, Any]) -> str:
    """The summary as a plain-text table."""
    data = rows(results)
    widths = [max(len(r[i]) for r in data) for i in range(3)]
    header = ("what", "measured", "target")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
    line = "-+-".join("-" * w for w in widths)
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    out += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in data]
    return "\n".join(out)


#: Rows README leaves out (details on docs/benchmarks.md).
_README_SKIP = ("CreateOpRun", "CPU meanwhile", "py-spy", "just started", "no agent connected")


def markdown_table(results: dict[str, Any], *, short: bool = False) -> str:
    """The summary as a Markdown table (*short*: the headline rows only)."""
    out = ["| what | measured | target |", "| --- | --- | --- |"]
    for what, figure, target in rows(results):
        if short and any(word in what for word in _README_SKIP):
            continue
        out.append(f"| {what.strip()} | {figure} | {target} |")
    return "\n".join(out)


def profile_lines(results: dict[str, Any], top: int = 12) -> list[str]:
    """The profile's hottest functions, as Markdown list items."""
    summary = results.get("profile", {}).get("summary")
    if not summary:
        return ["(no profile: " + "; ".join(results.get("profile", {}).get("errors", [])) + ")"]
    out = [
        f"Samples: {summary['samples']} (py-spy `--gil`, 100 Hz: the thread holding the GIL).",
        "",
    ]
    out.append("Where the server's GIL time goes, by the frame on top of the stack:")
    out.append("")
    for name, _, share in summary["areas"]:
        out.append(f"- {name}: {share:.1f}%")
    out.append("")
    out.append("Hottest functions, self time (on top of the stack):")
    out.append("")
    for name, _, share in summary["self_top"][:top]:
        out.append(f"- {share:.1f}% `{name}`")
    out.append("")
    out.append("Hottest gyoza functions, total time (anywhere in the stack):")
    out.append("")
    gyoza = [row for row in summary["total_top"] if "gyoza/" in row[0]]
    for name, _, share in gyoza[:top]:
        out.append(f"- {share:.1f}% `{name}`")
    return out


def curve_section(results: dict[str, Any]) -> list[str]:
    """The cost curve's lines (none when the run measured no curve)."""
    points = results.get("curve") or []
    if not points:
        return []
    config = results["config"]
    slots = int(config["agents"] * config["agent_cpu"])
    lines = [
        "## Cost curve",
        "",
        f"The same lifecycle, {points[0]['runs']} runs per point, on the same server and agents "
        f"({config['agents']} agents of {config['agent_cpu']:g} cores: above {slots} in flight, "
        "runs queue for a slot).",
        "",
        "| runs in flight | lifecycles/s | CPU per lifecycle: server / agents "
        "| PROGRESS → topic p50 / p99 | CreateOpRun p99 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for point in points:
        cpu = point["cpu_ms_per_lifecycle"]
        topic = point["topic_event_latency"]
        lines.append(
            f"| {point['concurrency']} | {point['per_second']:.0f}/s "
            f"| {cpu['server']:.2f} ms / {cpu['agents']:.2f} ms "
            f"| {topic['p50_ms']:.1f} ms / {topic['p99_ms']:.1f} ms "
            f"| {point['create_latency']['p99_ms']:.1f} ms |"
        )
    return [*lines, ""]


def benchmarks_md(results: dict[str, Any], notes: str = "") -> str:
    """The whole ``docs/benchmarks.md``."""
    config = results["config"]
    info = machine()
    if "python_speed" in results:
        info["python speed"] = (
            f"{results['python_speed']:.1f} M iterations/s of `total += i * i` "
            "(one core, before the benchmark)"
        )
    life = results["lifecycles"]
    watch = results["watch"]
    memory = results["memory"]
    out = [
        "# Benchmarks",
        "",
        f"Measured with `{COMMAND}` (`.venv/bin/python -m bench`), which writes this page.",
        "Every figure comes from one run of it; run it again to measure your machine.",
        "",
        "## Machine",
        "",
        *(f"- {key}: {value}" for key, value in info.items()),
        "",
        "## Results",
        "",
        markdown_table(results),
        "",
        *curve_section(results),
        "## How it measures",
        "",
        "One server process, started as",
        "",
        "```sh",
        " ".join(_portable(part) for part in results["server_command"]),
        "```",
        "",
        f"(SQLite in a temporary directory, `--log-level {config['server_log_level']}`). The",
        "simulated agents run in one separate process (`python -m bench.fleet`): real",
        "`gyoza.agent.daemon.Agent`s, each with its own stream (one HTTP/2 connection each),",
        "its own outbox (SQLite, `synchronous=NORMAL`) and state directory, sharing one event",
        "loop and playing runs with the scripted executor. The clients run in the benchmark",
        "process with `grpc.aio` stubs. The three processes share the machine's cores; all",
        "traffic is on 127.0.0.1.",
        "",
        "- **Lifecycles/s.** Every run is ad hoc (`sleep_ms` 0, `progress_steps` 3, one CPU",
        '  core reserved, `event_delivery.topic = "bench"`): create, assigned, STARTED,',
        "  3 x (log line, PROGRESS), COMPLETED, every report written to the agent's outbox,",
        f"  committed by the server and acknowledged. Clients keep {config['concurrency']} runs in",
        "  flight: each creates a run, waits for its terminal event on one `SubscribeEvents`",
        "  stream on the topic, then creates the next. After "
        f"{config['warmup_runs']} warm-up runs, the",
        f"  batch of {config['runs']} runs is timed from the first create to the last",
        "  terminal event: completed runs / wall time.",
        "- **Dispatch latency.** The client notes `time.time_ns()` before each `CreateOpRun`;",
        "  the agent notes it when the Assignment reaches its handler (`on_assignment`,",
        "  decoded off the stream). Same machine, same clock.",
        "- **Event latency.** The bench's scripted executor stamps each PROGRESS event's",
        "  payload with `time.time_ns()` as it emits it (before the outbox commit and the",
        "  send); the receiving client subtracts the stamp from its own clock. Measured on",
        "  the topic stream under full load and with one run in flight, and on",
        "  `WatchOpRun` streams (one per run, opened right after the create) at light load:",
        f"  {config['watch_concurrency']} runs in flight with `sleep_ms` "
        f"{config['watch_sleep_ms']}, so that the PROGRESS",
        "  events come after the watch's snapshot (only changes newer than the snapshot",
        "  count).",
        f"- **One in flight.** {config['single_runs']} runs one after the other: the latency",
        "  floor, with nothing queued anywhere.",
        "- **Memory.** Server RSS (`VmRSS` in `/proc/<pid>/status`, median of several",
        "  samples) with no agent connected after the runs, then with "
        f"{memory['idle_agents']} idle agents",
        "  connected (heartbeating, no runs); the difference divided by the agent count.",
        "",
        "## Details",
        "",
        f"- Lifecycle batch: {life['completed']} completed, {life['failed']} failed, "
        f"{life['error_count']} client errors, {life['wall_s']:.2f} s.",
        "- Server CPU by thread during the batch (% of one core): "
        + ", ".join(
            f"{role} {share:.0f}%"
            for role, share in life.get("server_threads_cpu_percent", {}).items()
            if share >= 0.5
        )
        + ".",
        "- Other processes on the machine used "
        f"{life['cpu_percent'].get('others', 0):.0f}% of a core during the batch "
        f"(load average {life['cpu_percent'].get('load_average', 0):.1f} at its end).",
        f"- Watch phase: {watch['completed']} of {watch['runs']} runs completed, "
        f"{watch['event_latency']['count']} live PROGRESS samples, "
        f"{watch['error_count']} errors.",
        f"- Idle agents: outboxes open in {memory['agents_open_s']:.1f} s, all connected "
        f"{memory['agents_connect_s']:.1f} s later; server threads "
        f"{memory['threads_start']} at start, {memory['threads_idle_agents']} with "
        f"{memory['idle_agents']} agents.",
        "",
        "## Profile of the server under the lifecycle load",
        "",
        f"py-spy attached to the server for {config['profile_s']} s while the clients ran the same",
        "closed-loop load (flame graph: `/tmp/gyoza-bench-profile.svg`, collapsed stacks:",
        "`/tmp/gyoza-bench-profile.txt`).",
        "",
        *profile_lines(results),
        "",
    ]
    if notes:
        out += ["## Reading the figures", "", notes.strip(), ""]
    return "\n".join(out)


def _portable(part: str) -> str:
    """A command-line word with machine-specific paths shortened."""
    part = re.sub(r"^.*/python[0-9.]*$", "python", part)
    part = re.sub(r"sqlite:///.*/bench\.db", "sqlite:///$TMP/bench.db", part)
    return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:$PORT", part)


def readme_section(results: dict[str, Any]) -> str:
    """README's "Benchmarks" section (it runs to the end of the file)."""
    info = machine()
    return "\n".join(
        [
            "## Benchmarks",
            "",
            f"Measured with `{COMMAND}` on {info['cpu']}: one server process, one",
            "process of simulated agents and the clients share those cores, over loopback.",
            "Method, server profile and the other figures: [docs/benchmarks.md](docs/benchmarks.md).",
            "",
            markdown_table(results, short=True),
            "",
        ]
    )


KEPT_MARKER = "<!-- measured by hand: make bench keeps what follows -->"
"""Line of ``docs/benchmarks.md`` after which the page is not regenerated (figures of
other benchmarks: retention sweeps, the peer table)."""


def write_docs(results: dict[str, Any], repo: Path, notes: str = "") -> None:
    """Write ``docs/benchmarks.md`` (keeping what follows :data:`KEPT_MARKER`) and
    replace README's "Benchmarks" section."""
    page = repo / "docs" / "benchmarks.md"
    old = page.read_text(encoding="utf-8") if page.is_file() else ""
    kept = old[old.index(KEPT_MARKER) :] if KEPT_MARKER in old else KEPT_MARKER + "\n"
    page.write_text(benchmarks_md(results, notes).rstrip("\n") + "\n\n" + kept, encoding="utf-8")
    readme = repo / "README.md"
    text = readme.read_text(encoding="utf-8")
    marker = "\n## Benchmarks\n"
    index = text.find(marker)
    head = text if index < 0 else text[:index]
    readme.write_text(head.rstrip("\n") + "\n\n" + readme_section(results), encoding="utf-8")
