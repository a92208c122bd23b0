"""Agent configuration: declared GPUs, labels, environment variables, backoff."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gyoza.agent.backoff import Backoff
from gyoza.agent.capacity import GpuInventoryError, parse_gpu_inventory, probe_capacity
from gyoza.agent.config import AgentConfig, parse_labels


def test_gpus_count_and_size_with_units() -> None:
    gpus = parse_gpu_inventory("2x80G", agent_name="node-1")
    assert [(g.index, g.vram_total_mb, g.vram_free_mb, g.healthy) for g in gpus] == [
        (0, 81920, 81920, True),
        (1, 81920, 81920, True),
    ]
    assert [g.vram_total_mb for g in parse_gpu_inventory("4x24G")] == [24576] * 4
    assert [g.vram_total_mb for g in parse_gpu_inventory("1x24576M")] == [24576]
    assert [g.vram_total_mb for g in parse_gpu_inventory("80GiB")] == [81920]
    assert [g.vram_total_mb for g in parse_gpu_inventory("1x80G, 2x24g")] == [81920, 24576, 24576]
    assert [g.vram_total_mb for g in parse_gpu_inventory("1X512")] == [512]
    assert parse_gpu_inventory(None) == parse_gpu_inventory("") == parse_gpu_inventory("0") == []


def test_declared_gpu_uuids_are_unique_and_stable_per_agent() -> None:
    first = AgentConfig(name="node-1", gpus="2x80G").declared_gpus
    again = AgentConfig(name="node-1", gpus="2x80G").declared_gpus
    other = AgentConfig(name="node-2", gpus="2x80G").declared_gpus
    assert first is not None and again is not None and other is not None
    assert [g.uuid for g in first] == [g.uuid for g in again]
    assert len({g.uuid for g in first + other}) == 4
    assert all(g.uuid.startswith("GPU-") for g in first)


@pytest.mark.parametrize("spec", ["x80G", "2x", "2x80Q", "0x80G", "2x0G", "two"])
def test_malformed_gpu_declarations_are_refused(spec: str) -> None:
    with pytest.raises(GpuInventoryError):
        parse_gpu_inventory(spec)


def test_probe_uses_declared_values_and_measures_the_rest() -> None:
    gpus = parse_gpu_inventory("1x80G")
    declared = probe_capacity(gpus, cpu=8, ram_mb=1024)
    assert (declared.cpu, declared.ram_mb, declared.gpus) == (8.0, 1024, gpus)
    assert AgentConfig(gpus=None).declared_gpus is None  # NVML decides
    assert AgentConfig(gpus="0").declared_gpus == []  # declared: none
    measured = probe_capacity([])
    assert measured.cpu > 0 and measured.ram_mb > 0 and measured.gpus == []


def test_labels() -> None:
    assert parse_labels("zone=a, pool=gpu,") == {"zone": "a", "pool": "gpu"}
    assert parse_labels(None) == {}
    with pytest.raises(ValueError):
        parse_labels("zone")


def test_config_from_environment_with_flags_winning(tmp_path: Path) -> None:
    env = {
        "GYOZA_SERVER": "10.0.0.5:50051",
        "GYOZA_AGENT_NAME": "node-7",
        "GYOZA_TOKEN": "secret",
        "GYOZA_STATE_DIR": str(tmp_path),
        "GYOZA_EXECUTOR": "scripted",
        "GYOZA_GPUS": "2x80G",
        "GYOZA_LABELS": "zone=a",
        "GYOZA_CPU": "4",
        "GYOZA_TLS": "true",
    }
    config = AgentConfig.from_env(env, name="node-8", ram_mb=None)
    assert config.server == "10.0.0.5:50051"
    assert config.name == "node-8"
    assert config.token == "secret"
    assert config.state_dir == tmp_path
    assert config.executor == "scripted"
    assert config.labels == {"zone": "a"}
    assert config.cpu == 4.0 and config.ram_mb is None
    assert config.uses_tls
    assert config.declared_gpus is not None
    assert [g.vram_total_mb for g in config.declared_gpus] == [81920, 81920]
    assert config.declared_gpus[0].uuid == parse_gpu_inventory("2x80G", agent_name="node-8")[0].uuid


def test_config_defaults_and_validation(tmp_path: Path) -> None:
    config = AgentConfig.from_env({})
    assert config.server == "127.0.0.1:50051"
    assert config.name
    assert config.executor == "docker"
    assert config.network == "none"
    assert not config.uses_tls
    with pytest.raises(ValueError, match="executor"):
        AgentConfig(executor="podman")
    with pytest.raises(ValueError, match="gpus"):
        AgentConfig(gpus="2xQ")
    with pytest.raises(ValueError, match="client_key"):
        AgentConfig(client_cert=tmp_path / "cert.pem")
    assert (config.on_stop, config.metrics_port) == ("leave", None)
    with pytest.raises(ValueError, match="on_stop"):
        AgentConfig(on_stop="linger")
    with pytest.raises(ValueError, match="metrics_port"):
        AgentConfig(metrics_port=70000)
    env = AgentConfig.from_env({"GYOZA_ON_STOP": "drain", "GYOZA_AGENT_METRICS_PORT": "9100"})
    assert (env.on_stop, env.metrics_port) == ("drain", 9100)
    assert config.coalesce_ms == 1.0
    assert AgentConfig.from_env({"GYOZA_AGENT_COALESCE_MS": "0"}).coalesce_ms == 0.0
    for bad in (-1.0, 51.0):
        with pytest.raises(ValueError, match="coalesce_ms"):
            AgentConfig(coalesce_ms=bad)


def test_backoff_grows_with_jitter_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(0.1, 1.0, multiplier=2.0, jitter=0.5, rng=random.Random(7))
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    delays = [backoff.next_delay() for _ in ceilings]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert backoff.failures == 6
    backoff.reset()
    assert 0.05 <= backoff.next_delay() <= 0.1


def test_backoff_jitter_spreads_a_fleet() -> None:
    rng = random.Random(1)
    first = {round(Backoff(1.0, 10.0, rng=rng).next_delay(), 6) for _ in range(100)}
    assert len(first) == 100
    assert Backoff(1.0, 10.0, jitter=0.0).next_delay() == 1.0
    with pytest.raises(ValueError):
        Backoff(0, 1)
