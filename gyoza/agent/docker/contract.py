"""The container contract, agent side: what an attempt's container gets.

Labels naming the run, attempt and agent; CPU and memory limits from the constraints;
the assigned GPUs as one device request; the inputs as JSON in an environment variable
and in a read-only file; a writable outputs folder. ``docs/ops.md`` is the op side.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docker.types import DeviceRequest

from gyoza.agent.executor import Assignment
from gyoza.op import (
    ATTEMPT_ENV,
    GPU_IDS_ENV,
    INPUTS_ENV,
    INPUTS_FILE,
    INPUTS_FILE_ENV,
    OUTPUTS_DIR,
    OUTPUTS_DIR_ENV,
    OUTPUTS_FILE_NAME,
    RUN_ID_ENV,
)

LABEL_RUN_ID = "gyoza.run_id"
LABEL_ATTEMPT = "gyoza.attempt"
LABEL_AGENT = "gyoza.agent"

#: Inputs larger than this are only in the file: an environment variable that large
#: would risk the kernel's argument size limit when the op starts.
MAX_INPUTS_ENV_BYTES = 64 * 1024

#: Outputs larger than this are refused (``OUTPUT_INVALID``): they travel in an event and
#: are stored with the run. Big results belong in files the op uploads elsewhere.
MAX_OUTPUTS_BYTES = 1024 * 1024

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text) or "_"


@dataclass(frozen=True)
class AttemptFiles:
    """The host folder of one attempt: ``inputs.json`` and ``outputs/``, bind-mounted.

    It lives under the agent's state directory so that an agent that restarts finds the
    outputs of a container that finished while it was down.
    """

    root: Path

    @classmethod
    def under(cls, state_dir: Path, run_id: str, attempt: int) -> AttemptFiles:
        return cls(state_dir / "attempts" / f"{_safe(run_id)}.{attempt}")

    @property
    def inputs_file(self) -> Path:
        return self.root / "inputs.json"

    @property
    def outputs_dir(self) -> Path:
        return self.root / "outputs"

    @property
    def outputs_file(self) -> Path:
        return self.outputs_dir / OUTPUTS_FILE_NAME

    def prepare(self, inputs_json: str) -> None:
        """Write the inputs and an empty outputs folder (any earlier content goes)."""
        if self.root.exists():
            shutil.rmtree(self.root)
        self.outputs_dir.mkdir(parents=True)
        # The op may run as any user: let it write its outputs.
        self.outputs_dir.chmod(0o777)
        self.inputs_file.write_text(inputs_json, encoding="utf-8")
        self.inputs_file.chmod(0o644)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def read_outputs(self) -> dict[str, Any]:
        """The op's outputs: ``{}`` when it wrote no outputs file (a clean exit with
        nothing to report is a success).

        Raises
        ------
        ValueError
            Present but too large, not JSON, or not a JSON object; the message says which.
        """
        path = self.outputs_file
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return {}
        if size > MAX_OUTPUTS_BYTES:
            raise ValueError(
                f"{OUTPUTS_FILE_NAME} is {size} bytes; the limit is {MAX_OUTPUTS_BYTES}"
            )
        try:
            value = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{OUTPUTS_FILE_NAME} is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(
                f"{OUTPUTS_FILE_NAME} must hold a JSON object, not {type(value).__name__}"
            )
        return value


def container_name(agent_name: str, run_id: str, attempt: int) -> str:
    """A readable, unique container name (``docker ps`` shows it)."""
    return _safe(f"gyoza-{agent_name}-{run_id}-{attempt}")[:200]


def gpu_device_ids(assignment: Assignment) -> list[str]:
    """The assigned GPUs as the device ids Docker and the NVIDIA runtime take: UUIDs
    when the agent knows them (stable across reboots), else indices."""
    if assignment.gpu_uuids:
        return list(assignment.gpu_uuids)
    return [str(index) for index in assignment.gpu_ids]


def labels(assignment: Assignment, agent_name: str) -> dict[str, str]:
    return {
        LABEL_RUN_ID: assignment.run_id,
        LABEL_ATTEMPT: str(assignment.attempt),
        LABEL_AGENT: agent_name,
    }


def environment(assignment: Assignment, inputs_json: str) -> dict[str, str]:
    devices = gpu_device_ids(assignment)
    env = {
        RUN_ID_ENV: assignment.run_id,
        ATTEMPT_ENV: str(assignment.attempt),
        INPUTS_FILE_ENV: INPUTS_FILE,
        OUTPUTS_DIR_ENV: OUTPUTS_DIR,
        GPU_IDS_ENV: ",".join(str(index) for index in assignment.gpu_ids),
        # "void" hides every GPU: CUDA base images set NVIDIA_VISIBLE_DEVICES=all, which
        # would otherwise give a CPU-only run every GPU of the machine under an NVIDIA
        # default runtime.
        "NVIDIA_VISIBLE_DEVICES": ",".join(devices) if devices else "void",
    }
    if len(inputs_json.encode()) <= MAX_INPUTS_ENV_BYTES:
        env[INPUTS_ENV] = inputs_json
    return env


def create_kwargs(
    api: Any,
    assignment: Assignment,
    *,
    agent_name: str,
    files: AttemptFiles,
    inputs_json: str,
    network: str,
) -> dict[str, Any]:
    """Arguments of ``APIClient.create_container`` for an attempt."""
    constraints = assignment.constraints
    host: dict[str, Any] = {
        "init": True,
        "network_mode": network,
        "binds": {
            str(files.inputs_file.resolve()): {"bind": INPUTS_FILE, "mode": "ro"},
            str(files.outputs_dir.resolve()): {"bind": OUTPUTS_DIR, "mode": "rw"},
        },
        # json-file keeps every line until the container is removed, which the resume
        # cursor (a line count from the start) relies on.
        "log_config": {"type": "json-file", "config": {}},
    }
    if constraints.cpu > 0:
        host["nano_cpus"] = round(constraints.cpu * 1e9)
    if constraints.ram_mb > 0:
        host["mem_limit"] = f"{constraints.ram_mb}m"
        host["memswap_limit"] = f"{constraints.ram_mb}m"  # no swap beyond the limit
    devices = gpu_device_ids(assignment)
    if devices:
        host["device_requests"] = [
            DeviceRequest(driver="nvidia", device_ids=devices, capabilities=[["gpu"]])
        ]
    return {
        "image": assignment.image,
        "name": container_name(agent_name, assignment.run_id, assignment.attempt),
        "labels": labels(assignment, agent_name),
        "environment": environment(assignment, inputs_json),
        "host_config": api.create_host_config(**host),
    }
