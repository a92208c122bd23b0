"""Capacity probe: declared GPU inventories, cgroup limits, NVML (absent here, or a stand-in).

Unit tests: no Docker needed (they sit beside the executor tests they serve).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from gyoza.agent.capacity import (
    CapacityInfo,
    GpuInfo,
    GpuInventoryError,
    NvmlProbe,
    cpu_cores,
    memory_mb,
    parse_gpu_inventory,
    probe_capacity,
)

# -- declared inventories ------------------------------------------------------------------


def test_parse_gpu_inventory_counts_and_sizes() -> None:
    gpus = parse_gpu_inventory("2x80G")
    assert [(g.index, g.vram_total_mb, g.vram_free_mb) for g in gpus] == [
        (0, 81920, 81920),
        (1, 81920, 81920),
    ]
    assert all(g.healthy and g.health_reason == "" for g in gpus)
    assert gpus[0].name == "declared GPU (80 GiB)"


def test_parse_gpu_inventory_groups_and_units() -> None:
    gpus = parse_gpu_inventory("2x80G, 1x24G,1x24576M, 16GB, 3 x 512MiB")
    assert [g.vram_total_mb for g in gpus] == [81920, 81920, 24576, 24576, 16384, 512, 512, 512]
    assert [g.index for g in gpus] == list(range(8))


@pytest.mark.parametrize("spec", [None, "", " ", "0", "none"])
def test_parse_gpu_inventory_of_nothing(spec: str | None) -> None:
    assert parse_gpu_inventory(spec) == []


@pytest.mark.parametrize("spec", ["2x", "x80G", "2x80Q", "0x80G", "2x0G", "2x80G,", "eighty"])
def test_parse_gpu_inventory_refuses_bad_groups(spec: str) -> None:
    with pytest.raises(GpuInventoryError):
        parse_gpu_inventory(spec)


def test_declared_gpu_uuids_are_stable_and_distinct() -> None:
    first = parse_gpu_inventory("2x80G", agent_name="node-a")
    again = parse_gpu_inventory("2x80G", agent_name="node-a")
    other = parse_gpu_inventory("2x80G", agent_name="node-b")
    assert [g.uuid for g in first] == [g.uuid for g in again]
    assert len({g.uuid for g in first + other}) == 4
    assert all(g.uuid.startswith("GPU-") for g in first)


# -- probe_capacity -------------------------------------------------------------------------


def _nvml_missing() -> bool:
    probe = NvmlProbe()
    probe.gpus()
    missing = probe.unavailable is not None
    probe.close()
    return missing


def test_probe_without_nvml_reports_no_gpus_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    if not _nvml_missing():
        pytest.skip("NVML works on this machine")
    caplog.clear()
    probe = NvmlProbe()
    with caplog.at_level(logging.INFO, logger="gyoza.agent.capacity"):
        assert probe.gpus() == []
        assert probe.gpus() == []
    lines = [r.getMessage() for r in caplog.records]
    caplog.clear()
    assert len(lines) == 1, lines
    assert lines[0].startswith("no GPUs: NVML did not start")
    capacity = probe_capacity()
    assert isinstance(capacity, CapacityInfo)
    assert capacity.gpus == []
    assert capacity.cpu >= 1
    assert capacity.ram_mb > 0


def test_declared_gpus_replace_nvml() -> None:
    declared = parse_gpu_inventory("1x24G")
    capacity = probe_capacity(declared, cpu=3.5, ram_mb=1000)
    assert capacity == CapacityInfo(cpu=3.5, ram_mb=1000, gpus=declared)


def test_measured_cpu_and_memory_match_the_machine() -> None:
    assert cpu_cores() <= len(os.sched_getaffinity(0))
    with open("/proc/meminfo") as meminfo:
        total_kb = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1])
    assert 0 < memory_mb() <= total_kb // 1024


def _fake_root(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


MEMINFO = "MemTotal:       16384000 kB\nMemFree:         1000 kB\n"


def test_cgroup_v2_limits(tmp_path: Path) -> None:
    root = _fake_root(
        tmp_path,
        {
            "proc/meminfo": MEMINFO,
            "proc/self/cgroup": "0::/agents/gyoza\n",
            "sys/fs/cgroup/cpu.max": "max 100000\n",
            "sys/fs/cgroup/agents/cpu.max": "50000 100000\n",
            "sys/fs/cgroup/agents/gyoza/cpu.max": "max 100000\n",
            "sys/fs/cgroup/agents/gyoza/memory.max": f"{2 * 1024**3}\n",
        },
    )
    assert cpu_cores(root) == 0.5  # the parent's quota applies
    assert memory_mb(root) == 2048


def test_cgroup_v1_limits_seen_from_inside_a_container(tmp_path: Path) -> None:
    # Inside a v1 container, /proc/self/cgroup names the host's path but the mounts
    # show the container's own cgroup at their root.
    root = _fake_root(
        tmp_path,
        {
            "proc/meminfo": MEMINFO,
            "proc/self/cgroup": "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "25000\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
            "sys/fs/cgroup/memory/memory.limit_in_bytes": f"{512 * 1024**2}\n",
        },
    )
    assert cpu_cores(root) == 0.25
    assert memory_mb(root) == 512


def test_no_cgroup_limits(tmp_path: Path) -> None:
    root = _fake_root(
        tmp_path,
        {
            "proc/meminfo": MEMINFO,
            "proc/self/cgroup": "4:memory:/\n",
            "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
        },
    )
    assert memory_mb(root) == 16000
    assert cpu_cores(root) == len(os.sched_getaffinity(0))


# -- NVML, with a stand-in for the library ---------------------------------------------------


class _NvmlError(Exception):
    pass


def fake_nvml(gpus: list[dict[str, Any]], xids: list[tuple[int, int]] | None = None) -> Any:
    """A pynvml stand-in: each GPU a dict (uuid, name, total, free, ecc, remap_failed,
    broken); ``xids`` are pending (gpu index, xid) events."""
    pending = list(xids or [])
    nvml = ModuleType("fake_pynvml")

    def device(index: int) -> dict[str, Any]:
        gpu = gpus[index]
        if gpu.get("broken"):
            raise _NvmlError("GPU is lost")
        return gpu

    def wait(_events: Any, _timeout_ms: int) -> Any:
        if not pending:
            raise _NvmlError("timeout")
        index, xid = pending.pop(0)
        return SimpleNamespace(device=gpus[index], eventData=xid)

    def ecc(handle: dict[str, Any], *_: Any) -> int:
        if "ecc" not in handle:
            raise _NvmlError("not supported")
        return int(handle["ecc"])

    attributes: dict[str, Any] = {
        "NVMLError": _NvmlError,
        "NVML_MEMORY_ERROR_TYPE_UNCORRECTED": 1,
        "NVML_VOLATILE_ECC": 0,
        "nvmlEventTypeXidCriticalError": 8,
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlEventSetCreate": lambda: "events",
        "nvmlEventSetFree": lambda _events: None,
        "nvmlDeviceRegisterEvents": lambda _handle, _types, _events: None,
        "nvmlEventSetWait_v2": wait,
        "nvmlDeviceGetCount": lambda: len(gpus),
        "nvmlDeviceGetHandleByIndex": device,
        "nvmlDeviceGetUUID": lambda handle: handle["uuid"].encode(),
        "nvmlDeviceGetName": lambda handle: handle["name"],
        "nvmlDeviceGetMemoryInfo": lambda handle: SimpleNamespace(
            total=handle["total"] * 1024**2, free=handle["free"] * 1024**2, used=0
        ),
        "nvmlDeviceGetTotalEccErrors": ecc,
        "nvmlDeviceGetRemappedRows": lambda handle: (0, 0, False, handle.get("remap_failed")),
    }
    for name, value in attributes.items():
        setattr(nvml, name, value)
    return nvml


def _gpu(index: int, **extra: Any) -> dict[str, Any]:
    return {"uuid": f"GPU-{index}", "name": "NVIDIA H200", "total": 143771, "free": 143000} | extra


def test_nvml_gpus_and_their_health() -> None:
    nvml = fake_nvml(
        [
            _gpu(0, ecc=0),
            _gpu(1, ecc=2),
            _gpu(2),  # ECC not supported: fine
            _gpu(3, remap_failed=True),
            _gpu(4, broken=True),
            _gpu(5),
        ],
        xids=[(5, 79), (0, 13)],  # 79: fell off the bus; 13: the application's fault
    )
    probe = NvmlProbe(nvml)
    gpus = probe.gpus()
    assert [(g.index, g.healthy) for g in gpus] == [
        (0, True),
        (1, False),
        (2, True),
        (3, False),
        (4, False),
        (5, False),
    ]
    assert gpus[0] == GpuInfo(0, "GPU-0", "NVIDIA H200", 143771, 143000)
    assert gpus[1].health_reason == "2 uncorrectable ECC errors since the driver loaded"
    assert gpus[3].health_reason == "a memory row remapping failed"
    assert gpus[4].health_reason == "NVML query failed: GPU is lost"
    assert gpus[5].health_reason == "critical XID error 79"
    # A critical XID is remembered: the GPU stays out until the agent restarts.
    assert not probe.gpus()[5].healthy
    probe.close()
