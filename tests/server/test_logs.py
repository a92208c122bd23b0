"""The server's log formats: one event a line, with the request id inside a call."""

from __future__ import annotations

import io
import json
import logging

import pytest

from gyoza.server.logs import (
    bind_request_id,
    choose_request_id,
    configure_logging,
    log_event,
    unbind_request_id,
)


@pytest.fixture
def restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_fields_extras_and_the_request_id(restore_logging: object) -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    log = logging.getLogger("gyoza.test")
    token = bind_request_id("rid-1")
    try:
        log_event(log, logging.INFO, "rpc", method="/x/Y", code="OK")
        log.info("plain extra", extra={"agent": "node-1"})
    finally:
        unbind_request_id(token)
    log.debug("hidden")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "rpc" and first["method"] == "/x/Y" and first["request_id"] == "rid-1"
    assert second["agent"] == "node-1"
    assert first["level"] == "info" and first["logger"] == "gyoza.test"


def test_logfmt_lines(restore_logging: object) -> None:
    out = io.StringIO()
    configure_logging("debug", "logfmt", out)
    log_event(logging.getLogger("gyoza.test"), logging.WARNING, "server open", note='a "b" c')
    line = out.getvalue().strip()
    assert "\n" not in line
    assert 'msg="server open"' in line
    assert 'note="a \\"b\\" c"' in line
    assert "level=warning" in line


def test_text_lines_for_a_terminal(restore_logging: object) -> None:
    out = io.StringIO()
    configure_logging("info", "text", out)
    log_event(logging.getLogger("gyoza.test"), logging.INFO, "run finished", state="FAILED")
    line = out.getvalue().strip()
    assert "\n" not in line
    assert line.endswith("INFO gyoza.test: run finished state=FAILED")


def test_request_ids_from_clients_are_checked() -> None:
    assert choose_request_id("abc-123") == "abc-123"
    assert len(choose_request_id(None)) == 32
    assert choose_request_id("x" * 500) != "x" * 500
    assert choose_request_id("bad\nid") != "bad\nid"
