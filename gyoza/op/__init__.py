"""Helpers for writing a gyoza op in Python (standard library only).

An op is a container image. gyoza gives it its inputs and collects its events and
outputs through the container contract (``docs/ops.md``); these functions speak that
contract so an op does not have to::

    from gyoza import op

    params = op.inputs()
    op.progress(10, "loading")
    ...
    op.set_outputs({"score": 0.93})

The module has no dependency beyond the standard library, so it can also be copied on
its own into an image (``gyoza/op/__init__.py`` → ``gyoza_op.py``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "ATTEMPT_ENV",
    "EVENT_MARKER",
    "GPU_IDS_ENV",
    "INPUTS_ENV",
    "INPUTS_FILE",
    "INPUTS_FILE_ENV",
    "OUTPUTS_DIR",
    "OUTPUTS_DIR_ENV",
    "OUTPUTS_FILE_NAME",
    "RUN_ID_ENV",
    "attempt",
    "error",
    "info",
    "inputs",
    "outputs_dir",
    "progress",
    "run_id",
    "set_outputs",
]

#: A stdout line that starts with this marker carries one event as a JSON object.
EVENT_MARKER = "::gyoza::"

#: Where the agent mounts the inputs file (read-only) and the outputs folder.
INPUTS_FILE = "/gyoza/inputs.json"
OUTPUTS_DIR = "/gyoza/outputs"
#: The file the op writes in the outputs folder: one JSON object.
OUTPUTS_FILE_NAME = "outputs.json"

#: Environment variables the agent sets in every op container.
RUN_ID_ENV = "GYOZA_RUN_ID"
ATTEMPT_ENV = "GYOZA_ATTEMPT"
INPUTS_ENV = "GYOZA_INPUTS"
INPUTS_FILE_ENV = "GYOZA_INPUTS_FILE"
OUTPUTS_DIR_ENV = "GYOZA_OUTPUTS_DIR"
GPU_IDS_ENV = "GYOZA_GPU_IDS"


def run_id() -> str:
    """The run's identifier (``""`` outside gyoza)."""
    return os.environ.get(RUN_ID_ENV, "")


def attempt() -> int:
    """The attempt number, 1 for the first (``0`` outside gyoza)."""
    try:
        return int(os.environ.get(ATTEMPT_ENV, "0"))
    except ValueError:
        return 0


def inputs() -> dict[str, Any]:
    """The run's inputs.

    Read from the inputs file when it exists, else from ``GYOZA_INPUTS``; ``{}`` when
    neither is there (running the op by hand).
    """
    path = Path(os.environ.get(INPUTS_FILE_ENV, INPUTS_FILE))
    text = path.read_text(encoding="utf-8") if path.is_file() else os.environ.get(INPUTS_ENV, "")
    if not text.strip():
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"gyoza inputs are not a JSON object: {type(value).__name__}")
    return value


def outputs_dir() -> Path:
    """The folder the op may write result files into (created when missing)."""
    path = Path(os.environ.get(OUTPUTS_DIR_ENV, OUTPUTS_DIR))
    path.mkdir(parents=True, exist_ok=True)
    return path


def set_outputs(outputs: dict[str, Any]) -> None:
    """Write the op's outputs (a JSON object) to ``outputs.json``.

    The file is replaced atomically, so calling this again overwrites the outputs and a
    reader never sees half a file. It must be written before the op exits 0; an op that
    exits 0 without it fails with ``OUTPUT_INVALID``.
    """
    if not isinstance(outputs, dict):
        raise TypeError(f"outputs must be a dict, not {type(outputs).__name__}")
    text = json.dumps(outputs, allow_nan=False, separators=(",", ":"))
    folder = outputs_dir()
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".outputs-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / OUTPUTS_FILE_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def progress(pct: float, message: str = "") -> None:
    """Report progress, ``pct`` from 0 to 100 (clamped), with an optional message."""
    if not math.isfinite(pct):
        raise ValueError(f"progress must be a finite number, not {pct!r}")
    value = max(0, min(100, round(pct)))
    _emit({"type": "progress", "progress": value, "message": message})


def info(message: str) -> None:
    """Report an informational event (it shows in the run's timeline, not only its logs)."""
    _emit({"type": "info", "message": message})


def error(message: str) -> None:
    """Report an error the op survived; to fail the run, exit non-zero instead."""
    _emit({"type": "error", "message": message})


def _emit(event: dict[str, Any], stream: TextIO | None = None) -> None:
    out = stream if stream is not None else sys.stdout
    out.write(EVENT_MARKER + json.dumps(event, separators=(",", ":")) + "\n")
    out.flush()
