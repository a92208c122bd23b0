"""What an agent can run: CPU cores, memory and GPUs.

- CPU: the cores this process may use (its affinity), lowered to the cgroup's CPU quota.
- Memory: ``MemTotal`` from ``/proc/meminfo``, lowered to the cgroup's memory limit.
- GPUs: from NVML (``nvidia-ml-py``): index, UUID, name, total and free VRAM, health. A
  GPU is unhealthy when NVML reports a critical XID error for it, uncorrectable ECC
  errors, a failed row remapping, or fails to answer. A machine without NVML has no GPUs
  (said once in the log). A declared inventory (``--gpus 2x80G``) replaces NVML, so that
  a machine without a driver can still take GPU runs (tests, benchmarks, simulation).

This is the whole capacity, not what is free: the server subtracts what it reserved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

#: Namespace of the UUIDs made up for declared GPUs: the same agent name, index and size
#: give the same UUID on every start.
_DECLARED_GPU_NAMESPACE = uuid.UUID("6f0f3c56-8d0e-4a77-9a1b-3c4e5bd0a9e1")

_UNIT_MB = {"M": 1, "MB": 1, "MIB": 1, "G": 1024, "GB": 1024, "GIB": 1024}
_UNIT_MB |= {"T": 1024 * 1024, "TB": 1024 * 1024, "TIB": 1024 * 1024}
_GPU_GROUP = re.compile(r"^\s*(?:(\d+)\s*[xX*]\s*)?(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")

#: XIDs that an application causes (and survives) rather than the GPU: the NVIDIA
#: Kubernetes device plugin skips the same ones (13 graphics engine exception, 31 GPU
#: memory page fault, 43 GPU stopped processing, 45 preemptive cleanup, 68 video
#: processor exception, 109 context switch timeout).
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})

_MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuInfo:
    """One GPU of the agent.

    Parameters
    ----------
    index : int
        Index on the agent (NVML's): what a pinned ``gpu_id`` names.
    uuid : str
        NVML UUID (``GPU-...``), or a stable made-up one for a declared GPU.
    name : str
        Model name.
    vram_total_mb : int
        Total VRAM in MiB.
    vram_free_mb : int
        Free VRAM in MiB as the device reports it (the total for a declared GPU).
    healthy : bool
        False when the GPU reports errors; it then takes no runs.
    health_reason : str
        Why it is unhealthy.
    """

    index: int
    uuid: str
    name: str
    vram_total_mb: int
    vram_free_mb: int
    healthy: bool = True
    health_reason: str = ""


@dataclass(frozen=True)
class CapacityInfo:
    """The agent's whole capacity.

    Parameters
    ----------
    cpu : float
        CPU cores.
    ram_mb : int
        Memory in MiB.
    gpus : list[GpuInfo]
        Every GPU, by index.
    """

    cpu: float
    ram_mb: int
    gpus: list[GpuInfo] = field(default_factory=list)


class GpuInventoryError(ValueError):
    """A declared GPU inventory that cannot be read."""


def parse_gpu_inventory(spec: str | None, *, agent_name: str = "") -> list[GpuInfo]:
    """Read a declared GPU inventory such as ``"2x80G"`` or ``"2x80G,1x24G"``.

    Parameters
    ----------
    spec : str | None
        Comma-separated groups ``[COUNTx]SIZE[UNIT]``; the unit is ``M``/``MB``/``MiB``
        (the default), ``G``/``GB``/``GiB`` or ``T``/``TB``/``TiB``; a count of 1 may be
        left out. ``None``, ``""``, ``"0"`` and ``"none"`` declare no GPU.
    agent_name : str
        Seeds the made-up UUIDs (stable for a name, index and size).

    Returns
    -------
    list[GpuInfo]
        The GPUs indexed from 0 in declaration order, healthy, all VRAM free.

    Raises
    ------
    GpuInventoryError
        A group is malformed, has an unknown unit or declares no memory.
    """
    if spec is None or spec.strip().lower() in ("", "0", "none"):
        return []
    gpus: list[GpuInfo] = []
    for group in spec.split(","):
        match = _GPU_GROUP.match(group)
        if match is None:
            raise GpuInventoryError(
                f"cannot read GPU group {group.strip()!r} (expected e.g. 2x80G)"
            )
        count_text, size_text, unit_text = match.groups()
        count = 1 if count_text is None else int(count_text)
        unit = unit_text.upper() or "M"
        if unit not in _UNIT_MB:
            raise GpuInventoryError(f"unknown unit {unit_text!r} in GPU group {group.strip()!r}")
        vram_mb = int(float(size_text) * _UNIT_MB[unit])
        if count < 1 or vram_mb < 1:
            raise GpuInventoryError(f"GPU group {group.strip()!r} declares no GPU")
        for _ in range(count):
            index = len(gpus)
            made_up = uuid.uuid5(_DECLARED_GPU_NAMESPACE, f"{agent_name}/{index}/{vram_mb}")
            size = f"{vram_mb // 1024} GiB" if vram_mb % 1024 == 0 else f"{vram_mb} MiB"
            gpus.append(
                GpuInfo(
                    index=index,
                    uuid=f"GPU-{made_up}",
                    name=f"declared GPU ({size})",
                    vram_total_mb=vram_mb,
                    vram_free_mb=vram_mb,
                )
            )
    return gpus


def probe_capacity(
    declared_gpus: Sequence[GpuInfo] | None = None,
    *,
    cpu: float | None = None,
    ram_mb: int | None = None,
) -> CapacityInfo:
    """Measure this machine.

    Parameters
    ----------
    declared_gpus : Sequence[GpuInfo] | None
        GPUs to report instead of NVML's (``None``: ask NVML).
    cpu : float | None
        CPU cores to report instead of measuring them.
    ram_mb : int | None
        Memory in MiB to report instead of measuring it.

    Never raises: what cannot be measured is reported as none (0 GPUs) or from the next
    source down (``os.cpu_count``, ``sysconf``).
    """
    return CapacityInfo(
        cpu=float(cpu) if cpu is not None else cpu_cores(),
        ram_mb=int(ram_mb) if ram_mb is not None else memory_mb(),
        gpus=list(declared_gpus) if declared_gpus is not None else _default_probe().gpus(),
    )


# -- CPU and memory ------------------------------------------------------------------------


def cpu_cores(root: Path = Path("/")) -> float:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota."""
    try:
        cores = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cores = float(os.cpu_count() or 1)
    quota = _cgroup_cpu_quota(root)
    if quota is not None:
        cores = min(cores, quota)
    return round(cores, 2)


def memory_mb(root: Path = Path("/")) -> int:
    """``MemTotal`` in MiB, capped by a cgroup memory limit."""
    total = _meminfo_total_mb(root / "proc" / "meminfo")
    limit = _cgroup_memory_limit_mb(root)
    if limit is not None and (total == 0 or limit < total):
        return limit
    return total


def _meminfo_total_mb(meminfo: Path) -> int:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // _MIB
    except (OSError, ValueError):
        return 0


def _cgroup_paths(root: Path) -> dict[str, str]:
    """This process's cgroup per controller (``""`` for cgroup v2's unified one)."""
    paths: dict[str, str] = {}
    try:
        text = (root / "proc" / "self" / "cgroup").read_text()
    except OSError:
        return paths
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _cgroup_dirs(mount: Path, path: str) -> list[Path]:
    """The process's cgroup folder and every ancestor up to the mount (limits of a parent
    apply too); the mount alone when the path is not visible (a container's own view)."""
    dirs = []
    current = Path(path) if path.startswith("/") else Path("/")
    while True:
        candidate = mount / current.relative_to("/")
        if candidate.is_dir():
            dirs.append(candidate)
        if current == current.parent:
            break
        current = current.parent
    return dirs or [mount]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_cpu_quota(root: Path) -> float | None:
    paths = _cgroup_paths(root)
    base = root / "sys" / "fs" / "cgroup"
    quotas: list[float] = []
    if "" in paths:  # v2: cpu.max = "<quota|max> <period>"
        for folder in _cgroup_dirs(base, paths[""]):
            fields = (_read(folder / "cpu.max") or "").split()
            if len(fields) == 2 and fields[0] != "max":
                quotas.append(int(fields[0]) / int(fields[1]))
    if "cpu" in paths:  # v1: cpu.cfs_quota_us (-1: none) / cpu.cfs_period_us
        mount = next((base / n for n in ("cpu", "cpu,cpuacct") if (base / n).is_dir()), None)
        for folder in _cgroup_dirs(mount, paths["cpu"]) if mount else []:
            quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            if quota and period and int(quota) > 0 and int(period) > 0:
                quotas.append(int(quota) / int(period))
    return min(quotas) if quotas else None


def _cgroup_memory_limit_mb(root: Path) -> int | None:
    paths = _cgroup_paths(root)
    base = root / "sys" / "fs" / "cgroup"
    limits: list[int] = []
    if "" in paths:  # v2: memory.max = "<bytes|max>"
        for folder in _cgroup_dirs(base, paths[""]):
            value = _read(folder / "memory.max")
            if value and value != "max":
                limits.append(int(value))
    if "memory" in paths:  # v1: memory.limit_in_bytes, a huge number when unlimited
        for folder in _cgroup_dirs(base / "memory", paths["memory"]):
            value = _read(folder / "memory.limit_in_bytes")
            if value and int(value) < 2**62:
                limits.append(int(value))
    return min(limits) // _MIB if limits else None


# -- GPUs (NVML) -----------------------------------------------------------------------------


class NvmlProbe:
    """Reads the GPUs from NVML, and keeps watching them for critical XID errors.

    NVML is initialised on the first :meth:`gpus` and kept initialised (an XID is only
    seen by an event set registered before it happens). A GPU that had a critical XID
    stays unhealthy until the agent restarts, as with the NVIDIA device plugin.

    Parameters
    ----------
    nvml : ModuleType | None
        The ``pynvml`` module (tests pass a stand-in); imported when ``None``.
    """

    def __init__(self, nvml: ModuleType | None = None) -> None:
        self._nvml: Any = nvml
        self._lock = threading.Lock()
        self._ready = False
        self._unavailable: str | None = None
        self._events: Any = None
        self._xids: dict[str, int] = {}  # uuid → last critical XID

    @property
    def unavailable(self) -> str | None:
        """Why NVML cannot be used (``None`` while it can, or before the first probe)."""
        return self._unavailable

    def gpus(self) -> list[GpuInfo]:
        """Every GPU NVML sees (none without NVML)."""
        with self._lock:
            if not self._ready and not self._start():
                return []
            return self._probe()

    def close(self) -> None:
        with self._lock:
            if not self._ready:
                return
            nvml = self._nvml
            if self._events is not None:
                with contextlib.suppress(nvml.NVMLError):
                    nvml.nvmlEventSetFree(self._events)
                self._events = None
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlShutdown()
            self._ready = False

    def _start(self) -> bool:
        if self._unavailable is not None:
            return False
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                return self._give_up("the nvidia-ml-py package is not installed")
            self._nvml = pynvml
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            return self._give_up(f"NVML did not start: {_text(exc) or type(exc).__name__}")
        self._ready = True
        try:
            self._events = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as exc:
            log.warning("NVML event sets unavailable (%s); XID errors go unseen", _text(exc))
            return True
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError:
            return True
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                nvml.nvmlDeviceRegisterEvents(
                    handle, nvml.nvmlEventTypeXidCriticalError, self._events
                )
            except nvml.NVMLError as exc:  # NotSupported on some boards
                log.info("GPU %d: XID events not watched (%s)", index, _text(exc))
        return True

    def _give_up(self, reason: str) -> bool:
        self._unavailable = reason
        log.warning("no GPUs: %s. Declare GPUs with --gpus to run GPU work anyway.", reason)
        return False

    def _drain_xids(self) -> None:
        nvml = self._nvml
        if self._events is None:
            return
        wait = getattr(nvml, "nvmlEventSetWait_v2", None) or nvml.nvmlEventSetWait
        while True:
            try:
                data = wait(self._events, 0)
            except nvml.NVMLError:  # NVMLError_Timeout: nothing (more) pending
                return
            xid = int(data.eventData)
            if xid in APPLICATION_XIDS:
                continue
            try:
                gpu_uuid = _text(nvml.nvmlDeviceGetUUID(data.device))
            except nvml.NVMLError:
                continue
            log.error("GPU %s: critical XID %d; it takes no more runs", gpu_uuid, xid)
            self._xids[gpu_uuid] = xid

    def _probe(self) -> list[GpuInfo]:
        nvml = self._nvml
        self._drain_xids()
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            log.warning("NVML could not count the GPUs: %s", _text(exc))
            return []
        gpus = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                gpu_uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                name = _text(nvml.nvmlDeviceGetName(handle))
            except nvml.NVMLError as exc:
                gpus.append(
                    GpuInfo(index, "", "unknown", 0, 0, False, f"NVML query failed: {_text(exc)}")
                )
                continue
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                total, free = int(memory.total) // _MIB, int(memory.free) // _MIB
            except nvml.NVMLError as exc:
                gpus.append(
                    GpuInfo(index, gpu_uuid, name, 0, 0, False, f"NVML query failed: {_text(exc)}")
                )
                continue
            reason = self._health_problem(handle, gpu_uuid)
            gpus.append(GpuInfo(index, gpu_uuid, name, total, free, reason is None, reason or ""))
        return gpus

    def _health_problem(self, handle: Any, gpu_uuid: str) -> str | None:
        nvml = self._nvml
        if gpu_uuid in self._xids:
            return f"critical XID error {self._xids[gpu_uuid]}"
        try:
            errors = int(
                nvml.nvmlDeviceGetTotalEccErrors(
                    handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC
                )
            )
        except nvml.NVMLError:  # NotSupported: no ECC on this board, or ECC off
            errors = 0
        if errors > 0:
            return f"{errors} uncorrectable ECC errors since the driver loaded"
        try:
            remapped = nvml.nvmlDeviceGetRemappedRows(handle)
        except nvml.NVMLError:  # NotSupported before Ampere
            remapped = None
        if remapped is not None and len(remapped) >= 4 and remapped[3]:
            return "a memory row remapping failed"
        return None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


_default: NvmlProbe | None = None
_default_lock = threading.Lock()


def _default_probe() -> NvmlProbe:
    global _default
    with _default_lock:
        if _default is None:
            _default = NvmlProbe()
        return _default
