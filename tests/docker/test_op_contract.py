"""The container contract without Docker: output lines, event lines, the gyoza.op helper.

Unit tests (they sit beside the executor tests they serve).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from gyoza import op
from gyoza.agent.docker.contract import AttemptFiles
from gyoza.agent.docker.output import LineSplitter, parse_event_line
from gyoza.models.reports import ReportedEvent
from gyoza.models.resources import EventType

# -- lines -----------------------------------------------------------------------------------


def test_splitter_cuts_lines_per_stream() -> None:
    splitter = LineSplitter()
    assert splitter.feed("stdout", b"one\ntw") == [("one", "stdout")]
    assert splitter.feed("stderr", b"err\r\n") == [("err", "stderr")]
    assert splitter.feed("stdout", b"o\nthree\n\n") == [
        ("two", "stdout"),
        ("three", "stdout"),
        ("", "stdout"),
    ]
    assert splitter.feed("stdout", b"tail") == []
    assert splitter.finish() == [("tail", "stdout")]
    assert splitter.finish() == []


def test_splitter_cuts_endless_lines_and_survives_bad_utf8() -> None:
    splitter = LineSplitter(max_line_bytes=4)
    assert splitter.feed("stdout", b"abcdefghij") == [("abcd", "stdout"), ("efgh", "stdout")]
    assert splitter.finish() == [("ij", "stdout")]
    assert LineSplitter().feed("stdout", b"\xff ok\n") == [("\ufffd ok", "stdout")]


# -- event lines -------------------------------------------------------------------------------


def test_plain_lines_are_not_events() -> None:
    assert parse_event_line("hello") is None
    assert parse_event_line(" ::gyoza::{}") is None  # the marker must start the line


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (
            '::gyoza::{"type":"progress","progress":40,"message":"half"}',
            ReportedEvent(EventType.PROGRESS, "half", 40),
        ),
        ('::gyoza::{"type":"PROGRESS","progress":140}', ReportedEvent(EventType.PROGRESS, "", 100)),
        ('::gyoza::{"type":"progress","progress":12.6}', ReportedEvent(EventType.PROGRESS, "", 13)),
        ('::gyoza:: {"type":"info","message":"hi"} ', ReportedEvent(EventType.INFO, "hi")),
        (
            '::gyoza::{"type":"error","message":"disk slow","payload":{"disk":"sda"}}',
            ReportedEvent(EventType.ERROR, "disk slow", payload={"disk": "sda"}),
        ),
    ],
)
def test_event_lines(line: str, event: ReportedEvent) -> None:
    assert parse_event_line(line) == event


@pytest.mark.parametrize(
    "line",
    [
        "::gyoza::",
        "::gyoza::{",
        "::gyoza::[1]",
        '::gyoza::{"message":"no type"}',
        '::gyoza::{"type":"completed"}',  # an op cannot end itself by printing
        '::gyoza::{"type":"progress"}',
        '::gyoza::{"type":"progress","progress":true}',
        '::gyoza::{"type":"info","payload":[1]}',
    ],
)
def test_malformed_event_lines(line: str) -> None:
    with pytest.raises(ValueError):
        parse_event_line(line)


# -- the gyoza.op helper -----------------------------------------------------------------------


def test_helper_events_are_what_the_agent_reads(
    capsys: pytest.CaptureFixture[str],
) -> None:
    op.progress(41.6, "loading")
    op.info("multi\nline")
    op.error("oops")
    lines = capsys.readouterr().out.splitlines()
    assert [parse_event_line(line) for line in lines] == [
        ReportedEvent(EventType.PROGRESS, "loading", 42),
        ReportedEvent(EventType.INFO, "multi\nline"),
        ReportedEvent(EventType.ERROR, "oops"),
    ]


def test_helper_inputs_from_file_then_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(op.INPUTS_FILE_ENV, str(tmp_path / "missing.json"))
    monkeypatch.delenv(op.INPUTS_ENV, raising=False)
    assert op.inputs() == {}
    monkeypatch.setenv(op.INPUTS_ENV, '{"from": "env"}')
    assert op.inputs() == {"from": "env"}
    (tmp_path / "inputs.json").write_text('{"from": "file"}')
    monkeypatch.setenv(op.INPUTS_FILE_ENV, str(tmp_path / "inputs.json"))
    assert op.inputs() == {"from": "file"}


def test_helper_outputs_are_what_the_agent_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = AttemptFiles(tmp_path / "attempt")
    files.prepare(json.dumps({"x": 1}))
    monkeypatch.setenv(op.OUTPUTS_DIR_ENV, str(files.outputs_dir))
    op.set_outputs({"score": 0.5, "labels": ["a"]})
    op.set_outputs({"score": 0.75})  # replaces
    assert files.read_outputs() == {"score": 0.75}
    assert [p.name for p in files.outputs_dir.iterdir()] == ["outputs.json"]
    with pytest.raises(TypeError):
        op.set_outputs([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        op.set_outputs({"bad": float("nan")})
    assert files.read_outputs() == {"score": 0.75}


def test_helper_progress_refuses_nan() -> None:
    with pytest.raises(ValueError):
        op.progress(float("nan"))


def test_emit_writes_one_line() -> None:
    out = io.StringIO()
    op._emit({"type": "info", "message": "a"}, out)
    assert out.getvalue() == '::gyoza::{"type":"info","message":"a"}\n'


def test_outputs_size_limit(tmp_path: Path) -> None:
    files = AttemptFiles(tmp_path / "attempt")
    files.prepare("{}")
    files.outputs_file.write_text(json.dumps({"blob": "x" * (1024 * 1024)}))
    with pytest.raises(ValueError, match="the limit is"):
        files.read_outputs()
