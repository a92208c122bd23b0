"""Label selectors: the syntax users write and what each requirement matches."""

from __future__ import annotations

import pytest

from gyoza.models.resources import Constraints
from gyoza.models.selectors import LabelSelector, SelectorError

AGENT = {"executor": "docker", "gpu.model": "NVIDIA H100 80GB HBM3", "zone": "eu-1"}


@pytest.mark.parametrize(
    ("text", "matches"),
    [
        ("", True),
        ("executor=docker", True),
        ("executor == docker", True),
        ("executor = scripted", False),
        ("gpu.model = NVIDIA H100 80GB HBM3", True),
        ("zone != eu-1", False),
        ("zone != us-1", True),
        ("pool != spot", True),  # absent label: != holds
        ("executor in (docker, podman)", True),
        ("executor in (scripted)", False),
        ("zone notin (eu-1, eu-2)", False),
        ("pool notin (spot)", True),
        ("zone", True),
        ("!zone", False),
        ("!spot", True),
        ("executor=docker, zone in (eu-1), !spot", True),
        ("executor=docker, zone in (us-1)", False),
    ],
)
def test_requirements(text: str, matches: bool) -> None:
    assert LabelSelector.parse(text).matches(AGENT) is matches


@pytest.mark.parametrize(
    "text",
    ["executor in ()", "zone in (eu-1", "zone) x", "= docker", "a b c", "x in (a=b)"],
)
def test_malformed_selectors_are_refused(text: str) -> None:
    with pytest.raises(SelectorError):
        LabelSelector.parse(text)


def test_constraints_report_a_bad_selector_and_queue_timeout() -> None:
    violations = Constraints(selector="zone in (", queue_timeout_s=0).validate()
    assert {v.field for v in violations} == {"selector", "queue_timeout_s"}


def test_constraints_round_trip_selector_and_queue_timeout() -> None:
    c = Constraints(gpu_count=1, selector="executor=docker", queue_timeout_s=30.0)
    assert Constraints.from_dict(c.to_dict()) == c
    assert c.holds_whole_gpu
    assert not Constraints(gpu_count=1, vram_mb=1).holds_whole_gpu
