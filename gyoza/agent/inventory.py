"""What an agent can run: CPU, memory and GPUs, measured or declared.

This is the minimal probe the daemon needs: CPU cores from :func:`os.cpu_count`, memory
from ``/proc/meminfo`` and the GPUs declared with ``--gpus``. The NVML probe
(``gyoza/agent/capacity.py``) plugs in behind :func:`probe_capacity`; a declared inventory
always overrides what NVML finds, so that a machine without a driver can still take GPU
runs (tests, benchmarks, simulated fleets).
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

#: Namespace of the UUIDs generated for declared GPUs. They are derived from the agent
#: name and the GPU index so that they stay the same across agent restarts.
_DECLARED_GPU_NAMESPACE = uuid.UUID("6f0f3c56-8d0e-4a77-9a1b-3c4e5bd0a9e1")

_UNIT_MB = {"M": 1, "MB": 1, "MIB": 1, "G": 1024, "GB": 1024, "GIB": 1024, "T": 1024 * 1024}
_UNIT_MB |= {"TB": 1024 * 1024, "TIB": 1024 * 1024}
_GPU_GROUP = re.compile(r"^\s*(?:(\d+)\s*[xX*]\s*)?(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


@dataclass(frozen=True)
class GpuInfo:
    """One GPU of the agent.

    Parameters
    ----------
    index : int
        Index on the agent: what a pinned ``gpu_id`` names.
    uuid : str
        NVML UUID, or a generated, stable one for a declared GPU.
    name : str
        Model name.
    vram_total_mb : int
        Total VRAM in MiB.
    vram_free_mb : int
        Free VRAM in MiB as the device reports it (the total, for a declared GPU).
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
class Capacity:
    """The agent's whole capacity (not what is free).

    Parameters
    ----------
    cpu : float
        CPU cores.
    ram_mb : int
        Memory in MiB.
    gpus : tuple[GpuInfo, ...]
        Every GPU, by index.
    """

    cpu: float
    ram_mb: int
    gpus: tuple[GpuInfo, ...] = ()


class GpuSpecError(ValueError):
    """Raised when a ``--gpus`` declaration cannot be read."""


def parse_gpus(spec: str | None, *, agent_name: str = "") -> tuple[GpuInfo, ...]:
    """Read a declared GPU inventory.

    Parameters
    ----------
    spec : str | None
        Comma-separated groups ``[COUNTx]SIZE[UNIT]``: ``"2x80G"``, ``"4x24G"``,
        ``"1x24576M"``, ``"1x80G,2x24G"``. Units are MiB (``M``, ``MB``, ``MiB``, also the
        default), GiB (``G``, ``GB``, ``GiB``) and TiB (``T``...). ``None``, ``""`` and
        ``"0"`` declare no GPU.
    agent_name : str
        Seeds the generated UUIDs, which are stable for a given name and index.

    Returns
    -------
    tuple[GpuInfo, ...]
        The GPUs, indexed from 0 in declaration order, healthy, all VRAM free.

    Raises
    ------
    GpuSpecError
        When a group is malformed or declares a zero size.
    """
    if spec is None or spec.strip() in ("", "0", "none"):
        return ()
    gpus: list[GpuInfo] = []
    for group in spec.split(","):
        match = _GPU_GROUP.match(group)
        if match is None:
            raise GpuSpecError(f"cannot read GPU group {group.strip()!r} (expected e.g. 2x80G)")
        count_text, size_text, unit_text = match.groups()
        count = int(count_text) if count_text is not None else 1
        unit = unit_text.upper() or "M"
        if unit not in _UNIT_MB:
            raise GpuSpecError(f"unknown unit {unit_text!r} in GPU group {group.strip()!r}")
        vram_mb = int(float(size_text) * _UNIT_MB[unit])
        if count < 1 or vram_mb < 1:
            raise GpuSpecError(f"GPU group {group.strip()!r} declares no GPU memory")
        for _ in range(count):
            index = len(gpus)
            gpu_uuid = uuid.uuid5(_DECLARED_GPU_NAMESPACE, f"{agent_name}/{index}/{vram_mb}")
            gpus.append(
                GpuInfo(
                    index=index,
                    uuid=f"GPU-{gpu_uuid}",
                    name=f"declared GPU ({_format_mb(vram_mb)})",
                    vram_total_mb=vram_mb,
                    vram_free_mb=vram_mb,
                )
            )
    return tuple(gpus)


def _format_mb(vram_mb: int) -> str:
    if vram_mb % 1024 == 0:
        return f"{vram_mb // 1024} GiB"
    return f"{vram_mb} MiB"


def probe_capacity(
    declared_gpus: tuple[GpuInfo, ...] = (),
    *,
    cpu: float | None = None,
    ram_mb: int | None = None,
) -> Capacity:
    """Measure the machine, with overrides.

    Parameters
    ----------
    declared_gpus : tuple[GpuInfo, ...]
        GPUs from ``--gpus``; used as they are.
    cpu : float | None
        CPU cores to declare instead of :func:`os.cpu_count`.
    ram_mb : int | None
        Memory in MiB to declare instead of ``/proc/meminfo``'s total.

    Returns
    -------
    Capacity
        The whole capacity. Nothing is read from the system for a value that is given.
    """
    return Capacity(
        cpu=float(cpu) if cpu is not None else float(os.cpu_count() or 1),
        ram_mb=int(ram_mb) if ram_mb is not None else _total_memory_mb(),
        gpus=tuple(declared_gpus),
    )


def with_gpus(capacity: Capacity, gpus: tuple[GpuInfo, ...]) -> Capacity:
    """The same capacity with another GPU list (a declared inventory overrides NVML's)."""
    return replace(capacity, gpus=gpus)


def _total_memory_mb(meminfo: Path = Path("/proc/meminfo")) -> int:
    """``MemTotal`` in MiB, or the physical pages as ``sysconf`` counts them."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (OSError, ValueError):
        return 0
