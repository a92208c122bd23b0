"""OpDefinition: validation of definitions and inputs, runs created from it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from gyoza.models import (
    Constraints,
    EventDelivery,
    FailureClass,
    InputSpec,
    InputType,
    InvalidInput,
    OpDefinition,
    OpRunState,
    RetryPolicy,
)
from gyoza.models.outputs import OutputSpec


def a_definition(**overrides: Any) -> OpDefinition:
    fields: dict[str, Any] = {
        "name": "image-resize",
        "version": 2,
        "image": "ghcr.io/acme/resize:1.4",
        "inputs": [
            InputSpec("url", InputType.STRING, required=True, description="source image"),
            InputSpec("width", InputType.INT, default=512),
            InputSpec("scale", InputType.FLOAT, default=1.0),
            InputSpec("sharpen", InputType.BOOL, default=False),
            InputSpec("options", InputType.OBJECT),
            InputSpec("tags", InputType.ARRAY, default=["a"]),
        ],
        "constraints": Constraints(cpu=1, ram_mb=512, vram_mb=2000),
        "retry_policy": RetryPolicy(max_attempts=5),
        "event_delivery": EventDelivery(topic="images", attributes={"team": "media"}),
        "description": "Resizes images",
    }
    fields.update(overrides)
    return OpDefinition(**fields)


def violation_fields(error: pytest.ExceptionInfo[InvalidInput]) -> list[str]:
    return [v.field for v in error.value.violations]


# ----------------------------------------------------------------------
# The definition itself
# ----------------------------------------------------------------------


def test_a_good_definition_is_valid() -> None:
    assert a_definition().validate() == []


def test_defaults() -> None:
    d = OpDefinition(name="x", image="busybox")
    assert d.version == 0
    assert d.inputs == []
    assert d.constraints == Constraints()
    assert d.retry_policy == RetryPolicy()
    assert d.event_delivery == EventDelivery()
    assert d.description == ""
    assert d.created_at.tzinfo is not None
    assert d.validate() == []


@pytest.mark.parametrize("name", ["a", "resize", "img.resize_v2-x", "0op", "a" * 128])
def test_valid_names(name: str) -> None:
    assert a_definition(name=name).validate() == []


@pytest.mark.parametrize("name", ["", "Resize", "-op", ".op", "_op", "op name", "op/x", "a" * 129])
def test_invalid_names(name: str) -> None:
    assert [v.field for v in a_definition(name=name).validate()] == ["name"]


def test_validate_collects_every_violation() -> None:
    d = a_definition(
        name="Bad Name",
        version=-1,
        image="",
        inputs=[
            InputSpec("a", InputType.INT, default="three"),
            InputSpec("a", InputType.STRING),
            InputSpec("", InputType.STRING),
            InputSpec("b", InputType.INT, default=True),
            InputSpec("c", InputType.FLOAT, default=False),
            InputSpec("d", InputType.STRING, required=True, default="x"),
            InputSpec("e", InputType.OBJECT, default=[]),
            InputSpec("f", InputType.ARRAY, default={}),
        ],
        constraints=Constraints(ram_mb=-1),
        retry_policy=RetryPolicy(backoff_multiplier=0.1),
    )
    assert [v.field for v in d.validate()] == [
        "name",
        "version",
        "image",
        "inputs[0].default",
        "inputs[1].name",
        "inputs[2].name",
        "inputs[3].default",
        "inputs[4].default",
        "inputs[5].default",
        "inputs[6].default",
        "inputs[7].default",
        "constraints.ram_mb",
        "retry_policy.backoff_multiplier",
    ]


def test_defaults_matching_their_type_are_valid() -> None:
    d = a_definition(
        inputs=[
            InputSpec("s", InputType.STRING, default=""),
            InputSpec("i", InputType.INT, default=0),
            InputSpec("i2", InputType.INT, default=4.0),
            InputSpec("f", InputType.FLOAT, default=2),
            InputSpec("b", InputType.BOOL, default=True),
            InputSpec("o", InputType.OBJECT, default={}),
            InputSpec("a", InputType.ARRAY, default=[]),
        ]
    )
    assert d.validate() == []


# ----------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------


def test_validate_inputs_fills_defaults() -> None:
    filled = a_definition().validate_inputs({"url": "http://x/y.png"})
    assert filled == {
        "url": "http://x/y.png",
        "width": 512,
        "scale": 1.0,
        "sharpen": False,
        "tags": ["a"],
    }


def test_validate_inputs_keeps_given_values() -> None:
    given = {
        "url": "u",
        "width": 100,
        "scale": 2,
        "sharpen": True,
        "options": {"q": 90},
        "tags": [],
    }
    assert a_definition().validate_inputs(given) == given


def test_validate_inputs_returns_a_new_dictionary_and_copies_defaults() -> None:
    d = a_definition()
    given = {"url": "u"}
    filled = d.validate_inputs(given)
    assert filled is not given
    filled["tags"].append("b")
    assert d.inputs[5].default == ["a"]
    assert given == {"url": "u"}


def test_null_counts_as_left_out() -> None:
    d = a_definition()
    assert d.validate_inputs({"url": "u", "width": None})["width"] == 512
    with pytest.raises(InvalidInput) as caught:
        d.validate_inputs({"url": None})
    assert violation_fields(caught) == ["inputs.url"]


def test_int_input_accepts_an_integral_float() -> None:
    # A protobuf Struct carries every number as a double.
    filled = a_definition().validate_inputs({"url": "u", "width": 640.0})
    assert filled["width"] == 640
    assert isinstance(filled["width"], int)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("url", 3),
        ("width", True),
        ("width", 1.5),
        ("width", "1"),
        ("scale", False),
        ("scale", "1.0"),
        ("sharpen", 1),
        ("sharpen", "true"),
        ("options", []),
        ("options", "{}"),
        ("tags", {}),
        ("tags", "a,b"),
    ],
)
def test_wrong_types_are_refused(name: str, value: Any) -> None:
    inputs: dict[str, Any] = {"url": "u", name: value}
    with pytest.raises(InvalidInput) as caught:
        a_definition().validate_inputs(inputs)
    assert violation_fields(caught) == [f"inputs.{name}"]


def test_validate_inputs_reports_every_violation_at_once() -> None:
    with pytest.raises(InvalidInput) as caught:
        a_definition().validate_inputs({"width": "wide", "sharpen": 0, "zoom": 2, "alpha": 1})
    assert violation_fields(caught) == [
        "inputs.url",
        "inputs.width",
        "inputs.sharpen",
        "inputs.alpha",
        "inputs.zoom",
    ]
    descriptions = {v.field: v.description for v in caught.value.violations}
    assert "required" in descriptions["inputs.url"]
    assert descriptions["inputs.width"] == "expected INT, got STRING"
    assert descriptions["inputs.sharpen"] == "expected BOOL, got INT"
    assert "unknown input" in descriptions["inputs.zoom"]
    assert "url" in descriptions["inputs.zoom"]
    assert "inputs.url" in str(caught.value)
    assert "inputs.zoom" in str(caught.value)


def test_a_definition_without_inputs_refuses_any() -> None:
    d = OpDefinition(name="noop", image="busybox")
    assert d.validate_inputs({}) == {}
    with pytest.raises(InvalidInput) as caught:
        d.validate_inputs({"x": 1})
    assert violation_fields(caught) == ["inputs.x"]


def test_inputs_that_are_not_an_object_are_refused() -> None:
    bad: Any = ["url"]
    with pytest.raises(InvalidInput) as caught:
        a_definition().validate_inputs(bad)
    assert violation_fields(caught) == ["inputs"]


# ----------------------------------------------------------------------
# Runs from a definition
# ----------------------------------------------------------------------


def test_create_run_uses_the_definition() -> None:
    d = a_definition()
    run = d.create_run({"url": "u"}, priority=4, request_id="req-1")
    assert run.state is OpRunState.PENDING
    assert run.image == d.image
    assert run.priority == 4
    assert run.inputs["width"] == 512
    assert run.attempts[0].inputs == run.inputs
    assert run.constraints == d.constraints
    assert run.retry_policy == d.retry_policy
    assert run.event_delivery == d.event_delivery
    assert run.op_definition == "image-resize"
    assert run.op_definition_version == 2
    assert run.request_id == "req-1"


def test_create_run_does_not_share_settings_with_the_definition() -> None:
    d = a_definition()
    run = d.create_run({"url": "u"})
    run.constraints.cpu = 64
    run.event_delivery.attributes["x"] = "y"
    assert d.constraints.cpu == 1
    assert "x" not in d.event_delivery.attributes


def test_create_run_overrides() -> None:
    d = a_definition()
    constraints = Constraints(gpu_count=2)
    policy = RetryPolicy(max_attempts=1, retry_on=(FailureClass.OOM,))
    delivery = EventDelivery(topic="other")
    run = d.create_run(
        {"url": "u"},
        constraints=constraints,
        retry_policy=policy,
        event_delivery=delivery,
    )
    assert run.constraints == constraints
    assert run.retry_policy == policy
    assert run.event_delivery == delivery


def test_create_run_reports_input_and_setting_violations_together() -> None:
    with pytest.raises(InvalidInput) as caught:
        a_definition().create_run({"width": "x"}, priority=-1, constraints=Constraints(gpu_id=-2))
    assert violation_fields(caught) == [
        "inputs.url",
        "inputs.width",
        "priority",
        "constraints.gpu_id",
    ]


# ----------------------------------------------------------------------
# Serialisation
# ----------------------------------------------------------------------


def test_round_trip() -> None:
    d = a_definition(created_at=datetime(2025, 2, 3, 4, 5, 6, tzinfo=UTC))
    data = json.loads(json.dumps(d.to_dict()))
    assert data["createdAt"] == "2025-02-03T04:05:06+00:00"
    assert data["inputs"][0] == {
        "name": "url",
        "type": "STRING",
        "required": True,
        "default": None,
        "description": "source image",
    }
    assert OpDefinition.from_dict(data) == d


def test_from_dict_tolerates_missing_keys() -> None:
    d = OpDefinition.from_dict(
        {
            "name": "x",
            "image": "busybox",
            "inputs": [{"name": "a", "type": "INT"}],
            "created_at": "2025-01-01T00:00:00Z",
        }
    )
    assert d.version == 0
    assert d.inputs == [InputSpec("a", InputType.INT)]
    assert d.constraints == Constraints()
    assert d.created_at == datetime(2025, 1, 1, tzinfo=UTC)


def test_input_spec_round_trip() -> None:
    spec = InputSpec("opts", InputType.OBJECT, default={"a": [1]}, description="d")
    assert InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


# ----------------------------------------------------------------------------------------
# Declared outputs
# ----------------------------------------------------------------------------------------


def a_definition_with_outputs() -> OpDefinition:
    return a_definition(
        inputs=[],
        outputs=[
            OutputSpec("url", InputType.STRING, required=True),
            OutputSpec("count", InputType.INT, required=True),
            OutputSpec("score", InputType.FLOAT),
        ],
    )


def completed_with(outputs: dict[str, Any]) -> Any:
    run = a_definition_with_outputs().create_run({})
    run.assign("agent-1")
    run.add_event("STARTED", "started")
    run.add_event("COMPLETED", "completed", {"outputs": outputs})
    return run


def test_outputs_that_keep_the_declared_ones_complete() -> None:
    run = completed_with({"url": "s3://x", "count": 3.0, "extra": [1]})
    assert run.state is OpRunState.COMPLETED
    assert run.outputs == {"url": "s3://x", "count": 3.0, "extra": [1]}


def test_outputs_that_break_the_declared_ones_fail_naming_every_violation() -> None:
    run = completed_with({"count": "three", "score": True})
    assert run.state is OpRunState.FAILED
    summary = run.execution_summary
    assert summary.failure_class is FailureClass.OUTPUT_INVALID
    assert summary.exit_code == 0
    assert summary.error_message is not None
    for part in (
        "outputs.url is required (STRING)",
        "outputs.count expected INT, got STRING",
        "outputs.score expected FLOAT, got BOOL",
    ):
        assert part in summary.error_message
    last = run.events[-1]
    assert last.type == "FAILED"
    assert last.payload["reported_type"] == "COMPLETED"
    assert [v["field"] for v in last.payload["violations"]] == [
        "outputs.url",
        "outputs.count",
        "outputs.score",
    ]
    assert run.outputs == {}


def test_a_run_keeps_the_outputs_of_the_version_it_was_created_from() -> None:
    definition = a_definition_with_outputs()
    run = definition.create_run({})
    definition.outputs.clear()
    assert [o.name for o in run.output_specs] == ["url", "count", "score"]


def test_duplicate_and_empty_output_names_are_invalid() -> None:
    definition = a_definition(
        outputs=[
            OutputSpec("a", InputType.INT),
            OutputSpec("a", InputType.STRING),
            OutputSpec("", InputType.INT),
        ]
    )
    assert [(v.field, v.description) for v in definition.validate()] == [
        ("outputs[1].name", "duplicate output name 'a'"),
        ("outputs[2].name", "must not be empty"),
    ]


def test_outputs_round_trip() -> None:
    definition = a_definition_with_outputs()
    restored = OpDefinition.from_dict(json.loads(json.dumps(definition.to_dict())))
    assert restored.outputs == definition.outputs
