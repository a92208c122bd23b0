"""The ``gyoza`` command end to end: a real server and a real agent, as subprocesses.

The server runs on a free port with a SQLite file and an API key; the agent uses the
scripted executor (``sleep_ms``, ``progress_steps``, ``exit_code``, ``outputs`` inputs),
so no Docker is needed. Every CLI call is a subprocess of the installed ``gyoza`` script,
checked for its exit code, its stdout and its one-line stderr.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from unittest.mock import ANY

import pytest

from gyoza.client import Client

API_KEY = "e2e-key"
AGENT = "e2e-agent"
_BIN = Path(sys.executable).parent / "gyoza"
GYOZA = (
    [str(_BIN)]
    if _BIN.exists()
    else [sys.executable, "-c", "from gyoza.cli.main import main; main()"]
)

GRPCURL = Path(sys.executable).with_name("grpcurl")

SLEEPER_YAML = """
name: {name}
image: gyoza-test/busybox:latest
description: A scripted op that sleeps and reports progress
inputs:
  sleep_ms: {{type: int, default: 100}}
  progress_steps: {{type: int, default: 2}}
  exit_code: {{type: int, default: 0}}
  outputs: {{type: object, default: {{}}}}
  label: {{type: string, description: free text}}
constraints: {{cpu: 0.5, ram_mb: 64}}
retry_policy: {{max_attempts: 1}}
event_delivery: {{topic: {name}-events, attributes: {{suite: e2e}}}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def listening(address: str) -> bool:
    """True once something accepts connections at ``HOST:PORT``."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), 0.5).close()
    except OSError:
        return False
    return True


@dataclass
class Daemon:
    """A ``gyoza server`` or ``gyoza agent`` subprocess with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log_file.close()


def start(name: str, args: list[str], tmp: Path) -> Daemon:
    log_path = tmp / f"{name}.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen([*GYOZA, *args], stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp)
    return Daemon(name, process, log_path, log_file)


def wait_for(what: str, check: Callable[[], bool], timeout: float, daemons: list[Daemon]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for daemon in daemons:
            if daemon.process.poll() is not None:
                pytest.fail(
                    f"{daemon.name} exited with {daemon.process.returncode}:\n{daemon.log()}"
                )
        if check():
            return
        time.sleep(0.1)
    logs = "\n".join(f"--- {d.name}\n{d.log()}" for d in daemons)
    pytest.fail(f"timed out waiting for {what}\n{logs}")


@dataclass
class Stack:
    """A running server and agent, and how to call the CLI against them."""

    address: str
    tmp: Path
    server: Daemon
    daemons: list[Daemon] = field(default_factory=list)

    def gyoza(self, *args: str, api_key: str | None = API_KEY, timeout: float = 60) -> Result:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GYOZA_")}
        env["GYOZA_SERVER"] = self.address
        if api_key is not None:
            env["GYOZA_API_KEY"] = api_key
        proc = subprocess.run(
            [*GYOZA, *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=self.tmp,
            timeout=timeout,
            check=False,
        )
        return Result(args, proc.returncode, proc.stdout, proc.stderr)

    def ok(self, *args: str, timeout: float = 60) -> Result:
        result = self.gyoza(*args, timeout=timeout)
        assert result.code == 0, result.explain()
        return result

    def grpcurl(self, method: str, body: dict[str, Any]) -> Any:
        proc = subprocess.run(
            [str(GRPCURL), "-plaintext", "-H", f"authorization: Bearer {API_KEY}",
             "-d", json.dumps(body), self.address, f"gyoza.api.v1.{method}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout)

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--output", "json").stdout)

    def deploy(self, name: str) -> dict[str, Any]:
        path = self.tmp / f"{name}.yaml"
        path.write_text(SLEEPER_YAML.format(name=name))
        data: dict[str, Any] = self.json("definitions", "deploy", "-f", str(path))["op_definition"]
        return data

    def create(self, *args: str) -> str:
        run_id: str = self.json("runs", "create", *args)["op_run"]["id"]
        return run_id

    def run(self, run_id: str) -> dict[str, Any]:
        data: dict[str, Any] = self.json("runs", "get", run_id)["op_run"]
        return data

    def wait_state(self, run_id: str, *states: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with Client(self.address, api_key=API_KEY, timeout=5) as client:
            while time.monotonic() < deadline:
                if client.get_run(run_id).state.value in states:
                    return
                time.sleep(0.05)
        pytest.fail(f"run {run_id} never reached {states}")

    def start_agent(self, name: str) -> Daemon:
        agent = start(
            name,
            [
                "agent",
                "--server",
                self.address,
                "--executor",
                "scripted",
                "--name",
                name,
                "--state-dir",
                str(self.tmp / name),
                "--gpus",
                "1x24G",
                "--cpu",
                "4",
                "--ram-mb",
                "8192",
            ],
            self.tmp,
        )
        self.daemons.append(agent)

        def connected() -> bool:
            with Client(self.address, api_key=API_KEY, timeout=5) as client:
                return any(
                    a.name == name and a.state.value == "CONNECTED" for a in client.list_agents()
                )

        wait_for(f"agent {name} to connect", connected, 30, [self.server, agent])
        return agent


@dataclass
class Result:
    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str

    def explain(self) -> str:
        return f"gyoza {' '.join(self.args)} exited {self.code}\n{self.stdout}\n{self.stderr}"

    def json_lines(self) -> list[Any]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("e2e")
    address = f"127.0.0.1:{free_port()}"
    server = start(
        "server",
        [
            "server",
            "--listen",
            address,
            "--database",
            f"sqlite:///{tmp}/g.db",
            "--api-key",
            API_KEY,
            "--log-format",
            "logfmt",
        ],
        tmp,
    )
    stack = Stack(address, tmp, server, [server])

    try:
        wait_for("the server to listen", lambda: listening(address), 30, [server])
        stack.start_agent(AGENT)
        yield stack
    finally:
        for daemon in reversed(stack.daemons):
            daemon.stop()


# ----------------------------------------------------------------------------------------
# definitions
# ----------------------------------------------------------------------------------------


def test_deploy_list_get_delete(stack: Stack) -> None:
    path = stack.tmp / "op.yaml"
    path.write_text(SLEEPER_YAML.format(name="e2e-defs"))
    first = stack.ok("definitions", "deploy", "-f", str(path))
    assert first.stdout == "deployed e2e-defs version 1 (gyoza-test/busybox:latest)\n"
    deployed = stack.json("definitions", "deploy", "-f", str(path))["op_definition"]
    assert deployed["version"] == "2"  # int64: a string in protobuf's JSON, as grpcurl says

    listed = stack.json("definitions", "list")["op_definitions"]
    assert {"name": "e2e-defs", "version": "2"} in [
        {"name": d["name"], "version": d["version"]} for d in listed
    ]
    versions = stack.json("definitions", "list", "--name", "e2e-defs")["op_definitions"]
    assert [d["version"] for d in versions] == ["2", "1"]
    table = stack.ok("definitions", "list").stdout
    assert "e2e-defs" in table and "NAME" in table

    got = stack.json("definitions", "get", "e2e-defs", "--version", "1")["op_definition"]
    assert got["version"] == "1"
    assert [i["name"] for i in got["inputs"]] == [
        "sleep_ms",
        "progress_steps",
        "exit_code",
        "outputs",
        "label",
    ]
    assert got["event_delivery"] == {"topic": "e2e-defs-events", "attributes": {"suite": "e2e"}}
    assert "sleep_ms" in stack.ok("definitions", "get", "e2e-defs").stdout

    assert stack.ok("definitions", "delete", "e2e-defs", "--version", "1").stdout == (
        "deleted version 1 of e2e-defs\n"
    )
    gone = stack.gyoza("definitions", "get", "e2e-defs", "--version", "1")
    assert gone.code == 2
    assert gone.stderr.startswith("gyoza: not found:")
    assert (
        stack.ok("definitions", "delete", "e2e-defs").stdout == "deleted 1 version(s) of e2e-defs\n"
    )


def test_bad_op_file_is_refused_naming_the_key(stack: Stack) -> None:
    path = stack.tmp / "bad.yaml"
    path.write_text("name: bad\nimage: busybox\ninputs:\n  steps: {type: integer}\n")
    result = stack.gyoza("definitions", "deploy", "-f", str(path))
    assert result.code == 2
    assert result.stderr == (
        f"gyoza: {path}: inputs.steps.type: expected one of string, int, float, bool, "
        "object, array, got 'integer'\n"
    )
    path.write_text("name: bad\nimage: [busybox\n")
    result = stack.gyoza("definitions", "deploy", "-f", str(path))
    assert result.code == 2
    assert result.stderr.startswith(f"gyoza: {path}: not valid YAML: line 3")
    missing = stack.gyoza("definitions", "deploy", "-f", str(stack.tmp / "nope.yaml"))
    assert missing.code == 2
    assert "cannot read the file" in missing.stderr


# ----------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------


def test_create_with_inputs_and_watch_to_completion(stack: Stack) -> None:
    stack.deploy("e2e-watch")
    result = stack.gyoza(
        "runs",
        "create",
        "--definition",
        "e2e-watch",
        "--input",
        "sleep_ms=300",
        "--input",
        "progress_steps=3",
        "--input",
        'outputs={"answer": 42, "words": ["a", "b"]}',
        "--input",
        "label=007",
        "--priority",
        "3",
        "--watch",
        "--output",
        "json",
    )
    assert result.code == 0, result.explain()
    lines = result.json_lines()
    # The snapshot comes first, with the whole run; then one line per change.
    snapshot = lines[0]["op_run"]
    assert "event" not in lines[0]
    assert all(set(line) == {"sequence", "event"} for line in lines[1:])
    final = stack.run(snapshot["id"])
    assert final["state"] == "OP_RUN_STATE_COMPLETED"
    assert final["outputs"] == {"answer": 42, "words": ["a", "b"]}
    assert lines[-1]["event"]["payload"]["outputs"] == {"answer": 42, "words": ["a", "b"]}
    assert final["inputs"] == {
        "sleep_ms": 300,
        "progress_steps": 3,
        "exit_code": 0,
        "outputs": {"answer": 42, "words": ["a", "b"]},
        "label": "007",  # a string input keeps the text as typed
    }
    assert final["priority"] == 3
    assert final["op_definition"] == "e2e-watch"
    types = [line["event"]["type"] for line in lines[1:]]
    assert types[0] == "EVENT_TYPE_ASSIGNED"
    assert types.count("EVENT_TYPE_PROGRESS") == 3
    assert types[-1] == "EVENT_TYPE_COMPLETED"
    sequences = [int(line["sequence"]) for line in lines[1:]]
    assert sequences == sorted(sequences)
    progress = [line["event"] for line in lines[1:] if line["event"]["type"].endswith("PROGRESS")]
    assert [(e["progress"], e["message"]) for e in progress] == [
        (33, "step 1/3"),
        (67, "step 2/3"),
        (100, "step 3/3"),
    ]

    # Watching a run that is over replays its timeline and exits at once.
    watched = stack.ok("runs", "watch", final["id"])
    assert "COMPLETED" in watched.stdout
    assert '"answer": 42' in watched.stdout
    assert "PROGRESS" in watched.stdout


def test_create_prints_the_run_and_takes_resources(stack: Stack) -> None:
    stack.deploy("e2e-create")
    created = stack.ok(
        "runs", "create", "--definition", "e2e-create", "--cpu", "1", "--ram-mb", "256",
        "--topic", "other-topic", "--request-id", "req-e2e-1",
    )  # fmt: skip
    assert created.stdout.startswith("created run_")
    run_id = created.stdout.split()[1]
    run = stack.run(run_id)
    # Overrides start from the definition's settings (cpu 0.5, ram 64 there).
    assert run["constraints"]["cpu"] == 1
    assert run["constraints"]["ram_mb"] == "256"
    assert run["event_delivery"] == {"topic": "other-topic", "attributes": {"suite": "e2e"}}
    assert run["request_id"] == "req-e2e-1"
    same = (
        "runs", "create", "--definition", "e2e-create", "--cpu", "1", "--ram-mb", "256",
        "--topic", "other-topic", "--request-id", "req-e2e-1",
    )  # fmt: skip
    again = stack.json(*same)
    assert again["op_run"]["id"] == run_id  # the same request_id: the same run
    assert again["existing"] is True
    said = stack.ok(*same).stdout
    assert said.startswith(f"exists {run_id} (")
    assert "request id req-e2e-1 was used before" in said
    assert "existing" not in stack.json("runs", "create", "--definition", "e2e-create")


def test_failed_run_exits_1(stack: Stack) -> None:
    stack.deploy("e2e-fail")
    result = stack.gyoza(
        "runs", "create", "--definition", "e2e-fail", "--input", "exit_code=3", "--watch"
    )
    assert result.code == 1, result.explain()
    assert "FAILED" in result.stdout
    assert "exit code 3" in result.stdout
    run_id = re.search(r"\brun_\w+", result.stdout).group(0)  # type: ignore[union-attr]
    detail = stack.ok("runs", "get", run_id).stdout
    (state_line,) = [line for line in detail.splitlines() if line.startswith("state")]
    assert "FAILED" in state_line and "exit code 3" in state_line
    assert run_id not in state_line  # the id has its own line


def test_watch_follows_automatic_retries(stack: Stack) -> None:
    # An ad-hoc run takes the default retry policy: 3 attempts, EXIT_CODE retried after
    # 1 s, then 2 s.
    result = stack.gyoza(
        "runs", "create", "--image", "e2e/flaky", "--input", "exit_code=2",
        "--input", "sleep_ms=10", "--watch", "--output", "json",
    )  # fmt: skip
    assert result.code == 1, result.explain()
    lines = result.json_lines()
    final = stack.run(lines[0]["op_run"]["id"])
    assert final["state"] == "OP_RUN_STATE_FAILED"
    assert final["current_attempt"] == 3
    assert [line["event"]["attempt"] for line in lines[1:]][-1] == 3
    attempts = stack.json("runs", "attempts", final["id"])["attempts"]
    assert [a["state"] for a in attempts] == ["OP_RUN_STATE_FAILED"] * 3


def test_wrong_input_type_is_refused(stack: Stack) -> None:
    stack.deploy("e2e-types")
    local = stack.gyoza("runs", "create", "--definition", "e2e-types", "--input", "sleep_ms=soon")
    assert local.code == 2
    assert local.stderr == "gyoza: --input sleep_ms: expected int (a whole number), got 'soon'\n"
    remote = stack.gyoza(
        "runs", "create", "--definition", "e2e-types", "--inputs-json", '{"sleep_ms": "soon"}'
    )
    assert remote.code == 2
    assert remote.stderr.startswith("gyoza: invalid argument:")
    assert "inputs.sleep_ms" in remote.stderr
    assert remote.stderr.count("\n") == 1
    unknown = stack.gyoza("runs", "create", "--definition", "e2e-nope", "--input", "a=1")
    assert unknown.code == 2
    assert unknown.stderr.startswith("gyoza: not found:")


def test_list_with_filters(stack: Stack) -> None:
    stack.deploy("e2e-list")
    for _ in range(3):
        stack.ok("runs", "create", "--definition", "e2e-list", "--watch")
    stack.ok("runs", "create", "--image", "e2e/list-image", "--watch")

    listed = stack.json("runs", "list", "--definition", "e2e-list")
    assert "next_page_token" not in listed
    by_definition = listed["op_runs"]
    assert len(by_definition) == 3
    assert {r["op_definition"] for r in by_definition} == {"e2e-list"}
    created = [r["create_time"] for r in by_definition]
    assert created == sorted(created, reverse=True)  # newest first

    by_image = stack.json("runs", "list", "--image", "e2e/list-image", "--state", "completed")
    assert [r["image"] for r in by_image["op_runs"]] == ["e2e/list-image"]
    assert stack.json("runs", "list", "--image", "e2e/list-image", "--state", "FAILED") == {}
    oldest = stack.json("runs", "list", "--definition", "e2e-list", "--oldest-first")["op_runs"]
    assert [r["id"] for r in oldest] == [r["id"] for r in reversed(by_definition)]

    # Paging: --limit stops with a token that goes on exactly after the last run shown.
    first = stack.json("runs", "list", "--definition", "e2e-list", "--limit", "2")
    assert [r["id"] for r in first["op_runs"]] == [r["id"] for r in by_definition[:2]]
    rest = stack.json(
        "runs", "list", "--definition", "e2e-list", "--page-token", first["next_page_token"]
    )
    assert [r["id"] for r in rest["op_runs"]] == [by_definition[2]["id"]]
    paged = stack.ok("runs", "list", "--definition", "e2e-list", "--limit", "1")
    assert paged.stderr.startswith("more runs: --page-token ")
    assert paged.stdout.count("COMPLETED") == 1

    # Times: ISO 8601 (an offset, or local time) or a duration ago.
    middle = by_definition[1]["create_time"]
    after = stack.json("runs", "list", "--definition", "e2e-list", "--created-after", middle)
    assert [r["id"] for r in after["op_runs"]] == [r["id"] for r in by_definition[:2]]
    before = stack.json("runs", "list", "--definition", "e2e-list", "--created-before", middle)
    assert [r["id"] for r in before["op_runs"]] == [by_definition[2]["id"]]
    recent = stack.json("runs", "list", "--definition", "e2e-list", "--created-after", "1h")
    assert len(recent["op_runs"]) == 3
    assert stack.json("runs", "list", "--created-before", "2000-01-01") == {}
    bad = stack.gyoza("runs", "list", "--created-after", "yesterday")
    assert bad.code == 2
    assert "'yesterday' is not a time" in bad.stderr

    table = stack.ok("runs", "list", "--definition", "e2e-list").stdout
    assert table.splitlines()[0].split()[:3] == ["ID", "STATE", "OP"]
    assert table.count("COMPLETED") == 3
    empty = stack.gyoza("runs", "list", "--definition", "e2e-none")
    assert (empty.code, empty.stdout, empty.stderr) == (0, "", "no runs\n")


def test_get_events_and_attempts(stack: Stack) -> None:
    stack.deploy("e2e-get")
    run_id = stack.create("--definition", "e2e-get", "--input", "progress_steps=2")
    stack.ok("runs", "watch", run_id)
    run = stack.run(run_id)
    assert run["id"] == run_id
    assert run["execution_summary"]["worker_id"] == AGENT
    assert [e["type"] for e in run["events"]][-1] == "EVENT_TYPE_COMPLETED"
    events = stack.json("runs", "events", run_id)["events"]
    assert [e["seq"] for e in events] == [str(n) for n in range(1, len(events) + 1)]
    assert {e["attempt"] for e in events} == {1}
    assert all(e["time"] <= e["apply_time"] for e in events)
    attempts = stack.json("runs", "attempts", run_id)["attempts"]
    assert attempts[0]["state"] == "OP_RUN_STATE_COMPLETED"
    # The JSON is the API's message exactly as grpcurl prints it.
    for method, body, command in (
        ("OpRunService/GetOpRun", {"run_id": run_id}, ("runs", "get", run_id)),
        ("OpRunService/ListOpRunEvents", {"run_id": run_id}, ("runs", "events", run_id)),
        ("OpRunService/ListOpRunAttempts", {"run_id": run_id}, ("runs", "attempts", run_id)),
        (
            "DefinitionService/GetOpDefinition",
            {"name": "e2e-get"},
            ("definitions", "get", "e2e-get"),
        ),
    ):
        assert stack.grpcurl(method, body) == stack.json(*command), method
    detail = stack.ok("runs", "get", run_id).stdout
    assert run_id in detail and "COMPLETED" in detail and AGENT in detail
    assert "ASSIGNED" in stack.ok("runs", "events", run_id).stdout
    assert "COMPLETED" in stack.ok("runs", "attempts", run_id).stdout


def test_follow_logs(stack: Stack) -> None:
    stack.deploy("e2e-logs")
    run_id = stack.create(
        "--definition", "e2e-logs", "--input", "sleep_ms=1500", "--input", "progress_steps=3"
    )
    followed = stack.ok("runs", "logs", run_id, "-f")
    assert followed.stdout.splitlines() == ["step 1/3", "step 2/3", "step 3/3"]
    assert stack.run(run_id)["state"] == "OP_RUN_STATE_COMPLETED"
    lines = stack.gyoza("runs", "logs", run_id, "--output", "json").json_lines()
    assert [(line["attempt"], line["lines"]) for line in lines] == [
        (1, [{"number": "1", "text": "step 1/3", "stream": "LOG_STREAM_STDOUT", "time": ANY}]),
        (1, [{"number": "2", "text": "step 2/3", "stream": "LOG_STREAM_STDOUT", "time": ANY}]),
        (1, [{"number": "3", "text": "step 3/3", "stream": "LOG_STREAM_STDOUT", "time": ANY}]),
    ]


def test_cancel_then_retry(stack: Stack) -> None:
    stack.deploy("e2e-cancel")
    run_id = stack.create("--definition", "e2e-cancel", "--input", "sleep_ms=120000")
    stack.wait_state(run_id, "RUNNING")
    cancelled = stack.ok("runs", "cancel", run_id, "--reason", "e2e")
    assert cancelled.stdout.startswith(f"cancel requested for {run_id}")
    watched = stack.gyoza("runs", "watch", run_id)
    assert watched.code == 1, watched.explain()
    assert "CANCELLED" in watched.stdout
    again = stack.gyoza("runs", "cancel", run_id)
    assert again.code == 2
    assert "[RUN_LOCKED]" in again.stderr

    retried = stack.ok("runs", "retry", run_id)
    assert retried.stdout == f"retrying {run_id}: attempt 2 is PENDING\n"
    stack.wait_state(run_id, "RUNNING")
    busy = stack.gyoza("runs", "retry", run_id)
    assert busy.code == 2
    assert "[INVALID_TRANSITION]" in busy.stderr
    stack.ok("runs", "cancel", run_id)
    assert stack.gyoza("runs", "watch", run_id).code == 1
    attempts = stack.json("runs", "attempts", run_id)["attempts"]
    assert [(a["attempt"], a["state"]) for a in attempts] == [
        (1, "OP_RUN_STATE_CANCELLED"),
        (2, "OP_RUN_STATE_CANCELLED"),
    ]
    events = stack.json("runs", "events", run_id)["events"]
    assert next(e["type"] for e in events if e["attempt"] == 2) == "EVENT_TYPE_RETRIED"


def test_priority_of_a_pending_run(stack: Stack) -> None:
    # Four GPUs fit no agent: the run stays PENDING.
    run_id = stack.create("--image", "e2e/big", "--gpu-count", "4")
    assert stack.ok("runs", "priority", run_id, "7").stdout == f"{run_id} priority 7\n"
    assert stack.run(run_id)["priority"] == 7
    assert stack.ok("runs", "cancel", run_id).stdout == f"cancelled {run_id}\n"
    locked = stack.gyoza("runs", "priority", run_id, "1")
    assert locked.code == 2


def test_unknown_run_id_exits_2(stack: Stack) -> None:
    for command in ("get", "events", "attempts", "watch", "logs", "cancel", "retry"):
        result = stack.gyoza("runs", command, "run_000000000000")
        assert result.code == 2, result.explain()
        assert result.stderr.startswith("gyoza: not found:"), result.explain()
        assert result.stderr.count("\n") == 1


# ----------------------------------------------------------------------------------------
# as scripts and people use it: a watch across a server restart, log lines as they come,
# a closed pipe, global options after the command, gyoza dev keeping the terminal free
# ----------------------------------------------------------------------------------------


@dataclass
class Restartable:
    """A server (no API key) on a fixed address and database, and a scripted agent."""

    address: str
    tmp: Path
    server: Daemon
    agent: Daemon

    def start_server(self) -> None:
        self.server = start("server", self.server_args(), self.tmp)
        wait_for("the server to listen", lambda: listening(self.address), 30, [self.server])

    def server_args(self) -> list[str]:
        return [
            "server", "--listen", self.address, "--database", f"sqlite:///{self.tmp}/g.db",
            "--log-format", "logfmt",
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GYOZA_")}
        env["GYOZA_SERVER"] = self.address
        return env

    def run(self, *args: str, stdout: Any = subprocess.PIPE) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*GYOZA, *args],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(),
            cwd=self.tmp,
        )

    def ok(self, *args: str) -> str:
        proc = subprocess.run(
            [*GYOZA, *args], capture_output=True, text=True, env=self.env(), cwd=self.tmp,
            timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, f"gyoza {args}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
        return proc.stdout

    def create(self, inputs: dict[str, Any]) -> str:
        created = ("runs", "create", "--image", "scripted", "--inputs-json", json.dumps(inputs))
        data = json.loads(self.ok(*created, "-o", "json"))
        run_id: str = data["op_run"]["id"]
        return run_id

    def wait_state(self, run_id: str, state: str) -> None:
        def reached() -> bool:
            with Client(self.address, timeout=5) as client:
                return client.get_run(run_id).state.value == state

        wait_for(f"{run_id} {state}", reached, 30, [self.server, self.agent])


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[Restartable]:
    address = f"127.0.0.1:{free_port()}"
    placeholder = start("placeholder", ["--version"], tmp_path)
    placeholder.process.wait(30)
    placeholder.stop()
    stack = Restartable(address, tmp_path, placeholder, placeholder)
    stack.start_server()
    stack.agent = start(
        "agent",
        ["agent", "--server", address, "--executor", "scripted", "--name", "follow-agent",
         "--state-dir", str(tmp_path / "agent")],
        tmp_path,
    )  # fmt: skip
    try:
        yield stack
    finally:
        stack.agent.stop()
        stack.server.stop()


def _rest_of(proc: subprocess.Popen[str], timeout: float = 90) -> tuple[str, str]:
    """What a process still prints until it exits, once some of its stdout was read with
    readline (communicate() would skip what that read buffered)."""
    assert proc.stdout is not None and proc.stderr is not None
    with proc.stdout, proc.stderr:
        out = proc.stdout.read()
        err = proc.stderr.read()
    proc.wait(timeout)
    return out, err


def test_watch_follows_the_run_across_a_server_restart(restartable: Restartable) -> None:
    run_id = restartable.create({"sleep_ms": 4000, "progress_steps": 8})
    restartable.wait_state(run_id, "RUNNING")
    watch = restartable.run("runs", "watch", run_id, "-o", "json")
    assert watch.stdout is not None
    first = json.loads(watch.stdout.readline())  # the snapshot: the watch is on
    assert first["op_run"]["id"] == run_id

    restartable.server.process.send_signal(signal.SIGKILL)
    restartable.server.process.wait(10)
    restartable.server.stop()
    restartable.start_server()

    out, err = _rest_of(watch)
    assert watch.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    events = [line["event"] for line in lines]
    # Every event once, in order, across the restart: resumed from the last sequence seen.
    assert [int(e["seq"]) for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "EVENT_TYPE_COMPLETED"
    assert [e["progress"] for e in events if e["type"] == "EVENT_TYPE_PROGRESS"][-1] == 100
    assert "gyoza: lost the server" in err
    assert "gyoza: reconnected; resuming the watch" in err


def test_watch_with_logs_shows_the_lines_as_they_come(restartable: Restartable) -> None:
    run_id = restartable.create({"sleep_ms": 3000, "progress_steps": 3})
    watch = restartable.run("runs", "watch", run_id, "--logs", "-o", "json")
    assert watch.stdout is not None
    lines = []
    while not lines or "lines" not in lines[-1]:
        lines.append(json.loads(watch.stdout.readline()))
    assert lines[-1]["lines"][0]["text"] == "step 1/3"
    with Client(restartable.address, timeout=5) as client:
        assert client.get_run(run_id).state.value == "RUNNING"  # printed as it came
    out, err = _rest_of(watch)
    assert watch.returncode == 0, err
    lines += [json.loads(line) for line in out.splitlines()]
    logged = [line["lines"][0] for line in lines if "lines" in line]
    assert [(n["number"], n["text"]) for n in logged] == [
        ("1", "step 1/3"),
        ("2", "step 2/3"),
        ("3", "step 3/3"),
    ]
    events = [line["event"]["type"] for line in lines if "event" in line]
    assert events[-1] == "EVENT_TYPE_COMPLETED"

    table = restartable.ok("runs", "watch", run_id, "--logs")
    for text in ("step 1/3", "step 2/3", "step 3/3", "COMPLETED"):
        assert text in table


_PIPED_COMMANDS = [
    ("runs", "list"),
    ("runs", "list", "-o", "json"),
    ("runs", "get", "{run}"),
    ("runs", "get", "{run}", "-o", "json"),
    ("runs", "events", "{run}"),
    ("runs", "attempts", "{run}", "-o", "json"),
    ("runs", "logs", "{run}"),
    ("runs", "logs", "{run}", "-o", "json"),
    ("runs", "watch", "{run}"),
    ("runs", "watch", "{run}", "--logs", "-o", "json"),
    ("runs", "create", "--image", "scripted", "--watch"),
    ("agents", "list"),
    ("definitions", "list", "-o", "json"),
    ("events", "subscribe", "follow-topic", "--limit", "3"),
]


def test_a_closed_pipe_ends_every_command_quietly(restartable: Restartable) -> None:
    run_id = restartable.create({"sleep_ms": 10, "progress_steps": 3})
    restartable.ok("runs", "create", "--image", "scripted", "--topic", "follow-topic", "--watch")
    restartable.wait_state(run_id, "COMPLETED")
    for command in _PIPED_COMMANDS:
        read, write = os.pipe()
        os.close(read)  # as `| head -1` does once it has its line: every write fails
        try:
            proc = restartable.run(*(part.format(run=run_id) for part in command), stdout=write)
        finally:
            os.close(write)
        _, err = proc.communicate(timeout=60)
        said = "created run_" if command[1] == "create" else ""  # its notice, on stderr
        assert (proc.returncode, err[: len(said)], err.count("\n")) == (
            141,
            said,
            len(said) > 0,
        ), f"{command}: {err}"


def test_global_options_are_taken_after_the_command_too(restartable: Restartable) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GYOZA_")}
    address = restartable.address

    def gyoza(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*GYOZA, *args], capture_output=True, text=True, env=env, timeout=60, check=False
        )

    before = gyoza("--server", address, "--output", "json", "--timeout", "5", "runs", "list")
    after = gyoza("runs", "list", "--server", address, "--output", "json", "--timeout", "5")
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert json.loads(before.stdout) == json.loads(after.stdout)
    # After the command wins.
    table = gyoza("--output", "json", "runs", "list", "--server", address, "-o", "table")
    assert not table.stdout.startswith("{")
    bad = gyoza("runs", "list", "--server", address, "--timeout", "0")
    assert bad.returncode == 2


def test_dev_keeps_the_terminal_free_and_writes_logs_to_files(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    state = tmp_path / "dev-state"
    dev = subprocess.Popen(
        [*GYOZA, "dev", "--executor", "scripted", "--listen", address,
         "--database", f"sqlite:///{tmp_path}/dev.db", "--state-dir", str(state),
         "--ui-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        assert dev.stderr is not None
        said = [dev.stderr.readline() for _ in range(3)]
        assert said[0] == f"gyoza dev: logs in {state / 'server.log'} and {state / 'agent.log'}\n"
        assert said[1].startswith(f"gyoza dev: server on {address}")
        assert said[2].startswith("gyoza dev: dashboard on http://127.0.0.1:")
        with Client(address, timeout=10) as client:
            run = client.create_run(image="scripted", inputs={"progress_steps": 2})
            assert list(client.watch_run(run.id))[-1].run.state.value == "COMPLETED"
    finally:
        dev.send_signal(signal.SIGINT)
        out, err = dev.communicate(timeout=30)
    assert (out, err) == ("", "")  # nothing but the three lines above
    server_log = (state / "server.log").read_text()
    agent_log = (state / "agent.log").read_text()
    assert '"logger": "gyoza.server"' in server_log
    assert '"logger": "gyoza.agent' in agent_log
    assert '"logger": "gyoza.agent' not in server_log


# ----------------------------------------------------------------------------------------
# agents
# ----------------------------------------------------------------------------------------


def test_agents_list(stack: Stack) -> None:
    agents = stack.json("agents", "list")["agents"]
    mine = next(a for a in agents if a["name"] == AGENT)
    assert mine["state"] == "AGENT_STATE_CONNECTED"
    assert mine["capacity"]["cpu"] == 4
    assert mine["capacity"]["ram_mb"] == "8192"
    assert [g["vram_total_mb"] for g in mine["capacity"]["gpus"]] == ["24576"]
    table = stack.ok("agents", "list").stdout
    assert AGENT in table
    assert "24576/24576 MiB free" in table
    # One server, agents connected to it directly: no replica column.
    assert "REPLICA" not in table


def test_drain(stack: Stack) -> None:
    agent = stack.start_agent("e2e-drained")
    try:
        drained = stack.ok("agents", "drain", "e2e-drained")
        assert drained.stdout.startswith("draining e2e-drained")
        states = {a["name"]: a["state"] for a in stack.json("agents", "list")["agents"]}
        assert states["e2e-drained"] == "AGENT_STATE_DRAINING"
        assert states[AGENT] == "AGENT_STATE_CONNECTED"
    finally:
        agent.stop()
    unknown = stack.gyoza("agents", "drain", "e2e-nobody")
    assert unknown.code == 2
    assert unknown.stderr.startswith("gyoza: not found:")


# ----------------------------------------------------------------------------------------
# connection and credentials
# ----------------------------------------------------------------------------------------


def test_unreachable_server_exits_3(stack: Stack) -> None:
    address = f"127.0.0.1:{free_port()}"
    result = stack.gyoza("--server", address, "runs", "list")
    assert result.code == 3
    assert result.stderr.startswith(f"gyoza: cannot reach the gyoza server at {address}:")
    assert result.stderr.count("\n") == 1


def test_wrong_api_key_exits_3(stack: Stack) -> None:
    wrong = stack.gyoza("runs", "list", api_key="not-the-key")
    assert wrong.code == 3
    assert wrong.stderr.startswith(
        f"gyoza: the gyoza server at {stack.address} refused the credentials"
    )
    assert wrong.stderr.count("\n") == 1
    assert stack.gyoza("runs", "list", api_key=None).code == 3


# ----------------------------------------------------------------------------------------
# the Python client against the real server
# ----------------------------------------------------------------------------------------


def test_client_subscribe_and_watch(stack: Stack) -> None:
    stack.deploy("e2e-client")
    with Client(stack.address, api_key=API_KEY, timeout=10) as client:
        definition = client.get_definition("e2e-client")
        run = client.create_run(
            definition=definition.name, inputs={"sleep_ms": 100, "outputs": {"ok": True}}
        )
        changes = list(client.watch_run(run.id))
        assert changes[-1].run.state.value == "COMPLETED"
        assert changes[-1].run.outputs == {"ok": True}
        sequence, snapshot, event = changes[0]
        assert (sequence, snapshot.id, event) == (changes[0].sequence, run.id, None)

        seen = []
        for delivered in client.subscribe("e2e-client-events", timeout=30):
            if delivered.run_id != run.id:
                continue
            assert delivered.attributes == {"suite": "e2e"}
            seen.append(delivered.event.type)
            if delivered.event.type == "COMPLETED":
                break
        assert seen[0] == "ASSIGNED"
        assert seen[-1] == "COMPLETED"
        assert [e.event.type for e in client.list_events(run.id)] == seen


# ----------------------------------------------------------------------------------------
# TLS options
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls_stack(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[Stack]:
    """A server that requires client certificates signed by a test CA (no agent)."""
    tmp = tmp_path_factory.mktemp("mtls")
    for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key"):
        shutil.copy(pki / name, tmp / name)
    address = f"127.0.0.1:{free_port()}"
    server = start(
        "server",
        [
            "server", "--listen", address, "--database", f"sqlite:///{tmp}/g.db",
            "--api-key", API_KEY, "--tls-cert", str(tmp / "server.pem"),
            "--tls-key", str(tmp / "server.key"), "--tls-client-ca", str(tmp / "ca.pem"),
        ],
        tmp,
    )  # fmt: skip
    stack = Stack(address, tmp, server, [server])

    try:
        wait_for("the TLS server to listen", lambda: listening(address), 30, [server])
        yield stack
    finally:
        server.stop()


def test_tls_options(mtls_stack: Stack) -> None:
    tmp = mtls_stack.tmp
    ca = ("--tls-ca", str(tmp / "ca.pem"))
    client = ("--tls-cert", str(tmp / "client.pem"), "--tls-key", str(tmp / "client.key"))
    listed = mtls_stack.gyoza(*ca, *client, "runs", "list", "-o", "json")
    assert listed.code == 0, listed.explain()
    assert json.loads(listed.stdout) == {}
    # The options may follow the command too.
    assert mtls_stack.gyoza("runs", "list", *ca, *client).code == 0
    without_client_cert = mtls_stack.gyoza(*ca, "runs", "list")
    assert without_client_cert.code == 3
    assert without_client_cert.stderr.startswith("gyoza: cannot reach the gyoza server")
    plaintext = mtls_stack.gyoza("runs", "list")
    assert plaintext.code == 3
    half = mtls_stack.gyoza(*ca, "--tls-cert", str(tmp / "client.pem"), "runs", "list")
    assert half.code == 2
    assert half.stderr == (
        "gyoza: a client certificate needs its key: give both tls_cert and tls_key\n"
    )
    missing = mtls_stack.gyoza("--tls-ca", str(tmp / "nope.pem"), "runs", "list")
    assert missing.code == 2
    assert missing.stderr.startswith("gyoza: cannot read a TLS file:")


def test_events_subscribe_follows_a_topic(stack: Stack) -> None:
    run_id = stack.create(
        "--image", "scripted", "--inputs-json", '{"progress_steps": 2}', "--topic", "e2e-topic"
    )
    stack.wait_state(run_id, "COMPLETED")
    # ASSIGNED, STARTED, PROGRESS x2, COMPLETED: the backlog, then --limit ends the stream.
    result = stack.ok("events", "subscribe", "e2e-topic", "--limit", "5", "--output", "json")
    lines = result.json_lines()
    assert [line["run_id"] for line in lines] == [run_id] * 5
    assert [line["event"]["type"].removeprefix("EVENT_TYPE_") for line in lines] == [
        "ASSIGNED", "STARTED", "PROGRESS", "PROGRESS", "COMPLETED",
    ]  # fmt: skip
    offsets = [int(line["offset"]) for line in lines]
    assert offsets == sorted(offsets)
    # Resuming after the third event gives exactly the rest.
    rest = stack.ok(
        "events", "subscribe", "e2e-topic", "--after-offset", str(offsets[2]), "--limit", "2",
        "-o", "json",
    )  # fmt: skip
    assert [int(line["offset"]) for line in rest.json_lines()] == offsets[3:]
    table = stack.ok("events", "subscribe", "e2e-topic", "--limit", "1")
    assert run_id in table.stdout and "ASSIGNED" in table.stdout


# ----------------------------------------------------------------------------------------
# scheduling
# ----------------------------------------------------------------------------------------


def test_create_with_a_selector_and_queue_timeout_says_why_it_waits(stack: Stack) -> None:
    run_id = stack.create(
        "--image", "e2e/docker-only", "--selector", "executor=docker", "--queue-timeout-s", "60"
    )
    waiting = "no agent matches selector executor=docker (SELECTOR_UNMATCHED)"
    wait_for(
        "the pending reason",
        lambda: waiting in stack.ok("runs", "get", run_id).stdout,
        30,
        [stack.server],
    )
    run = stack.run(run_id)
    assert run["pending_reason"] == {
        "code": "PENDING_REASON_CODE_SELECTOR_UNMATCHED",
        "message": "no agent matches selector executor=docker",
    }
    assert run["constraints"]["selector"] == "executor=docker"
    assert run["constraints"]["queue_timeout_seconds"] == 60
    stack.ok("runs", "cancel", run_id)
    bad = stack.gyoza("runs", "create", "--image", "x", "--selector", "zone in (eu-1")
    assert bad.code == 2, bad.explain()
    assert "selector" in bad.stderr


def test_agents_list_shows_labels(stack: Stack) -> None:
    mine = next(a for a in stack.json("agents", "list")["agents"] if a["name"] == AGENT)
    assert mine["labels"]["executor"] == "scripted"
    assert mine["labels"]["gpu.count"] == "1"
    assert "executor=scripted" in stack.ok("agents", "list").stdout
